#!/bin/sh
# /init of the VM lab's initramfs (integration/vm/build-initrd.sh installs this file as
# /init; it runs under busybox ash as PID 1).
#
# Mounts the root file system read-only and switches to it. With roothash= on the
# kernel command line the root goes through dm-verity first, with systemd's names so
# that a dracut/systemd-veritysetup initramfs would accept the same line:
#   roothash=HEX systemd.verity_root_data=SPEC systemd.verity_root_hash=SPEC
#   systemd.verity_root_options=hash-offset=N,restart-on-corruption root=/dev/mapper/root
# SPEC: PARTLABEL=name, PARTUUID=uuid or /dev/...; options: hash-offset=N,
# restart-on-corruption, panic-on-corruption, ignore-corruption (veritysetup open's
# flags of the same names). The data and hash devices may be the same partition, the
# hash area starting at byte N with a veritysetup superblock.
# Without roothash= it mounts root= (same SPEC forms), as the kernel would without an
# initramfs. rootfstype=, rootflags=, ro/rw and init= are honoured as the kernel does.
#
# Every failure prints one "ua-initrd: " line to the console and panics the kernel:
# never a shell. A node that cannot mount its root must end the boot so that the
# bootloader's try counter (panic=-1 + reboot) moves on; a shell would wait forever.
# shellcheck shell=sh

PATH=/bin:/sbin
export PATH
# To stderr, which is the console for PID 1 and is not captured by $(...).
say() { echo "ua-initrd: $*" >&2; }
die() {
  say "FATAL: $*"
  # Into the kernel's log as well (level 2, crit): the panic's pstore record then
  # carries why, and the agent's next boot says it (docs/security.md).
  echo "<2>ua-initrd: FATAL: $*" >/dev/kmsg 2>/dev/null
  say "no usable root file system: panicking the kernel"
  # A panic, not a reboot: panic= on the command line is the node's policy (the lab:
  # panic=-1 = reboot at once). sysrq-trigger works whatever kernel.sysrq says.
  echo c >/proc/sysrq-trigger 2>/dev/null
  # Without /proc: PID 1 exiting panics the kernel as well.
  exit 1
}
# Anything that ends this script other than the exec below is a failure.
trap 'die "init script ended unexpectedly"' EXIT

mkdir -p /dev /proc /sys /run /root
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev || die "cannot mount devtmpfs on /dev"
mount -t proc -o nosuid,nodev,noexec proc /proc || die "cannot mount /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys || die "cannot mount /sys"
# cryptsetup keeps its lock files under /run/cryptsetup.
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run || die "cannot mount /run"

# ---- Crash records ----------------------------------------------------------------------
# efi_pstore before anything that can fail: a panic from here on leaves the kernel
# log's tail in a UEFI variable. Best effort: no pstore is no reason to fail a boot.
while read -r ko; do
  m=${ko##*/}
  m=$(echo "${m%.ko}" | tr - _)
  [ -d "/sys/module/$m" ] && continue
  insmod "$ko" || { say "pstore: cannot load $ko: no crash records this boot"; break; }
done </lib/modules/ua-initrd-early.order

# ---- The hardware watchdog ------------------------------------------------------------
# QEMU's i6300esb (boot.sh), when the machine has one and this initramfs its driver:
# armed here at every firmware boot, as a systemd initramfs with RuntimeWatchdogSec=
# arms it, so a boot that hangs after this point (its init blocks before the real
# system's systemd takes the watchdog over) is reset by the hardware and the
# bootloader's try counter moves on. Left alone when it already runs: a kexec with
# systemd's KExecWatchdogSec kept it running from the old kernel (the agent's kexec
# path), and loading the driver would stop it (the driver's probe disables the timer);
# that watchdog is the one that must catch a hang of this boot. Register 0x68 of its
# PCI configuration space has bit 1 set while the timer runs.
wdt_secs=30
arm_watchdog() {
  esb=
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" = 0x8086:0x25ab ] && esb=$d
  done
  [ -n "$esb" ] && [ -s /lib/modules/ua-initrd-wdt.order ] || return 0
  lock=$(dd if="$esb/config" bs=1 skip=104 count=1 2>/dev/null | od -An -tu1 | tr -d ' ')
  if [ $((${lock:-0} & 2)) -ne 0 ]; then
    say "watchdog: i6300esb already running (armed before a kexec): left running"
    return 0
  fi
  while read -r ko; do
    case $ko in
      # Kept running across a reboot or kexec, as the image's modprobe.d says too.
      */watchdog.ko) insmod "$ko" stop_on_reboot=0 ;;
      */i6300esb.ko) insmod "$ko" heartbeat="$wdt_secs" ;;
      *) insmod "$ko" ;;
    esac || { say "watchdog: cannot load $ko: not armed"; return 0; }
  done </lib/modules/ua-initrd-wdt.order
  i=0
  until [ -c /dev/watchdog0 ] || [ $i -ge 20 ]; do
    usleep 50000
    i=$((i + 1))
  done
  # Opened and closed without the magic 'V': the timer keeps running; the real
  # system's systemd (RuntimeWatchdogSec=) opens it next and feeds it.
  if echo 1 >/dev/watchdog0; then
    say "watchdog: i6300esb armed, ${wdt_secs} s"
  else
    say "watchdog: cannot open /dev/watchdog0: not armed"
  fi
}
arm_watchdog

