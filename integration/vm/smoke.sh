#!/bin/bash
# integration/vm/smoke.sh [CACHE_DIR]: proves the VM lab end to end, one QEMU at a time.
#   1. builds (or reuses) the cached rootfs and a disk with it in root-a;
#   2. boots it: the guest must reach multi-user on slot a (marker on the serial log),
#      with no failed units, the state partition mounted, and slot a's bytes unchanged
#      afterwards (the root is mounted read-only and never fsck'd);
#   3. A/B flip with the GRUB fragment: a disk with a modified copy (VERSION_ID=12-b) in
#      root-b, grubenv ua_trial=b ua_tries=3 ua_b_ok=1: slot b must boot and GRUB must
#      have counted ua_tries down to 2;
#   4. tries used up (ua_tries=0): GRUB must fall back to a and clear the trial;
#   5. commit (ua_default=b, no trial): slot b boots and grubenv is not written.
# Prints the timings; serial logs stay in CACHE_DIR/smoke/.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${1:-/var/tmp/update-agent-vm}
out=$cache/smoke
mkdir -p "$out"
export UA_VM_TIMEOUT=${UA_VM_TIMEOUT:-240}

log() { printf 'vm/smoke: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# Start and size (bytes) of the partition named $2 on disk $1.
part_range() {
  sfdisk -d "$1" | sed -n "s/.*start= *\([0-9]*\), size= *\([0-9]*\),.*name=\"$2\".*/\1 \2/p" \
    | { read -r s n && echo "$((s * 512)) $((n * 512))"; }
}
part_sum() {
  local at len
  read -r at len < <(part_range "$1" "$2")
  dd if="$1" bs=1M skip="$((at >> 20))" count="$((len >> 20))" status=none | sha256sum | cut -c1-16
}

# Boots $1 once with the serial log in $2; sets boot_marker (s from QEMU start to the
# marker line) and boot_total (s to QEMU exit).
boot_once() {
  local disk=$1 serial=$2 t0 pid rc=0
  rm -f "$serial"
  t0=$(now)
  "$here/boot.sh" "$disk" "$serial" 2>"$serial.qemu" &
  pid=$!
  boot_marker=-
  while kill -0 "$pid" 2>/dev/null; do
    if [[ $boot_marker == - ]] && grep -aq 'UA-LAB: multi-user reached' "$serial" 2>/dev/null; then
      boot_marker=$(secs "$t0" "$(now)")
    fi
    sleep 0.2
  done
  wait "$pid" || rc=$?
  boot_total=$(secs "$t0" "$(now)")
  ((rc == 0)) || fail "qemu exited with $rc ($(cat "$serial.qemu")); see $serial"
  log "$(basename "$serial"): multi-user marker after ${boot_marker} s, qemu exit after ${boot_total} s"
}
# The first marker line starting with $2 (kernel messages may share its line).
marker() { grep -ao "UA-LAB: $2.*" "$1" | head -n 1 | tr -d '\r'; }
expect_boot() {
  local serial=$1 slot=$2 version=$3 line
  grep -aq 'UA-LAB: multi-user reached' "$serial" || fail "no multi-user marker in $serial"
  line=$(marker "$serial" cmdline)
  [[ $line == *"root=PARTLABEL=root-$slot updateagent.slot=$slot "* ]] \
    || fail "expected slot $slot, got: $line"
  line=$(marker "$serial" 'multi-user reached')
  [[ $line == *" version=$version" ]] || fail "expected VERSION_ID $version, got: $line"
  line=$(marker "$serial" 'failed units:')
  [[ $line == 'UA-LAB: failed units:' || $line == 'UA-LAB: failed units: ' ]] \
    || fail "failed units: $line"
  line=$(marker "$serial" 'mounts:')
  [[ $line == *"/var/lib/update-agent=/dev/nvme0n1p4:ext4:"* ]] || fail "state not mounted: $line"
  [[ $line == *" /=/dev/nvme0n1p"[23]":ext4:ro,"* ]] || fail "root not read-only: $line"
}
env_of() { "$here/grubenv.sh" "$1" list | tr '\n' ' '; }

# ---- 1. Build ---------------------------------------------------------------------
t=$(now)
"$here/build-rootfs.sh" "$cache"
t_rootfs=$(secs "$t" "$(now)")
t=$(now)
# The first guest also reports where its boot time went (ua_lab.analyze).
UA_VM_CMDLINE_EXTRA=ua_lab.analyze "$here/make-disk.sh" "$out/a.img" "$cache/rootfs.tar"
t_disk=$(secs "$t" "$(now)")

# ---- 2. Boot slot a ---------------------------------------------------------------
sum_before=$(part_sum "$out/a.img" root-a)
boot_once "$out/a.img" "$out/boot-a.log"
expect_boot "$out/boot-a.log" a 12
sum_after=$(part_sum "$out/a.img" root-a)
[[ $sum_before == "$sum_after" ]] || fail "slot a changed during the boot"
log "boot a: multi-user after ${boot_marker} s, qemu exit after ${boot_total} s (guest uptime:" \
  "$(marker "$out/boot-a.log" 'multi-user reached' | sed 's/.*uptime=\([0-9.]*\).*/\1/') s)"
log "$(marker "$out/boot-a.log" 'mounts:')"
log "$(marker "$out/boot-a.log" 'addresses:')"
log "$(marker "$out/boot-a.log" 'startup:')"
log "$(marker "$out/boot-a.log" 'slowest:')"
t_boot_a=$boot_marker t_exit_a=$boot_total

# ---- 3. Trial of slot b --------------------------------------------------------------
tree_b=$(mktemp -d "$out/.tree-b.XXXXXX")
trap 'rm -rf "$tree_b"' EXIT
tar -C "$tree_b" --numeric-owner --xattrs --xattrs-include='*' -xf "$cache/rootfs.tar"
# /etc/os-release is a symlink to ../usr/lib/os-release: edit the target.
sed -i 's/^VERSION_ID=.*/VERSION_ID="12-b"/' "$tree_b/usr/lib/os-release"
"$here/make-disk.sh" "$out/ab.img" "$cache/rootfs.tar" "$tree_b"
rm -rf "$tree_b"
"$here/grubenv.sh" "$out/ab.img" set ua_default=a ua_trial=b ua_tries=3 ua_a_ok=1 ua_b_ok=1
log "before trial: $(env_of "$out/ab.img")"
boot_once "$out/ab.img" "$out/boot-b-trial.log"
expect_boot "$out/boot-b-trial.log" b 12-b
env=$(env_of "$out/ab.img")
log "after trial:  $env"
[[ $env == *"ua_trial=b "*"ua_tries=2 "* ]] || fail "GRUB did not count the trial down: $env"
grep -aq 'update-agent: trial boot of slot b, 2 tries left' "$out/boot-b-trial.log" \
  || fail "no GRUB trial message in the serial log"
t_boot_b=$boot_marker

# ---- 4. Tries used up: fall back to a ---------------------------------------------------
"$here/grubenv.sh" "$out/ab.img" set ua_tries=0
boot_once "$out/ab.img" "$out/boot-b-spent.log"
expect_boot "$out/boot-b-spent.log" a 12
env=$(env_of "$out/ab.img")
log "after spent trial: $env"
[[ $env == *"ua_trial= ua_tries=0 "* ]] || fail "GRUB did not clear the spent trial: $env"

# ---- 5. Committed b boots without writing grubenv ------------------------------------
"$here/grubenv.sh" "$out/ab.img" set ua_default=b ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1
boot_once "$out/ab.img" "$out/boot-b-default.log"
expect_boot "$out/boot-b-default.log" b 12-b
# No trial pending: the fragment must not have saved anything.
env=$(env_of "$out/ab.img")
[[ $env == *"ua_default=b ua_trial= ua_tries=0 "* ]] || fail "grubenv changed: $env"

log "PASS: rootfs ${t_rootfs} s, disk ${t_disk} s, boot a to multi-user ${t_boot_a} s" \
  "(exit ${t_exit_a} s), trial b to multi-user ${t_boot_b} s; logs in $out"
