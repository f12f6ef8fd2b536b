#!/bin/bash
# integration/vm/build-rootfs.sh [CACHE_DIR]: builds the VM lab's guest root file system
# once and caches it (default CACHE_DIR: /var/tmp/update-agent-vm).
#
# Three cached layers, each rebuilt only when its inputs change:
#   base/      debootstrap'd Debian bookworm minbase with systemd as init (slow: network)
#   kernel/    the current bookworm cloud kernel (apt-get download + dpkg-deb -x),
#              never installed on the host
#   rootfs.tar base + kernel + the lab's configuration (fast: rebuilt when this script
#              changes)
# Each layer is written under a temporary name and published with a stamp file last,
# so an interrupted build is never mistaken for a complete one.
#
# The guest (what rootfs.tar contains):
#   * / is the slot image, mounted read-only (GRUB passes "ro"); the root file system
#     is never fsck'd or written, so the bytes the agent diffs against stay as built.
#   * /var is a tmpfs; /var/lib/update-agent is the `state` partition and /boot/efi the
#     ESP (both by PARTLABEL, nofail). Both are fsck'd at boot (pass 2), as Debian's
#     installer sets up an ESP: dosfstools is included for fsck.vfat, which repairs what
#     a power cut inside a rename leaves (two names sharing clusters).
#   * udev is included: it makes /dev/disk/by-partlabel (fstab, the agent) and loads
#     virtio_net by modalias. kmod is included for that and for `fs-vfat` autoloading.
#   * systemd-networkd does DHCP on the virtio NIC (QEMU user net: 10.0.2.15).
#   * /boot/vmlinuz is the kernel GRUB boots; /lib/modules/VERSION holds only the
#     modules the lab needs (UA_VM_MODULES and their dependencies). NVMe and ext4 are
#     built into the cloud kernel; /boot/initrd.img (build-initrd.sh) is there for a
#     root through dm-verity (the kernel has no DM_INIT): with roothash= on the command
#     line it sets the verity device up, else it mounts root= as the kernel would.
#   * ua-lab-marker.service prints "UA-LAB: multi-user reached ..." (with uptime,
#     VERSION_ID, /proc/cmdline, failed units, mounts, addresses) to /dev/ttyS0 once
#     multi-user.target is reached, and powers the guest off when the kernel command
#     line has `ua_lab.poweroff` (make-disk.sh puts it there by default); with
#     `ua_lab.analyze` it first prints `systemd-analyze time` and the slowest units.
#
# Knobs (environment):
#   UA_VM_MIRROR    Debian mirror (default http://deb.debian.org/debian)
#   UA_VM_INCLUDE   extra packages for debootstrap, comma separated (default none)
#   UA_VM_MODULES   kernel modules to keep (default below)
#   UA_VM_KERNEL    kernel package (default: the cached one, else what bookworm's
#                   linux-image-cloud-amd64 depends on now)
# The layers are never refreshed on their own (the lab wants the same bits every run):
# remove CACHE_DIR (or CACHE_DIR/kernel) to pick up newer packages.
# Output: CACHE_DIR/rootfs.tar (+ rootfs.tar.ok), CACHE_DIR/kernel/vmlinuz-VERSION.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=setup.sh
source "$here/setup.sh"

