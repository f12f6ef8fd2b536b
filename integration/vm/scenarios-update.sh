# shellcheck shell=bash
# integration/vm/scenarios-update.sh: the VM lab's update scenarios: 1 (update, commit,
# downtime next to a plain reboot), 2 (failed health), 3 (a kernel that never reaches
# user space), 6 (manual rollback), 7 (key rotation). What each does is in lab.sh's
# header.
# Sourced by lab.sh after its set-up and lab-helpers.sh; each scenario is a function
# scenario_N that starts where the scenario before it ended and leaves its results in
# the globals the later ones read (as the scenarios of scenarios-kexec.sh do).

scenario_1() {
  say "a plain reboot of the same VM, for comparison (request to the agent answering)"
  t=$(date +%s.%N)
  reboot_up --force
  plain=$(secs_since "$t")
  plain_phases=$(phases "$t" "$(date +%s.%N)")
  plain_mu=$(uptime_of "UA-LAB: multi-user reached")
  plain_api=$(uptime_of "serving the update API")
  log "plain reboot: $plain s (multi-user at $plain_mu s of uptime)"
  say "scenario 1: 1.0 -> 2.0 staged over gRPC while the node runs"
  delta=$(cd "$w/www" && ls 2.0.from-*.uap)
  t0=$(date +%s.%N)
  ctl update --url "http://10.0.2.100:8080/$delta" --wait
  t1=$(date +%s.%N)
  ctl status
  say "reboot into the trial (updatectl reboot; QEMU exits, and starts again)"
  t2=$(date +%s.%N)
  reboot_up
  j=$(status_json)
  t3=$(date +%s.%N)
  update_phases=$(phases "$t2" "$t3")
  ctl status
  [[ $(field "['state']" <<<"$j") == committed ]] || fail "2.0 was not committed: $j"
  [[ $(field "['running_version']" <<<"$j") == 2.0 && $(field "['booted']['name']" <<<"$j") == b ]] \
    || fail "the node does not run 2.0 on slot b: $j"
  trial_log="$w/serial-$boots.log"
  # 2.0 runs from its dm-verity tree: the kernel got the root hash, the initramfs
  # set the device up, and the agent found its slot under it.
  on_console "mounts: /=/dev/mapper/root:" || fail "2.0's root is not the dm-verity device (serial log: $trial_log)"
  [[ $(field "['booted']['verity']" <<<"$j") == True ]] || fail "status does not say the root is verity-protected: $j"
  ssh_status=$(grep -a 'UA-LAB' "$w/serial-$boots.log" | tail -3 || true)
  printf '%s\n' "$ssh_status"
  # Where the trial boot's time went, from the guest's journal on the console.
  printf 'scenario 1: guest uptime: multi-user %s s (plain boot %s s); gate checks from %s s, passed %s s, committed %s s; API %s s (plain boot %s s)\n' \
    "$(uptime_of "UA-LAB: multi-user reached")" "$plain_mu" "$(uptime_of "trial boot: running the health checks")" \
    "$(uptime_of "health checks done in")" "$(uptime_of "trial boot healthy; committed")" "$(uptime_of "serving the update API")" \
    "$plain_api"
  tr -d '\000\r' <"$trial_log" | grep -a -E 'update-agent\[[0-9]+\]: (unit |health check|commit)' || true
  # A second plain reboot after the update: this machine's guests now and then run
  # ~1.5x slower for a whole boot (every step of it, host-side steal), so the
  # update is compared with the mean of a plain reboot before it and one after.
  say "a second plain reboot, after the update"
  t=$(date +%s.%N)
  reboot_up --force
  plain2=$(secs_since "$t")
  plain2_phases=$(phases "$t" "$(date +%s.%N)")
  log "phases: plain reboot 1: $plain_phases; update: $update_phases; plain reboot 2: $plain2_phases"
  log "plain reboot: $plain2 s (multi-user at $(uptime_of "UA-LAB: multi-user reached") s of uptime)"
  awk -v a="$t0" -v b="$t1" -v c="$t2" -v d="$t3" -v p="$plain" -v q="$plain2" 'BEGIN {
    printf "scenario 1: StartUpdate to armed %.1f s; update downtime (reboot request to committed and answering) %.1f s; plain reboots %.1f s and %.1f s; ratio %.2f\n", b - a, d - c, p, q, 2 * (d - c) / (p + q) }'
}

