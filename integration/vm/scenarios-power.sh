# shellcheck shell=bash
# integration/vm/scenarios-power.sh: the VM lab's power-cut scenarios: 4 (cuts while
# frames download; the staging resumes from the bytes kept) and 5 (cuts during the
# bootloader flip and the commit).
# Sourced by lab.sh after its set-up and lab-helpers.sh; each scenario is a function
# scenario_N that starts where the scenario before it ended and leaves its results in
# the globals the later ones read (as the scenarios of scenarios-kexec.sh do).

scenario_4() {
  say "scenario 4: 2.0 -> 5.0, power cuts every $cut_every s while its frames download"
  delta5=$w/www/$(cd "$w/www" && ls 5.0.from-*.uap)
  payload=$(stat -c %s "$delta5")
  largest=$("$updatectl_host" bundle inspect "$delta5" --ops |
    awk '$1 ~ /^[0-9]+$/ && $2 ~ /^(DATA|PATCH)$/ && $NF > m { m = $NF } END { print m + 0 }')
  # The point of the scenario: no frame fits between two cuts, so only the bytes
  # kept across power cuts (STATE_DIR/partial) let the staging finish.
  awk -v f="$largest" -v r="$lab_rate" -v c="$cut_every" 'BEGIN { exit !(f / r > c) }' \
    || fail "the largest frame ($largest bytes) arrives within $cut_every s at $lab_rate bytes/s"
  lines=$(wc -l <"$w/served.log")
  op=$(ctl update --version 5.0 | sed -n 's/^started operation //p')
  [[ -n $op ]] || fail "no operation id"
  # A cut $cut_every s into each boot's download of a frame (after the first range
  # request for a frame, not the head, starts in that boot), as long as some byte of
  # the payload has not yet left the server: once all of it has, what is left is
  # writing, and this scenario is about the download. (Timing the cuts from the
  # agent's start instead cut some boots before they fetched anything: under TCG
  # decompressing and writing a kept 16 MiB frame can take longer than the interval.)
  cuts=0
  while :; do
    arrived=$(python3 - "$w/served.log" <<'PY'
import sys
spans = sorted((int(s), int(s) + int(n)) for p, s, e, n in (l.split() for l in open(sys.argv[1]))
               if "/5.0." in p and n != "-")
end = 0
for a, b in spans:
    if a > end:
        break
    end = max(end, b)
print(end)
PY
)
    ((arrived < payload)) || break
    deadline=$((SECONDS + 400))
    until awk -v n="$lines" 'NR > n && $1 ~ /\/5\.0\./ && $2 > 0 && $4 == "-" { f = 1 } END { exit !f }' "$w/served.log"; do
      ((SECONDS < deadline)) || fail "no frame of 5.0 requested in boot $boots (serial log: $w/serial-$boots.log)"
      kill -0 "$qemu_pid" 2>/dev/null || fail "the VM stopped before it fetched (serial log: $w/serial-$boots.log)"
      sleep 0.2
    done
    sleep "$cut_every"
    kill -9 "$(cat "$w/qemu.pid")"
    wait_down
    cuts=$((cuts + 1))
    log "power cut $cuts, $cut_every s into the download (the first $arrived of $payload bytes had arrived before this boot)"
    ((cuts <= 12)) || fail "still downloading after $cuts power cuts"
    esp_whole "cut $cuts mid-download"
    sleep 0.5 # the server logs the cut response once its write fails
    lines=$(wc -l <"$w/served.log")
    boot
  done
  ((cuts >= 2)) || fail "only $cuts power cuts landed while the frames downloaded"
  wait_api
  ctl watch "$op"
  j=$(status_json)
  [[ $(field "['state']" <<<"$j") == armed ]] || fail "5.0 is not armed after the resume: $j"
  served=$(awk '$1 ~ /5\.0\./ && $4 != "-" { s += $4 } END { print s + 0 }' "$w/served.log")
  ratio=$(awk -v a="$served" -v b="$payload" 'BEGIN { printf "%.2f", a / b }')
  printf 'scenario 4: %d power cuts every %s s; largest frame %s bytes (%.1f s at %s bytes/s); served %s bytes for a %s-byte payload (%s x)\n' \
    "$cuts" "$cut_every" "$largest" "$(awk -v f="$largest" -v r="$lab_rate" 'BEGIN { print f / r }')" "$lab_rate" "$served" "$payload" "$ratio"
  # What arrived before a cut is not fetched again; a cut costs the bytes not yet
  # fsynced (at most a MiB per frame in flight) and the payload's head.
  awk -v a="$served" -v b="$payload" 'BEGIN { exit !(a < 1.5 * b) }' \
    || fail "served $served bytes for a $payload-byte payload: kept bytes were fetched again"
  reboot_up
  j=$(status_json)
  ctl status
  [[ $(field "['state']" <<<"$j") == committed && $(field "['running_version']" <<<"$j") == 5.0 ]] \
    || fail "5.0 was not committed: $j"
}

