#!/bin/bash
# integration/vm/build-wdt.sh [CACHE_DIR]: builds the i6300esb watchdog driver for the
# lab kernel, out of tree, and caches it (default CACHE_DIR: /var/tmp/update-agent-vm).
#
# Why: the lab's hang scenario (kexec scenario kh) needs a hardware watchdog that
# outlives the old kernel, and QEMU's is `-device i6300esb` (boot.sh). Debian's cloud
# kernel, which the lab boots, has no driver for it (CONFIG_I6300ESB_WDT is not set;
# vm-lab-notes.md). Two other ways were weighed:
#   * Debian's generic flavour (linux-image-6.1.0-N-amd64) has the driver as a module,
#     but also NVMe and ext4 as modules, so every boot would need them from the
#     initramfs, and it probes far more hardware: more time in each of the ~60 boots a
#     CI run makes, and a kernel unlike the one cloud nodes run.
#   * softdog (a module of the cloud kernel) is a timer in the kernel it watches: it
#     does not survive the kexec it should guard, so it catches no hang after one.
# So the driver is built from Debian's own source of the very same kernel version
# (linux-source-6.1, only drivers/watchdog/i6300esb.c is taken) against that kernel's
# headers (linux-headers-VERSION-cloud-amd64, -common and linux-kbuild-6.1, unpacked
# here, never installed), with the gcc-12 the kernel was built with. The module is
# unsigned: the kernel loads it (CONFIG_MODULE_SIG_FORCE is off and the lab runs
# without Secure Boot, so no lockdown) and marks itself tainted, which changes nothing
# the lab looks at. About 10 s and 155 MB of downloads, once per kernel.
#
# Needs CACHE_DIR/kernel from build-rootfs.sh. Output:
# CACHE_DIR/kernel/modules-KVER/updates/i6300esb.ko (+ CACHE_DIR/kernel/wdt.ok, the
# cache key), where depmod finds it for the rootfs and the initramfs.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=setup.sh
source "$here/setup.sh"

cache=${1:-/var/tmp/update-agent-vm}
cache=$(cd "$cache" && pwd)
kdir=$cache/kernel
log() { printf 'vm/build-wdt: %s\n' "$*" >&2; }

kpkg=$(cat "$kdir/ok" 2>/dev/null || true)
[[ -n $kpkg ]] || { log "no kernel in $kdir: run build-rootfs.sh $cache first"; exit 1; }
kver=${kpkg#linux-image-}            # 6.1.0-57-cloud-amd64
abi=${kver%-cloud-amd64}             # 6.1.0-57
series=${kver%%.0-*}                 # 6.1
out=$kdir/modules-$kver/updates/i6300esb.ko
key="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) $kpkg"
if [[ $(cat "$kdir/wdt.ok" 2>/dev/null) == "$key" && -f $out ]]; then
  log "cached: $out"
  exit 0
fi
# The exact version of the kernel package: headers and source must be the same.
version=$(apt-cache show --no-all-versions "$kpkg" | sed -n 's/^Version: //p' | head -n 1)
[[ -n $version ]] || { log "apt knows no $kpkg (apt-get update?)"; exit 1; }
log "building i6300esb.ko for $kver ($version)"
start=$SECONDS
rm -f "$kdir/wdt.ok"
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q -o APT::Sandbox::User=root \
  "linux-headers-$kver=$version" "linux-headers-$abi-common=$version" \
  "linux-kbuild-$series=$version" "linux-source-$series=$version" >/dev/null)
for d in "$work"/linux-headers-*.deb "$work"/linux-kbuild-*.deb; do
  dpkg-deb -x "$d" "$work/x"
done
hdr=$work/x/usr/src/linux-headers-$kver
# The flavour's Makefile includes the common tree by its installed (absolute) path.
printf 'include %s\n' "$work/x/usr/src/linux-headers-$abi-common/Makefile" >"$hdr/Makefile"
mkdir "$work/m"
dpkg-deb --fsys-tarfile "$work"/linux-source-*.deb \
  | tar -xO "./usr/src/linux-source-$series.tar.xz" \
  | tar -xJO "linux-source-$series/drivers/watchdog/i6300esb.c" >"$work/m/i6300esb.c"
[[ -s $work/m/i6300esb.c ]] || { log "no i6300esb.c in linux-source-$series"; exit 1; }
echo 'obj-m := i6300esb.o' >"$work/m/Kbuild"
make -s -C "$hdr" M="$work/m" modules >"$work/make.log" 2>&1 \
  || { tail -n 20 "$work/make.log" >&2; exit 1; }
got=$(modinfo -F vermagic "$work/m/i6300esb.ko" | cut -d' ' -f1)
[[ $got == "$kver" ]] || { log "built for $got, not $kver"; exit 1; }
install -D -m 0644 "$work/m/i6300esb.ko" "$out"
printf '%s' "$key" >"$kdir/wdt.ok"
log "i6300esb.ko ready in $((SECONDS - start)) s"