cache=${1:-/var/tmp/update-agent-vm}
mirror=${UA_VM_MIRROR:-http://deb.debian.org/debian}
include=systemd,systemd-sysv,udev,kmod,dosfstools${UA_VM_INCLUDE:+,$UA_VM_INCLUDE}
modules=${UA_VM_MODULES:-virtio_pci virtio_net virtio_rng vfat nls_cp437 nls_ascii nls_utf8 efivarfs autofs4 dm_verity i6300esb efi_pstore}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

log() { printf 'vm/build-rootfs: %s\n' "$*" >&2; }
# This run's scratch space (next to the cache: same file system, so results can be
# published by rename), removed on exit whatever happens.
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---- Layer 1: debootstrap -------------------------------------------------------
base_key="bookworm minbase $mirror $include"
if [[ $(cat "$cache/base.tar.ok" 2>/dev/null) != "$base_key" ]]; then
  log "debootstrap bookworm minbase (+$include) from $mirror"
  start=$SECONDS
  rm -f "$cache/base.tar.ok"
  t=$work/base
  mkdir "$t"
  debootstrap --variant=minbase --include="$include" bookworm "$t/root" "$mirror" \
    >"$t/debootstrap.log" 2>&1 || { tail -n 30 "$t/debootstrap.log" >&2; exit 1; }
  # Package caches and lists are useless in a slot image.
  rm -rf "$t/root/var/cache/apt/archives/"*.deb "$t/root/var/lib/apt/lists/"*
  tar -C "$t/root" --numeric-owner --xattrs --xattrs-include='*' -cf "$t/base.tar" .
  mv "$t/base.tar" "$cache/base.tar"
  printf '%s' "$base_key" >"$cache/base.tar.ok"
  rm -f "$cache/rootfs.tar.ok"
  log "debootstrap done in $((SECONDS - start)) s"
fi

# ---- Layer 2: kernel --------------------------------------------------------------
kpkg=${UA_VM_KERNEL:-}
if [[ -z $kpkg ]]; then
  kpkg=$(cat "$cache/kernel/package" 2>/dev/null || true)
fi
if [[ -z $kpkg ]]; then
  # The metapackage's candidate depends on the current ABI package, e.g.
  # linux-image-6.1.0-56-cloud-amd64 (bookworm or bookworm-security; backports' 6.12
  # metapackage is not the candidate at its default priority).
  kpkg=$(apt-cache depends linux-image-cloud-amd64 | sed -n 's/^ *Depends: \(linux-image-6\.1\.0-[0-9]*-cloud-amd64\)$/\1/p' | head -n 1)
  [[ -n $kpkg ]] || { log "cannot find the bookworm cloud kernel (apt-get update?)"; exit 1; }
fi
kver=${kpkg#linux-image-}
kdir=$cache/kernel
if [[ $(cat "$kdir/ok" 2>/dev/null) != "$kpkg" ]]; then
  log "downloading $kpkg"
  start=$SECONDS
  rm -f "$kdir/ok"
  t=$work/kernel
  mkdir "$t"
  # The scratch directory is root's; download as root rather than as _apt.
  (cd "$t" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null)
  dpkg-deb -x "$t"/"$kpkg"_*.deb "$t/x"
  mkdir -p "$kdir"
  rm -rf "$kdir/modules-$kver"
  cp "$t/x/boot/vmlinuz-$kver" "$kdir/vmlinuz-$kver"
  cp "$t/x/boot/config-$kver" "$kdir/config-$kver"
  # The whole module tree is kept (cheap, ~100 MB) so the module list can change
  # without another download; the rootfs gets only a subset.
  mv "$t/x/lib/modules/$kver" "$kdir/modules-$kver"
  printf '%s' "$kpkg" >"$kdir/package"
  printf '%s' "$kpkg" >"$kdir/ok"
  rm -f "$cache/rootfs.tar.ok"
  log "kernel $kver ready in $((SECONDS - start)) s"
fi

# ---- The watchdog driver the cloud kernel lacks (build-wdt.sh says why) -------------
"$here/build-wdt.sh" "$cache" >&2

# ---- The initramfs (its own cache key: its script, /init, kernel, host packages) ----
"$here/build-initrd.sh" "$cache" >&2

# ---- Layer 3: configured rootfs -----------------------------------------------------
# Rebuilt when this script, the module list, the initramfs or a lower layer changes.
rootfs_key="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1) $base_key $kpkg $modules $(cat "$cache/initrd.img.ok") $(cat "$kdir/wdt.ok")"
if [[ $(cat "$cache/rootfs.tar.ok" 2>/dev/null) == "$rootfs_key" ]]; then
  log "cached: $cache/rootfs.tar ($kver)"
  exit 0
fi
log "configuring rootfs.tar ($kver)"
start=$SECONDS
rm -f "$cache/rootfs.tar.ok"
t=$work/rootfs
r=$t/root
mkdir "$t"
mkdir "$r"
tar -C "$r" --numeric-owner --xattrs --xattrs-include='*' -xf "$cache/base.tar"

# Kernel and the module subset. The closure of dependencies comes from depmod/modprobe
# inside the rootfs (the host need not have kmod): install the whole tree, resolve,
# then keep only what was resolved.
install -D -m 0644 "$kdir/vmlinuz-$kver" "$r/boot/vmlinuz"
install -m 0644 "$cache/initrd.img" "$r/boot/initrd.img"
install -m 0644 "$kdir/config-$kver" "$r/boot/config-$kver"
mkdir -p "$r/lib/modules"
cp -a "$kdir/modules-$kver" "$r/lib/modules/$kver"
chroot "$r" depmod "$kver"
keep=$t/keep
: >"$keep"
for m in $modules; do
  # "insmod /lib/modules/.../x.ko" per module; "builtin x" for built-in ones.
  chroot "$r" modprobe -S "$kver" --show-depends "$m" >>"$t/deps" \
    || { log "no module $m in $kver"; exit 1; }
done
sed -n 's|^insmod \(/lib/modules/[^ ]*\.ko[^ ]*\).*|\1|p' "$t/deps" | sort -u >"$keep"
find "$r/lib/modules/$kver/kernel" -type f | sed "s|^$r||" | sort >"$t/all"
comm -23 "$t/all" "$keep" | sed "s|^|$r|" | xargs -r rm -f
find "$r/lib/modules/$kver/kernel" -type d -empty -delete
chroot "$r" depmod "$kver"
log "modules kept: $(sed 's|.*/||' "$keep" | tr '\n' ' ')"

# Identity: an empty machine-id makes systemd generate a transient one at each boot
# (the root is read-only), so every VM booted from the image gets its own.
printf 'ua-lab\n' >"$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ua-lab\n::1 localhost ip6-localhost ip6-loopback\n' >"$r/etc/hosts"
: >"$r/etc/machine-id"
rm -f "$r/var/lib/dbus/machine-id"

# Mounts. / stays as the kernel mounted it (read-only); no fstab entry for it.
mkdir -p "$r/boot/efi" "$r/var/lib/update-agent"
# The device timeout is long enough for a host running two labs and a build: under
# such load udev once took more than 20 s to name the ESP, the boot went on without
# /boot/efi, and the agent could not start (the disks are always there in the lab).
cat >"$r/etc/fstab" <<'FSTAB'
# update-agent VM lab. / is the slot image, mounted read-only by the kernel ("ro").
tmpfs                 /var                  tmpfs  mode=0755,nosuid,nodev,size=128m  0 0
PARTLABEL=state       /var/lib/update-agent ext4   defaults,nofail,x-systemd.device-timeout=90s  0 2
PARTLABEL=esp         /boot/efi             vfat   umask=0077,nofail,x-systemd.device-timeout=90s  0 2
FSTAB
# The slot is an image: never fsck it (a repair would change the bytes the agent's
# deltas are computed against).
ln -sf /dev/null "$r/etc/systemd/system/systemd-fsck-root.service"
# vfat is needed for the ESP; loading it early is cheaper than on-demand autoloading.
printf '%s\n' vfat nls_cp437 nls_ascii nls_utf8 >"$r/etc/modules-load.d/ua-lab.conf"

# The hardware watchdog (QEMU's i6300esb, boot.sh; its driver from build-wdt.sh, loaded
# by the initramfs or by udev). systemd feeds it while the system runs and hands it to
# the next kernel across a kexec (the agent sets KExecWatchdogUSec). The watchdog core
# stops a driver's watchdog at any reboot, kexec included, when the driver asks for
# that, and i6300esb does: stop_on_reboot=0 keeps it running into the kexec'd kernel,
# where it resets a boot that hangs (docs/kexec.md).
mkdir -p "$r/etc/modprobe.d" "$r/etc/systemd/system.conf.d"
printf 'options watchdog stop_on_reboot=0\n' >"$r/etc/modprobe.d/ua-lab-watchdog.conf"
printf '[Manager]\nRuntimeWatchdogSec=30s\n' >"$r/etc/systemd/system.conf.d/ua-lab-watchdog.conf"

# Network: DHCP on whatever Ethernet the VM has (virtio-net: enp0s*).
mkdir -p "$r/etc/systemd/network"
cat >"$r/etc/systemd/network/20-ua-lab.network" <<'NET'
[Match]
Type=ether

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no
NET

# The marker: what a harness waits for in the serial log.
mkdir -p "$r/usr/local/sbin"
cat >"$r/usr/local/sbin/ua-lab-marker" <<'MARKER'
#!/bin/sh
# Prints the lab's marker lines to the serial console; powers off with ua_lab.poweroff.
out=/dev/ttyS0
VERSION_ID=
. /etc/os-release
say() { printf 'UA-LAB: %s\n' "$*" >"$out"; }
say "multi-user reached uptime=$(cut -d' ' -f1 /proc/uptime) version=$VERSION_ID"
say "cmdline: $(cat /proc/cmdline)"
say "failed units: $(systemctl --failed --plain --no-legend 2>/dev/null | cut -d' ' -f1 | tr '\n' ' ')"
mounts=
for m in / /var /var/lib/update-agent /boot/efi; do
  line=$(findmnt -rno SOURCE,FSTYPE,OPTIONS --mountpoint "$m" 2>/dev/null | head -n 1 | tr ' ' :)
  mounts="$mounts $m=${line:--}"
done
say "mounts:$mounts"
# DHCP may still be running; wait a little for the address (for the log only).
i=0
while [ $i -lt 20 ]; do
  addrs=$(hostname -I 2>/dev/null || true)
  [ -n "$addrs" ] && break
  sleep 0.5
  i=$((i + 1))
done
say "addresses: ${addrs:-none}"
# With ua_lab.analyze: where the boot time went. systemd-analyze needs the startup to
# be finished, which it is once this service's own job is done (Type=exec).
if grep -qw ua_lab.analyze /proc/cmdline; then
  timeout 30 systemctl is-system-running --wait >/dev/null 2>&1 || true
  say "startup: $(systemd-analyze time 2>/dev/null | head -n 1)"
  say "slowest: $(systemd-analyze blame --no-pager 2>/dev/null | head -n 8 | sed 's/^ *//' | tr -s ' ' | tr '\n' ';')"
fi
if grep -qw ua_lab.poweroff /proc/cmdline; then
  say "powering off"
  systemctl --no-block poweroff
fi
MARKER
chmod 0755 "$r/usr/local/sbin/ua-lab-marker"
cat >"$r/etc/systemd/system/ua-lab-marker.service" <<'UNIT'
[Unit]
Description=update-agent VM lab: multi-user marker on the serial console
After=multi-user.target

[Service]
# exec, not oneshot: the startup must be able to finish while the script waits for it.
Type=exec
ExecStart=/usr/local/sbin/ua-lab-marker

[Install]
WantedBy=multi-user.target
UNIT
systemctl --root="$r" --quiet enable systemd-networkd.service ua-lab-marker.service
# Nothing in the lab waits for "online"; do not let anything pull it in by accident.
systemctl --root="$r" --quiet disable systemd-networkd-wait-online.service 2>/dev/null || true
# No logins: root has no password, and a login prompt on the serial console would
# only interleave with the marker lines. (Debian's getty-static starts gettys on tty2-6
# when there is no D-Bus/logind.)
systemctl --root="$r" --quiet mask getty-static.service serial-getty@ttyS0.service
# e2scrub (LVM snapshot checks) only costs boot time (~4 s under TCG).
systemctl --root="$r" --quiet mask e2scrub_reap.service e2scrub_all.timer
# apt's timers would only ever run against a read-only root.
systemctl --root="$r" --quiet mask apt-daily.timer apt-daily-upgrade.timer 2>/dev/null || true

tar -C "$r" --numeric-owner --xattrs --xattrs-include='*' -cf "$t/rootfs.tar" .
mv "$t/rootfs.tar" "$cache/rootfs.tar"
printf '%s' "$rootfs_key" >"$cache/rootfs.tar.ok"
log "rootfs.tar ready in $((SECONDS - start)) s: $(du -h "$cache/rootfs.tar" | cut -f1)"