scenario_2() {
  say "scenario 2: 2.0 -> 3.0, whose required unit fails after start"
  ctl check --version 3.0
  ctl update --version 3.0 --wait
  reboot_down
  say "boot: the 3.0 trial; the health gate fails it and reboots the node itself"
  boot
  wait_down
  grep -a -E 'update-agent|rolling back|FAIL' "$w/serial-$boots.log" | tail -5 || true
  say "boot: back on 2.0"
  boot
  wait_api
  j=$(status_json)
  ctl status
  ctl history
  [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "3.0 was not rolled back: $j"
  [[ $(field "['running_version']" <<<"$j") == 2.0 ]] || fail "the node does not run 2.0: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q 'ua-lab-worker.service' \
    || fail "the reason does not name the failed unit: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q 'cannot open /var/lib/worker/db' \
    || fail "the reason does not carry the unit's output: $j"
}

scenario_3() {
  say "scenario 3: 2.0 -> 4.0, whose kernel finds no init"
  ctl update --version 4.0 --wait
  reboot_down
  say "boots: $bootloader tries 4.0 (each try a kernel panic), then falls back to 2.0"
  boot_until_api 5
  j=$(status_json)
  ctl status
  [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "4.0 was not rolled back: $j"
  [[ $(field "['running_version']" <<<"$j") == 2.0 ]] || fail "the node does not run 2.0: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q 'did not boot' \
    || fail "the reason does not say the new slot did not boot: $j"
  # Why, in the kernel's words: the initramfs's error and the panic after it, kept in
  # a UEFI variable by efi_pstore across the restart, moved by systemd-pstore at 2.0's
  # boot and read by the agent (docs/security.md, "The kernel's crash records").
  field "['last_result']['reason']" <<<"$j" \
    | grep -q "the kernel's last words.*no /sbin/init on the root file system.*Kernel panic - not syncing" \
    || fail "the reason does not carry the kernel's last words (pstore): $j"
  printf 'scenario 3 (%s): passed: 4.0 panicked at every try, the node fell back to 2.0 and says "%s"\n' \
    "$bootloader" "$(field "['last_result']['reason']" <<<"$j" | cut -c1-400)"
}

scenario_6() {
  say "scenario 6: manual rollback over the API, 5.0 -> 2.0"
  ctl rollback
  reboot_up
  j=$(status_json)
  ctl status
  [[ $(field "['state']" <<<"$j") == rolled_back && $(field "['running_version']" <<<"$j") == 2.0 ]] \
    || fail "the node did not go back to 2.0: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q 'manual rollback from 5.0 to 2.0' \
    || fail "the reason does not say it was a manual rollback: $j"
}

scenario_7() {
  say "scenario 7: the release key is rotated; 7.0 by the old key refused, by the new one committed"
  mkdir -p "$w/www/root"
  r2=$w/www/root/2.json
  "$updatectl_host" bundle root next "$w/root-1.json" --out "$r2" >/dev/null
  old_fp=$("$updatectl_host" bundle root verify "$w/root-1.json" | awk '$1 == "releases" { print $NF }')
  for role in releases channels; do
    "$updatectl_host" bundle root add-key "$r2" --role "$role" --key "$w/keys/release2.pub" >/dev/null
    "$updatectl_host" bundle root remove-key "$r2" --role "$role" --fingerprint "$old_fp" >/dev/null
  done
  "$updatectl_host" bundle root sign "$r2" --key "$w/keys/root1.key" --key "$w/keys/root2.key"
  "$updatectl_host" bundle root verify "$r2" --previous "$w/root-1.json"
  old=$(cd "$w/www/old" && ls 7.0.from-*.uap)
  if ctl check --url "http://10.0.2.100:8080/old/$old" >"$w/check-old.txt" 2>&1; then
    fail "7.0 signed by the removed key was accepted: $(cat "$w/check-old.txt")"
  fi
  cat "$w/check-old.txt"
  grep -q 'signed only by keys this node does not trust' "$w/check-old.txt" \
    || fail "the refusal does not name the untrusted key: $(cat "$w/check-old.txt")"
  ctl update --version 7.0 --wait
  reboot_up
  j=$(status_json)
  ctl status
  [[ $(field "['state']" <<<"$j") == committed && $(field "['running_version']" <<<"$j") == 7.0 ]] \
    || fail "7.0 signed by the new key was not committed: $j"
}