# ---- The command line -------------------------------------------------------------
root='' rootfstype='' rootflags='' mode=ro init=/sbin/init
roothash='' vdata='' vhash='' vopts='' hash_offset=''
read -r cmdline </proc/cmdline || die "cannot read /proc/cmdline"
# The words are split on blanks but never globbed (set -f only here and for the
# options below: the device lookups need globs).
set -f
for w in $cmdline; do
  case $w in
    root=*) root=${w#root=} ;;
    rootfstype=*) rootfstype=${w#rootfstype=} ;;
    rootflags=*) rootflags=${w#rootflags=} ;;
    ro) mode=ro ;;
    rw) mode=rw ;;
    init=*) init=${w#init=} ;;
    roothash=*) roothash=${w#roothash=} ;;
    systemd.verity_root_data=*) vdata=${w#systemd.verity_root_data=} ;;
    systemd.verity_root_hash=*) vhash=${w#systemd.verity_root_hash=} ;;
    systemd.verity_root_options=*) vopts=${w#systemd.verity_root_options=} ;;
  esac
done
set +f

# ---- Devices --------------------------------------------------------------------------
# How long a device may take to appear: NVMe probes asynchronously, so the partitions
# can show up after /init starts.
wait_tenths=100

# Prints the /dev path of the partition whose GPT name is $1 (uevent's PARTNAME).
by_partlabel() {
  for u in /sys/class/block/*/uevent; do
    [ -e "$u" ] || continue
    if grep -qxF "PARTNAME=$1" "$u"; then
      echo "/dev/$(sed -n 's/^DEVNAME=//p' "$u")"
      return 0
    fi
  done
  return 1
}
# Prints the /dev path of the partition whose GPT unique GUID is $1 (the kernel does not
# put it in uevent; util-linux blkid reads the partition table).
by_partuuid() {
  want=$(echo "$1" | tr 'A-F' 'a-f')
  for p in /sys/class/block/*/partition; do
    [ -e "$p" ] || continue
    d=${p%/partition}
    d=/dev/${d##*/}
    [ -b "$d" ] || continue
    got=$(blkid -p -s PART_ENTRY_UUID -o value "$d" 2>/dev/null | tr 'A-F' 'a-f')
    if [ "$got" = "$want" ]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}
# Prints the block device SPEC ($1) names, waiting for it to appear; $2 says what it
# is for the messages.
resolve() {
  i=0
  while :; do
    case $1 in
      PARTLABEL=?*) dev=$(by_partlabel "${1#PARTLABEL=}") && break ;;
      PARTUUID=?*) dev=$(by_partuuid "${1#PARTUUID=}") && break ;;
      /dev/?*) [ -b "$1" ] && dev=$1 && break ;;
      *) die "$2: cannot use device spec '$1' (PARTLABEL=, PARTUUID= or /dev/... only)" ;;
    esac
    i=$((i + 1))
    [ "$i" -le "$wait_tenths" ] || die "$2: no device $1 after $((wait_tenths / 10)) s"
    usleep 100000
  done
  [ -b "$dev" ] || die "$2: $1 resolved to $dev, which is not a block device"
  echo "$dev"
}

# ---- dm-verity ----------------------------------------------------------------------
# Checks roothash= against the tree on device $1 (superblock at byte $2) before the
# kernel gets it. veritysetup open does not: it loads the table with any root hash, and
# the kernel finds the mismatch only at the first read (the mount), where it counts as
# corruption (a restart with restart-on-corruption, with nothing saying why). A root
# hash that does not match the tree is a configuration error (a command line for
# another image), and deserves its own message. This is only that early message: the
# kernel still verifies every block it reads, this one included.
# Format 1 (veritysetup's default): the root hash is HASH(salt || top block), and the
# top level is the first hash block after the 512-byte superblock.
check_root_hash() {
  sb=$(veritysetup dump "$1" --hash-offset="$2" 2>&1) \
    || die "no verity superblock on $1 at byte $2: $(echo "$sb" | tr '\n' ' ')"
  field() { echo "$sb" | sed -n "s/^$1:[[:space:]]*//p"; }
  [ "$(field 'Hash type')" = 1 ] || die "verity hash type $(field 'Hash type') on $1 (only 1 is supported)"
  alg=$(field 'Hash algorithm')
  case $alg in
    sha256 | sha512 | sha1) ;;
    *) die "verity hash algorithm $alg on $1 (sha256, sha512 or sha1 only)" ;;
  esac
  hbs=$(field 'Hash block size')
  salt=$(field 'Salt')
  [ "$salt" = - ] && salt=
  top=$((($2 + 512 + hbs - 1) / hbs))
  got=$({
    printf '%s' "$salt" | xxd -r -p
    dd if="$1" bs="$hbs" skip="$top" count=1 2>/dev/null
  } | "${alg}sum" | cut -d' ' -f1)
  [ "$got" = "$(echo "$roothash" | tr 'A-F' 'a-f')" ] \
    || die "roothash=$roothash does not match the verity tree on $1 (its top block hashes to $got): wrong image or wrong command line"
}