scenario_5() {
  # A flip is one write (grubenv) or one rename (a systemd-boot entry) and its
  # fsync, then the state file; a commit is the same in the gate. Milliseconds, and
  # nothing outside the VM can stop the guest inside them. So the cuts are timed
  # from what the agent logs just before each (the guest's journal is on the serial
  # console), at a sweep of delays after that line (UA_LAB_FLIP_CUTS,
  # UA_LAB_COMMIT_CUTS, in seconds; a kill lands within a few ms of its time), one
  # cut per boot. They land before the write, between it and the state, or after
  # both; the next boot shows which (the slot the bootloader chose, what the gate
  # found). A cut before the flip is followed by the agent's resume arming again at
  # the next start, which the next delay cuts; a cut in the commit, by the gate
  # committing again at the next boot, which the next delay cuts. Every boot must
  # run a verified release (the old one, or the new one on trial), the agent must
  # say armed on the old slot once the flip is through, and 6.0 must end committed.
  j=$(status_json)
  from=$(field "['running_version']" <<<"$j")
  from_slot=$(field "['booted']['name']" <<<"$j")
  [[ $from_slot == a ]] && new_slot=b || new_slot=a
  say "scenario 5: $from -> 6.0 with power cuts during the bootloader flip and during the commit"
  read -r -a flip_cuts <<<"${UA_LAB_FLIP_CUTS:-$flip_cuts_default}"
  read -r -a commit_cuts <<<"${UA_LAB_COMMIT_CUTS:-0 0.05}"
  from_byte=$(stat -c %s "$w/serial-$boots.log")
  ctl update --version 6.0 >/dev/null
  cuts=()
  fi_=0
  ci=0
  while :; do
    slot=$(booted_slot)
    if [[ $slot == "$from_slot" ]] && ((ci == 0 && fi_ < ${#flip_cuts[@]})); then
      what="flip cut $((fi_ + 1)) at +${flip_cuts[fi_]} s"
      r=$(cut_on "arming the bootloader: 6.0" "${flip_cuts[fi_]}" "" "$from_byte")
      fi_=$((fi_ + 1))
    elif [[ $slot == "$from_slot" ]]; then
      # The flip went through: 6.0 is armed (once the resumed operation ends), the
      # old release runs. Then the trial.
      ((ci == 0)) || fail "slot $slot ($from) booted after a cut in the commit"
      wait_api 300
      deadline=$((SECONDS + 180))
      until j=$(status_json) && [[ $(field "['state']" <<<"$j") == armed ]]; do
        ((SECONDS < deadline)) || fail "after the flip's cuts the agent is not armed: $j"
        sleep 1
      done
      [[ $(field "['running_version']" <<<"$j") == "$from" ]] || fail "armed, but not running $from: $j"
      log "6.0 armed on slot $new_slot, $from runs on slot $slot; rebooting into the trial"
      ctl status
      reboot_down
      boot
      continue
    elif ((ci < ${#commit_cuts[@]})); then
      what="commit cut $((ci + 1)) at +${commit_cuts[ci]} s"
      r=$(cut_on "committing: making the trial slot the default" "${commit_cuts[ci]}" "serving the update API")
      ci=$((ci + 1))
      if [[ $r == stop ]]; then
        log "$what: no commit in this boot (the cut before came after the state said committed)"
        break
      fi
    else
      break
    fi
    [[ $r == cut ]] || fail "$what: $r (serial log: $w/serial-$boots.log)"
    wait_down
    esp_whole "$what"
    boot
    from_byte=0
    slot=$(booted_slot)
    # What the cut hit, as this boot shows it.
    if [[ $slot == "$from_slot" ]]; then
      [[ $what == flip* ]] || fail "$what: slot $slot ($from) booted, not the committing slot $new_slot"
      hit="before the flip reached the disk: $from boots on slot $slot and the agent arms again"
    else
      wait_console "the bootloader was armed but the state still said staged\|trial boot: running the health checks\|serving the update API"
      if on_console "the bootloader was armed but the state still said staged"; then
        hit="after the flip, before the state: 6.0 boots on slot $slot and the gate takes it as armed"
      elif [[ $what == flip* ]]; then
        hit="after the flip and the state: 6.0 boots on slot $slot on trial"
      elif on_console "trial boot: running the health checks"; then
        hit="before the state said committed: 6.0 boots on slot $slot and the gate judges it again"
      else
        hit="after the state said committed: a normal boot of 6.0 on slot $slot"
      fi
    fi
    if on_console "share clusters"; then
      hit+="; fsck.vfat at boot repaired a torn rename: $({ tr -d '\000\r' <"$w/serial-$boots.log" | grep -a -o 'Truncating [a-z]* to [0-9]* bytes' | sed -n 1p; } || true)"
    fi
    log "$what: $hit"
    cuts+=("$what: $hit")
  done
  wait_api
  j=$(status_json)
  ctl status
  ctl history | head -4
  [[ $(field "['state']" <<<"$j") == committed && $(field "['running_version']" <<<"$j") == 6.0 \
    && $(field "['booted']['name']" <<<"$j") == "$new_slot" ]] || fail "6.0 was not committed on slot $new_slot: $j"
  ((${#cuts[@]} >= 2)) || fail "fewer than two power cuts happened"
  printf 'scenario 5: %s\n' "${cuts[@]}"
}
