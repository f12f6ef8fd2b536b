#!/bin/bash
# integration/vm/build-initrd.sh [CACHE_DIR]: builds the VM lab's initramfs, which
# mounts the root through dm-verity when the kernel command line has roothash= (and
# plainly otherwise), and caches it (default CACHE_DIR: /var/tmp/update-agent-vm).
# /init is integration/vm/initrd-init.sh: the command line it takes is described there.
#
# Needs CACHE_DIR/kernel from build-rootfs.sh (the lab kernel and its module tree).
# Output: CACHE_DIR/initrd.img (+ initrd.img.ok, the cache key), a zstd-compressed
# newc cpio, which build-rootfs.sh puts at /boot/initrd.img in rootfs.tar: every lab
# boot goes through it (GRUB's fragment loads a slot's /boot/initrd.img; the agent
# copies it to the ESP with the kernel for systemd-boot).
#
# Contents (everything else comes from the host, which is Debian 12 like the guest):
#   /init                   initrd-init.sh (busybox ash)
#   /bin/busybox + links    busybox-static (mount, switch_root, insmod, ...)
#   /sbin/veritysetup       cryptsetup-bin, with the shared libraries ldd lists
#   /sbin/blkid             util-linux, for PARTUUID= (the kernel's uevent has only
#                           PARTNAME); it needs no library veritysetup does not
#   /lib/modules/...        dm-mod, dm-bufio, dm-verity and their dependencies for the
#                           lab kernel (CONFIG_BLK_DEV_DM=m, no CONFIG_DM_INIT), listed
#                           in load order in /lib/modules/ua-initrd.order; the watchdog
#                           core and i6300esb (build-wdt.sh) in ua-initrd-wdt.order
#   /dev/console            so that /init has a console before it mounts devtmpfs
# Rebuilt when this script, /init, the kernel or one of the host packages changes.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=setup.sh
source "$here/setup.sh"

cache=${1:-/var/tmp/update-agent-vm}
cache=$(cd "$cache" && pwd)
init_src=$here/initrd-init.sh
modules="dm_mod dm_bufio dm_verity"
wdt_modules="i6300esb"
# Loaded first of all: a failure of this initramfs (or of the root it starts) then
# leaves the kernel log's tail in a UEFI variable for the agent's next boot.
early_modules="efi_pstore"
log() { printf 'vm/build-initrd: %s\n' "$*" >&2; }

kpkg=$(cat "$cache/kernel/ok" 2>/dev/null || true)
[[ -n $kpkg ]] || { log "no kernel in $cache/kernel: run build-rootfs.sh $cache first"; exit 1; }
kver=${kpkg#linux-image-}
kmods=$cache/kernel/modules-$kver

# The host packages whose files go in; their versions are part of the key.
pkgs="busybox-static cryptsetup-bin libcryptsetup12 util-linux libblkid1 libc6 libssl3
  libdevmapper1.02.1 libjson-c5 libargon2-1 libpopt0 libuuid1 libselinux1 libudev1 libpcre2-8-0"
# shellcheck disable=SC2086 # one word per package
versions=$(dpkg-query -W -f '${Package}=${Version} ' $pkgs)
key="$(cat "${BASH_SOURCE[0]}" "$init_src" | sha256sum | cut -d' ' -f1) $kpkg $modules $early_modules $versions $(cat "$cache/kernel/wdt.ok" 2>/dev/null)"
if [[ $(cat "$cache/initrd.img.ok" 2>/dev/null) == "$key" && -f $cache/initrd.img ]]; then
  log "cached: $cache/initrd.img ($(stat -c %s "$cache/initrd.img") bytes)"
  exit 0
fi
log "building initrd.img for $kver"
start=$SECONDS
rm -f "$cache/initrd.img.ok"
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
r=$work/root
mkdir -p "$r"/{bin,sbin,dev,proc,sys,run,root,etc,lib/modules,lib64,lib/x86_64-linux-gnu}

# /dev/console exists before devtmpfs is mounted: the kernel opens it for /init's
# stdio (the kernel's built-in initramfs has one too; this does not rely on it).
mknod -m 0600 "$r/dev/console" c 5 1

# busybox: one symlink per applet, so /init calls them by name.
install -m 0755 /bin/busybox "$r/bin/busybox"
for a in $(/bin/busybox --list); do
  [[ $a == busybox ]] || ln -s busybox "$r/bin/$a"
done

# veritysetup and blkid with their libraries, at the paths ldd gives (the dynamic
# loader looks there; Debian's merged /usr makes /lib and /usr/lib the same).
for b in /usr/sbin/veritysetup /usr/sbin/blkid; do
  install -m 0755 "$b" "$r/sbin/${b##*/}"
  for lib in $(ldd "$b" | grep -o '/[^ ]*'); do
    # 0755: the kernel wants the dynamic loader (the ELF interpreter) executable.
    [[ -e $r$lib ]] || install -D -m 0755 "$(readlink -f "$lib")" "$r$lib"
  done
done

# Modules: the closure of dependencies from the kernel's own module tree (depmod on a
# hard-linked copy, so the cache is never written), in the order modprobe would load
# them.
m=$work/mods
mkdir -p "$m/lib/modules"
cp -al "$kmods" "$m/lib/modules/$kver"
depmod -b "$m" "$kver"
# order MODULES... > FILE: their .ko files, each after what it needs, each once.
order() {
  : >"$work/order"
  for mod in "$@"; do
    modprobe -d "$m" -S "$kver" --show-depends "$mod" >"$work/deps" \
      || { log "no module $mod in $kver"; exit 1; }
    sed -n "s|^insmod $m\(/lib/modules/[^ ]*\.ko\).*|\1|p" "$work/deps" >>"$work/order"
  done
  awk '!seen[$0]++' "$work/order"
}
# shellcheck disable=SC2086 # one word per module
order $modules >"$r/lib/modules/ua-initrd.order"
# shellcheck disable=SC2086
order $wdt_modules >"$r/lib/modules/ua-initrd-wdt.order"
# shellcheck disable=SC2086
order $early_modules >"$r/lib/modules/ua-initrd-early.order"
for f in ua-initrd.order ua-initrd-wdt.order ua-initrd-early.order; do
  # efi_pstore may be built in (nothing to load); the others are needed.
  [[ -s $r/lib/modules/$f || $f == ua-initrd-early.order ]] || { log "module resolution found nothing for $f"; exit 1; }
  while read -r ko; do
    install -D -m 0644 "$m$ko" "$r$ko"
  done <"$r/lib/modules/$f"
done
log "modules: $(cat "$r"/lib/modules/ua-initrd*.order | sed 's|.*/||' | tr '\n' ' ')"

install -m 0755 "$init_src" "$r/init"
# Name the kernel this initramfs is for (the modules only load into that one).
printf '%s\n' "$kver" >"$r/etc/ua-initrd-kernel"

# newc cpio, sorted names and fixed times so the same inputs give the same bytes.
find "$r" -exec touch -h -d @0 {} +
(cd "$r" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) \
  | zstd -q -19 -T1 >"$work/initrd.img"
mv "$work/initrd.img" "$cache/initrd.img"
printf '%s' "$key" >"$cache/initrd.img.ok"
log "initrd.img ready in $((SECONDS - start)) s: $(stat -c %s "$cache/initrd.img") bytes" \
  "($(du -sk --apparent-size "$r" | cut -f1) KiB unpacked)"