if [ -n "$roothash" ]; then
  case $roothash in
    *[!0-9a-fA-F]*) die "roothash=$roothash is not hexadecimal" ;;
  esac
  [ ${#roothash} -ge 40 ] || die "roothash=$roothash is too short"
  [ -n "$vdata" ] || die "roothash= without systemd.verity_root_data= (not supported)"
  [ -n "$vhash" ] || die "roothash= without systemd.verity_root_hash= (not supported)"
  # The verity device is what gets mounted: a root= naming anything else would bypass
  # the check, so refuse it rather than guess.
  case $root in
    '' | /dev/mapper/root) ;;
    *) die "roothash= given but root=$root (must be /dev/mapper/root)" ;;
  esac
  vargs=
  # An option this script does not know could weaken or tighten the check; refuse it.
  old_ifs=$IFS
  IFS=,
  set -f
  for o in $vopts; do
    case $o in
      hash-offset=*)
        n=${o#hash-offset=}
        case $n in '' | *[!0-9]*) die "verity option $o: not a byte count" ;; esac
        vargs="$vargs --hash-offset=$n"
        hash_offset=$n
        ;;
      restart-on-corruption | panic-on-corruption | ignore-corruption) vargs="$vargs --$o" ;;
      '') ;;
      *) die "unsupported verity option '$o' in systemd.verity_root_options" ;;
    esac
  done
  IFS=$old_ifs
  set +f

  # dm-mod, dm-bufio, dm-verity and their dependencies, in dependency order.
  while read -r ko; do
    m=${ko##*/}
    m=${m%.ko}
    m=$(echo "$m" | tr - _)
    [ -d "/sys/module/$m" ] && continue
    insmod "$ko" || die "cannot load kernel module $ko"
  done </lib/modules/ua-initrd.order

  data=$(resolve "$vdata" "verity data") || die "verity data: $vdata not found"
  hash=$(resolve "$vhash" "verity hash") || die "verity hash: $vhash not found"
  check_root_hash "$hash" "${hash_offset:-0}"
  say "verity: opening $data (hash $hash, ${vopts:-no options}) with root hash $roothash"
  # shellcheck disable=SC2086 # $vargs: checked words without blanks, one per option
  out=$(veritysetup open "$data" root "$hash" "$roothash" $vargs 2>&1) \
    || die "veritysetup open refused $data: $(echo "$out" | tr '\n' ' ')"
  [ -b /dev/mapper/root ] || die "veritysetup open succeeded but /dev/mapper/root is missing"
  dm=
  for d in /sys/block/dm-*; do
    [ "$(cat "$d/dm/name" 2>/dev/null)" = root ] && dm=${d##*/}
  done
  [ -n "$dm" ] || die "veritysetup open succeeded but no dm device is named root"
  say "verity: /dev/mapper/root is $dm, dm uuid $(cat "/sys/block/$dm/dm/uuid" 2>/dev/null)," \
    "$(veritysetup status root 2>/dev/null | sed -n 's/^ *status: *//p')"
  root=/dev/mapper/root
  dev=/dev/mapper/root
  # A verity device is read-only whatever the command line says.
  mode=ro
else
  [ -n "$root" ] || die "no root= on the kernel command line"
  dev=$(resolve "$root" "root") || die "root: $root not found"
fi

# ---- Mount and switch ---------------------------------------------------------------
opts=$mode${rootflags:+,$rootflags}
if [ -n "$rootfstype" ]; then
  mount -t "$rootfstype" -o "$opts" "$dev" /root || die "cannot mount $dev ($root) as $rootfstype on /root"
else
  mount -o "$opts" "$dev" /root || die "cannot mount $dev ($root) on /root"
fi
[ -x "/root$init" ] || [ -L "/root$init" ] || die "no $init on the root file system ($dev)"
say "root $dev ($root) mounted $opts; switching to $init after $(cut -d' ' -f1 /proc/uptime) s"

# The devtmpfs goes along (it holds /dev/mapper/root's node); the rest is the real
# init's to mount.
mount --move /dev /root/dev || die "cannot move /dev into the root file system"
umount /run /sys /proc 2>/dev/null
trap - EXIT
exec switch_root /root "$init" "$@"
