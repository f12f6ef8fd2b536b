#!/bin/bash
# integration/vm/initrd-smoke.sh [CACHE_DIR]: boots the lab kernel with the initramfs
# of build-initrd.sh (QEMU direct kernel boot: -kernel/-initrd/-append, no firmware
# files, no bootloader), one QEMU at a time, on a disk whose root-b holds the lab's
# root file system as an ext4 image followed by its dm-verity tree
# (`veritysetup format PART PART --hash-offset=IMAGE_SIZE`).
#
# Cases (each one boot; a failure case passes when QEMU ends without the multi-user
# marker and the serial log says why):
#   0 no initramfs, root=PARTLABEL=root-b: the lab's boot today (baseline time)
#   1 verity: roothash= + systemd.verity_root_* on root-b, root=/dev/mapper/root:
#     multi-user, / mounted from /dev/mapper/root, the dm device a verity target
#   2 plain: root=PARTLABEL=root-b through the initramfs: multi-user
#   3 wrong roothash: the initramfs finds that it does not match the tree (veritysetup
#     open itself accepts any root hash), says so and panics
#   4 a corrupted data block the boot reads (the first block of /usr/lib/systemd/systemd,
#     which switch_root executes) with restart-on-corruption: the kernel logs the
#     corruption and restarts
#   5 verity with the other spec forms (data PARTUUID=, hash /dev/nvme0n1p3) and
#     panic-on-corruption: multi-user
#   6 root=PARTLABEL=no-such: the initramfs waits, says so and panics
# UA_SMOKE_CASES (default all: "0 1 2 3 4 5 6") picks cases; integration/test.sh runs
# 3 4 6, the failures the VM lab's scenarios do not boot (they boot 1 and 2 many times).
# Prints one line per case and a summary; exits non-zero if any case failed. Serial
# logs stay in CACHE_DIR/initrd-smoke/.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${1:-/var/tmp/update-agent-vm}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
out=$cache/initrd-smoke
mkdir -p "$out"
timeout_s=${UA_VM_TIMEOUT:-240}

