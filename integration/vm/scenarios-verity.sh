# shellcheck shell=bash
# integration/vm/scenarios-verity.sh: the VM lab's dm-verity scenarios: 8 (a staged slot
# changed before its reboot) and 9 (the committed slot changed between two boots; the
# default's guard).
# Sourced by lab.sh after its set-up and lab-helpers.sh; each scenario is a function
# scenario_N that starts where the scenario before it ended and leaves its results in
# the globals the later ones read (as the scenarios of scenarios-kexec.sh do).

# change_systemd_block SLOT: with the VM down, flips one bit in the first block of
# systemd's binary in SLOT (which holds 8.0), a block every boot reads: where it sits in
# 8.0's image, then on the disk (the slot partition's start).
change_systemd_block() {
  local blk start at
  blk=$(debugfs -R "bmap /usr/lib/systemd/systemd 0" "$w/8.0.img" 2>/dev/null)
  [[ $blk =~ ^[0-9]+$ ]] || fail "cannot find /usr/lib/systemd/systemd in 8.0.img"
  start=$(sfdisk -d "$w/disk.img" | sed -n "s/.*start= *\([0-9]*\),.*name=\"root-$1\".*/\1/p")
  at=$((start * 512 + blk * 4096 + 100))
  python3 -c 'import sys
p, at = sys.argv[1], int(sys.argv[2])
with open(p, "r+b") as f:
    f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0x20]))' "$w/disk.img" "$at"
  log "flipped one bit of byte $at of the disk (slot $1, block $blk of 8.0's image)"
}

scenario_8() {
  say "scenario 8 (verity): 8.0 staged, one byte of its slot changed before the reboot"
  j=$(status_json)
  from=$(field "['running_version']" <<<"$j")
  other=$(field "['other']['name']" <<<"$j")
  ctl update --version 8.0 --wait
  reboot_down
  change_systemd_block "$other"
  say "boots: each try of 8.0 hits the verity error and restarts; then $from again"
  boot_until_api 5
  j=$(status_json)
  ctl status
  grep -a -h 'device-mapper: verity: .*corrupted' "$w"/serial-*.log | head -n 1 \
    || fail "no dm-verity corruption on any trial's console"
  [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "8.0 was not rolled back: $j"
  [[ $(field "['running_version']" <<<"$j") == "$from" ]] || fail "the node does not run $from: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q 'failed its integrity check' \
    || fail "the reason does not name the integrity failure: $j"
  printf 'scenario 8 (verity, %s): passed: a changed block of the staged slot was caught by dm-verity at boot, the node fell back to %s and says "%s"\n' \
    "$bootloader" "$from" "$(field "['last_result']['reason']" <<<"$j" | cut -c1-90)"
}

scenario_9() {
  say "scenario 9 (verity): the committed release's slot changes between two boots"
  # A committed release that stops booting (here a changed block of systemd under
  # dm-verity, which restarts the node at every boot) must not loop: the default's
  # guard runs out and the bootloader boots the release before it.
  j=$(status_json)
  from=$(field "['running_version']" <<<"$j")
  ctl update --version 8.0 --wait
  reboot_up
  j=$(status_json)
  [[ $(field "['state']" <<<"$j") == committed && $(field "['running_version']" <<<"$j") == 8.0 ]] \
    || fail "8.0 was not committed: $j"
  slot=$(field "['booted']['name']" <<<"$j")
  reboot_down --force
  # GRUB: ua_boots=3 in grubenv; systemd-boot: the default's entry renamed
  # …-SLOT-8.0@default+3.conf, counted by the loader like a trial.
  if [[ $bootloader == grub ]]; then
    grep -q '^ua_boots=3$' <<<"$("$here/grubenv.sh" "$w/disk.img" list)" \
      || fail "the committed default is not guarded: $("$here/grubenv.sh" "$w/disk.img" list | tr '\n' ' ')"
  else
    grep -q -- "-$slot-8\.0@default+3\.conf\$" <<<"$(esp_entries)" \
      || fail "the committed default is not guarded: $(esp_entries | tr '\n' ' ')"
  fi
  change_systemd_block "$slot"
  say "boots: each boot of 8.0 hits the verity error and restarts; after 3 the bootloader boots $from"
  first=$((boots + 1))
  boot_until_api 5
  j=$(status_json)
  ctl status
  tried=$(grep -a -l 'device-mapper: verity: .*corrupted' $(seq -f "$w/serial-%g.log" "$first" "$boots") 2>/dev/null | wc -l)
  ((tried == 3)) || fail "8.0 was booted $tried times with the verity error, not 3"
  [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "8.0 was not rolled back: $j"
  [[ $(field "['running_version']" <<<"$j") == "$from" ]] || fail "the node does not run $from: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q "slot $slot stopped booting.*failed its integrity check" \
    || fail "the reason does not name the stopped slot and the integrity failure: $j"
  printf 'scenario 9 (verity, %s): passed: a changed block of the committed slot restarted 3 boots in a row, the bootloader fell back to %s and the node says "%s"\n' \
    "$bootloader" "$from" "$(field "['last_result']['reason']" <<<"$j" | cut -c1-100)"
}