log() { printf 'vm/initrd-smoke: %s\n' "$*" >&2; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# ---- Build --------------------------------------------------------------------------
"$here/build-rootfs.sh" "$cache"
"$here/build-initrd.sh" "$cache"
kpkg=$(cat "$cache/kernel/ok")
kernel=$cache/kernel/vmlinuz-${kpkg#linux-image-}
initrd=$cache/initrd.img

work=$(mktemp -d "$out/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
tree=$work/tree
mkdir "$tree"
tar -C "$tree" --numeric-owner --xattrs --xattrs-include='*' -xf "$cache/rootfs.tar"
# The image: as make-disk.sh sizes a slot for a tree. The hash area after it: 32 bytes
# per 4 KiB block at level 0 (1/128), the upper levels and the superblock fit in the
# extra MiB.
used=$(du -s -B1M --apparent-size "$tree" | cut -f1)
data_mib=$(((used * 13 / 10 + 64 + 63) / 64 * 64))
part_mib=$((data_mib + (data_mib + 127) / 128 + 1))
image_size=$((data_mib << 20))
img=$work/root-b.img
# 4 KiB blocks: the verity device has 4 KiB logical blocks and ext4 cannot mount with
# smaller ones ("bad block size 1024"), which mke2fs.conf picks for images < 512 MiB.
mkfs.ext4 -q -F -b 4096 -L root-b -d "$tree" "$img" "${data_mib}M"
rm -rf "$tree"
# The block the corruption case overwrites, found before the tree is added (debugfs
# reads the ext4 image; the result is a block number within it).
victim=/usr/lib/systemd/systemd
victim_block=$(debugfs -R "bmap $victim 0" "$img" 2>/dev/null)
[[ $victim_block =~ ^[0-9]+$ && $victim_block -gt 0 ]] || { log "cannot find $victim in the image"; exit 1; }
truncate -s "${part_mib}M" "$img"
# The data and the tree share the partition, so veritysetup needs the data size too
# (--data-blocks); without it, it refuses: "Data area overlaps with hash area".
veritysetup format "$img" "$img" --hash-offset="$image_size" \
  --data-blocks=$((image_size / 4096)) >"$work/format.txt"
roothash=$(sed -n 's/^Root hash:[[:space:]]*//p' "$work/format.txt")
[[ $roothash =~ ^[0-9a-f]{64}$ ]] || { log "no root hash from veritysetup format"; cat "$work/format.txt" >&2; exit 1; }
veritysetup verify "$img" "$img" "$roothash" --hash-offset="$image_size" \
  || { log "veritysetup verify refused the fresh tree"; exit 1; }
# The lab's disk layout (make-disk.sh) with this image in root-b and slot a empty: the
# guest's fstab finds the state partition and the ESP as in the lab.
UA_VM_SLOT_MIB=$part_mib "$here/make-disk.sh" "$out/disk.img" - "$img"
rm -f "$img"
read -r b_at _ < <(sfdisk -d "$out/disk.img" \
  | sed -n 's/.*start= *\([0-9]*\), size= *\([0-9]*\),.*name="root-b".*/\1 \2/p')
# Lower case, as udev's /dev/disk/by-partuuid links are: the real root's systemd reads
# the same command line (systemd-veritysetup-generator) and waits for that link; an
# upper-case PARTUUID there costs a 90 s device timeout.
partuuid=$(sfdisk --part-uuid "$out/disk.img" 3 | tr 'A-F' 'a-f')
# The corrupted copy: one 4 KiB block of $victim replaced with random bytes.
cp --sparse=always "$out/disk.img" "$out/disk-corrupt.img"
dd if=/dev/urandom of="$out/disk-corrupt.img" bs=4096 count=1 conv=notrunc status=none \
  seek=$((b_at / 8 + victim_block))
log "root-b: ${data_mib} MiB ext4 + verity tree at ${image_size} (partition ${part_mib} MiB," \
  "PARTUUID $partuuid); root hash $roothash; corrupt copy: block $victim_block ($victim)"

# ---- Boots ------------------------------------------------------------------------------
# Boots once (QEMU direct kernel boot, the lab's machine otherwise: see boot.sh) and sets
# marker_s (seconds from QEMU start to the multi-user marker, or -), exit_s, qemu_rc.
# $1 log name, $2 disk, $3 initrd or -, $4 command line.
boot() {
  local serial=$out/$1.log disk=$2 rd=$3 cmdline=$4 t0 pid
  local qemu=(
    qemu-system-x86_64 -machine q35 -accel tcg -cpu max -smp 1 -m 512
    -kernel "$kernel" -append "$cmdline"
    -drive "if=none,id=disk0,format=raw,file=$disk"
    -device "nvme,drive=disk0,serial=ua-lab-disk0"
    -netdev "user,id=net0,restrict=on" -device "virtio-net-pci,netdev=net0"
    -device virtio-rng-pci
    -display none -serial "file:$serial" -monitor none -no-reboot
  )
  [[ $rd == - ]] || qemu+=(-initrd "$rd")
  rm -f "$serial"
  t0=$(now)
  timeout --foreground -k 5 "$timeout_s" "${qemu[@]}" 2>"$serial.qemu" &
  pid=$!
  marker_s=-
  while kill -0 "$pid" 2>/dev/null; do
    if [[ $marker_s == - ]] && grep -aq 'UA-LAB: multi-user reached' "$serial" 2>/dev/null; then
      marker_s=$(secs "$t0" "$(now)")
    fi
    sleep 0.2
  done
  qemu_rc=0
  wait "$pid" || qemu_rc=$?
  exit_s=$(secs "$t0" "$(now)")
}
# The first line of log $1 matching the extended regexp $2, without the carriage return.
line_of() { grep -aEo "$2" "$out/$1.log" | head -n 1 | tr -d '\r' || true; }
uptime_of() { line_of "$1" 'UA-LAB: multi-user reached uptime=[0-9.]+' | sed 's/.*uptime=//'; }

failed=0 results=()
pass() { results+=("case $1 PASS"); log "case $1 PASS: $2"; }
fail() { results+=("case $1 FAIL"); failed=$((failed + 1)); log "case $1 FAIL: $2 (log: $out/$3.log)"; }

# Checks of a boot that must reach multi-user with / from $3 (a regexp).
expect_up() {
  local n=$1 name=$2 root_re=$3 mounts failed_units
  if ((qemu_rc != 0)) || [[ $marker_s == - ]]; then
    fail "$n" "no multi-user marker (qemu exit $qemu_rc after $exit_s s)" "$name"
    return 1
  fi
  mounts=$(line_of "$name" 'UA-LAB: mounts:.*')
  failed_units=$(line_of "$name" 'UA-LAB: failed units:.*')
  if ! [[ $mounts =~ \ /=${root_re}:ext4:ro, ]]; then
    fail "$n" "root not mounted from $root_re read-only: $mounts" "$name"
    return 1
  fi
  if [[ ${failed_units% } != 'UA-LAB: failed units:' ]]; then
    fail "$n" "$failed_units" "$name"
    return 1
  fi
  return 0
}
# Checks of a boot that must end before multi-user, the log matching regexp $3.
expect_down() {
  local n=$1 name=$2 re=$3 evidence
  if [[ $marker_s != - ]]; then
    fail "$n" "reached multi-user" "$name"
    return 1
  fi
  if ((qemu_rc != 0)); then
    fail "$n" "QEMU did not end by itself (exit $qemu_rc after $exit_s s: hung?)" "$name"
    return 1
  fi
  evidence=$(line_of "$name" "$re")
  if [[ -z $evidence ]]; then
    fail "$n" "no line matching '$re' in the serial log" "$name"
    return 1
  fi
  pass "$n" "QEMU ended after $exit_s s without multi-user; log: $evidence"
}

cases=" ${UA_SMOKE_CASES:-0 1 2 3 4 5 6} "
want() { [[ $cases == *" $1 "* ]]; }

base="rootfstype=ext4 console=ttyS0 panic=-1 updateagent.slot=b ua_lab.poweroff"
verity="roothash=$roothash systemd.verity_root_data=PARTLABEL=root-b systemd.verity_root_hash=PARTLABEL=root-b"
vopts="systemd.verity_root_options=hash-offset=$image_size,restart-on-corruption"

# 0: the lab's boot today, without an initramfs.
if want 0; then
  boot 0-no-initrd "$out/disk.img" - "root=PARTLABEL=root-b ro rootwait $base"
  if expect_up 0 0-no-initrd '/dev/nvme0n1p3'; then
    t_none=$marker_s u_none=$(uptime_of 0-no-initrd)
    pass 0 "multi-user after $marker_s s (guest uptime $u_none s); $(line_of 0-no-initrd 'UA-LAB: mounts:.*')"
  fi
fi

# 1: verity.
if want 1; then
  boot 1-verity "$out/disk.img" "$initrd" "$verity $vopts root=/dev/mapper/root ro $base"
  if expect_up 1 1-verity '/dev/mapper/root'; then
    ev=$(line_of 1-verity 'ua-initrd: verity: /dev/mapper/root is dm-[0-9]+, dm uuid CRYPT-VERITY-.*')
    if [[ -z $ev || $ev != *verified* ]]; then
      fail 1 "no verity target in the initramfs's report" 1-verity
    else
      t_verity=$marker_s u_verity=$(uptime_of 1-verity)
      pass 1 "multi-user after $marker_s s (guest uptime $u_verity s); $ev; $(line_of 1-verity 'UA-LAB: mounts:.*')"
    fi
  fi
fi

# 2: plain root through the initramfs.
if want 2; then
  boot 2-plain "$out/disk.img" "$initrd" "root=PARTLABEL=root-b ro $base"
  if expect_up 2 2-plain '/dev/nvme0n1p3'; then
    t_plain=$marker_s u_plain=$(uptime_of 2-plain)
    pass 2 "multi-user after $marker_s s (guest uptime $u_plain s); $(line_of 2-plain 'ua-initrd: root .*')"
  fi
fi

# 3: a wrong root hash (the last digit changed).
if want 3; then
  last=${roothash: -1}
  wrong=${roothash:0:63}$([[ $last == 0 ]] && echo 1 || echo 0)
  boot 3-wrong-hash "$out/disk.img" "$initrd" \
    "${verity/roothash=$roothash/roothash=$wrong} $vopts root=/dev/mapper/root ro $base"
  expect_down 3 3-wrong-hash 'ua-initrd: FATAL: roothash=[0-9a-f]+ does not match the verity tree.*' \
    && log "case 3: $(line_of 3-wrong-hash 'Kernel panic.*')"
fi

# 4: a corrupted block of the init binary, restart-on-corruption.
if want 4; then
  boot 4-corrupt "$out/disk-corrupt.img" "$initrd" "$verity $vopts root=/dev/mapper/root ro $base"
  expect_down 4 4-corrupt 'device-mapper: verity: .*data block [0-9]+ is corrupted' \
    && log "case 4: $(line_of 4-corrupt '(reboot: Restarting|Kernel panic|dm-verity device corrupted).*')"
fi

# 5: the other device spec forms, panic-on-corruption.
if want 5; then
  boot 5-specs "$out/disk.img" "$initrd" "roothash=$roothash systemd.verity_root_data=PARTUUID=$partuuid \
  systemd.verity_root_hash=/dev/nvme0n1p3 systemd.verity_root_options=hash-offset=$image_size,panic-on-corruption \
  root=/dev/mapper/root ro $base"
  if expect_up 5 5-specs '/dev/mapper/root'; then
    pass 5 "multi-user after $marker_s s; $(line_of 5-specs 'ua-initrd: verity: opening.*')"
  fi
fi

# 6: a root that never appears.
if want 6; then
  boot 6-no-root "$out/disk.img" "$initrd" "root=PARTLABEL=no-such ro $base"
  expect_down 6 6-no-root 'ua-initrd: FATAL: root: no device.*' || true
fi

log "boot to the multi-user marker (wall s from QEMU start / guest uptime s):" \
  "no initramfs ${t_none:--} / ${u_none:--}, initramfs plain ${t_plain:--} / ${u_plain:--}," \
  "initramfs + verity ${t_verity:--} / ${u_verity:--}; initrd $(stat -c %s "$initrd") bytes"
if ((failed)); then
  log "FAIL: $failed of ${#results[@]} cases failed: ${results[*]}; logs in $out"
  exit 1
fi
log "PASS: all ${#results[@]} cases (${results[*]}); logs in $out"
