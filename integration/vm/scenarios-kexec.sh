# shellcheck shell=bash
# integration/vm/scenarios-kexec.sh: the VM lab's kexec scenarios (issue 16), sourced
# by lab.sh after its helpers; `lab.sh [--bootloader B] 1 k3 k2 kh k1` runs them after
# scenario 1, each starting where the last ended (2.0 running), so no disk is made
# twice and scenario 1's plain reboots are the comparison of the same run.
#
#   k3  2.0 -> 4.0 (no init: the kernel panics) by kexec: the kexec'd kernel panics,
#       panic=N (agent.toml kexec_panic_secs) reboots it through the firmware, the
#       bootloader's counter (one try already taken by the agent) runs out, 2.0 again
#   k2  2.0 -> 3.0 (a required unit fails) by kexec: the gate fails the trial and
#       reboots through the firmware into 2.0
#   k1  2.0 -> 6.0 (or, last in test.sh's sequence, 7.0 -> 8.0) by kexec: update, gate,
#       commit; the downtime next to scenario 1's
#       plain firmware reboots and its update by firmware reboot ("ratio")
#   kh  2.0 -> 4.1 (its init blocks forever: no panic) by kexec: the hardware watchdog
#       (QEMU's i6300esb) that systemd left running across the kexec with the agent's
#       KExecWatchdogUSec (agent.toml kexec_watchdog_secs) resets the machine; the
#       firmware boots that follow count the tries left (the lab's initramfs arms the
#       watchdog at each of them, so each hangs only until it expires), then 2.0
# k3, k2 and kh start from 2.0 and end on it; k1 leaves 6.0 running, so it goes last.
# test.sh runs `1 k3 k2 kh 2 3 4 6 5 7 8 9 k1`: the kexec scenarios share scenario 1's
# disk and boots, and k1 ends the sequence on 8.0.
#
# A kexec is not a QEMU exit: the new kernel starts in the same QEMU run, on the same
# serial log, so a kexec is seen as one more "Linux version" line there.

# kernels_seen: how many kernels this QEMU run's console has shown start.
kernels_seen() {
  { tr -d '\000' <"$w/serial-$boots.log" | grep -acF "Linux version"; } || true
}

# jumps_seen: how many kexec jumps this QEMU run's console has shown (the old
# kernel's last line before the purgatory runs).
jumps_seen() {
  { tr -d '\000' <"$w/serial-$boots.log" | grep -acF "kexec_core: Starting new kernel"; } || true
}

# kexec_down: asks for a reboot by kexec; returns 0 once the next kernel starts in
# the same QEMU run (kexec_at: when, host time; jump_at: when the old kernel said it
# jumps, so the way down splits into the old system's part and the purgatory's and
# the new kernel's before its console), 1 when QEMU exited instead (the agent fell
# back to a firmware reboot).
kexec_down() {
  local before jumps
  before=$(kernels_seen)
  jumps=$(jumps_seen)
  jump_at=""
  ctl reboot --kexec || log "the reboot call got no answer (the node went down first)"
  until (($(kernels_seen) > before)); do
    if [[ -z $jump_at ]] && (($(jumps_seen) > jumps)); then
      jump_at=$(date +%s.%N)
    fi
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      wait_down
      return 1
    fi
    sleep 0.05
  done
  kexec_at=$(date +%s.%N)
  [[ -n $jump_at ]] || jump_at=$kexec_at
  log "kexec: the next kernel started $(secs_since "$kexec_t") s after the request"
}

# way_down: the kexec's way down in the old kernel's clock (its console): the request
# to the image loaded (the agent's own figures: the files opened, the bytes the kernel
# read and hashed), then to the jump (the watchdog call, `systemctl kexec`, services
# stopped, systemd-shutdown).
way_down() {
  local r l j f
  r=$(uptime_of "reboot requested over the API" 2)
  l=$(uptime_of "kernel loaded: files opened" 2)
  j=$(uptime_of "kexec_core: Starting new kernel" 2)
  f=$({ kernel_log 2 | sed -n 's/.*files opened in \([0-9]*\) ms, \([0-9]*\) bytes loaded in \([0-9]*\) ms.*/\1 \2 \3/p' | sed -n 1p; } || true)
  awk -v r="$r" -v l="$l" -v j="$j" -v f="$f" 'BEGIN {
    if (r == "" || l == "" || j == "" || f == "") { printf "old kernel: no split (a milestone is missing on the console)"; exit }
    split(f, x, " ")
    printf "old kernel: request to loaded %.1f s (files opened %d ms, %.1f MB loaded in %d ms), to the jump %.1f s", l - r, x[1], x[2] / 1e6, x[3], j - l }'
}

# kexec_trial VERSION WHAT: stages VERSION, reboots by kexec, and waits for the kexec'd
# trial to end in a firmware reboot (QEMU exits), saying WHAT happens meanwhile.
kexec_trial() {
  ctl update --version "$1" --wait
  kexec_t=$(date +%s.%N)
  kexec_down || fail "no kexec: the node rebooted through the firmware (serial log: $w/serial-$boots.log)"
  say "$2"
  wait_down
}

# back_on_2 VERSION WHY: VERSION was rolled back, 2.0 runs, the reason matches WHY.
back_on_2() {
  local j
  j=$(status_json)
  ctl status
  [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "$1 was not rolled back: $j"
  [[ $(field "['running_version']" <<<"$j") == 2.0 ]] || fail "the node does not run 2.0: $j"
  field "['last_result']['reason']" <<<"$j" | grep -q "$2" \
    || fail "the reason does not say '$2': $j"
}

kexec_scenario() {
  local j from
  j=$(status_json)
  from=$(field "['running_version']" <<<"$j")
  # k1 also runs at the end of the whole sequence (test.sh: after scenario 9, 7.0
  # runs and 8.0 from 7.0 is published), the others only from 2.0.
  if [[ $1 == k1 && $from == 7.0 ]]; then
    kexec_update 7.0 8.0
    return
  fi
  [[ $from == 2.0 ]] || fail "kexec scenario $1 starts from 2.0; the node runs $from"
  case $1 in
    k1) kexec_update 2.0 6.0 ;;
    k2)
      say "kexec scenario 2: 2.0 -> 3.0 by kexec, whose required unit fails"
      kexec_trial 3.0 "the kexec'd 3.0 trial: the gate fails it and reboots through the firmware"
      on_console "updateagent.boot=kexec" || fail "the trial was not the kexec'd kernel"
      boot
      wait_api
      back_on_2 3.0 'ua-lab-worker.service'
      printf 'kexec scenario 2 (%s): passed: 3.0 booted by kexec failed its health check, the node rebooted through the firmware into 2.0\n' "$bootloader"
      ;;
    k3)
      say "kexec scenario 3: 2.0 -> 4.0 by kexec, whose kernel finds no init"
      kexec_trial 4.0 "the kexec'd 4.0 kernel panics; panic=N reboots it through the firmware"
      on_console "Kernel panic" || fail "the kexec'd kernel did not panic (serial log: $w/serial-$boots.log)"
      say "firmware boots: the bootloader counts the tries left, then falls back to 2.0"
      boot_until_api 6
      back_on_2 4.0 'did not boot'
      printf 'kexec scenario 3 (%s): passed: 4.0 by kexec panicked, the firmware and the try counter brought 2.0 back\n' "$bootloader"
      ;;
    kh)
      local t_hang
      say "kexec scenario hang: 2.0 -> 4.1 by kexec, whose init blocks forever (no panic)"
      ctl update --version 4.1 --wait
      kexec_t=$(date +%s.%N)
      kexec_down || fail "no kexec: the node rebooted through the firmware (serial log: $w/serial-$boots.log)"
      say "the kexec'd 4.1 hangs; only the hardware watchdog armed before the kexec can end this boot"
      wait_down
      t_hang=$(awk -v k="$kexec_at" -v d="$down_at" 'BEGIN { printf "%.1f", d - k }')
      on_console "UA-LAB: release 4.1: init hangs" || fail "the kexec'd 4.1 did not reach its hanging init (serial log: $w/serial-$boots.log)"
      on_console "i6300esb already running" || fail "the kexec'd kernel's initramfs did not find the watchdog running (serial log: $w/serial-$boots.log)"
      ! on_console "Kernel panic" || fail "the kexec'd 4.1 panicked: this scenario is about a hang (serial log: $w/serial-$boots.log)"
      log "the watchdog reset the hung 4.1 $t_hang s after the kexec"
      say "firmware boots: each try of 4.1 hangs until the watchdog resets it; then 2.0"
      boot_until_api 6
      back_on_2 4.1 'did not boot'
      printf 'kexec scenario hang (%s): passed: 4.1 by kexec hung in its init, the hardware watchdog armed before the kexec reset it %s s after the kexec, and the try counter brought 2.0 back\n' "$bootloader" "$t_hang"
      ;;
    *) fail "unknown kexec scenario $1" ;;
  esac
}

# kexec_update FROM TO (k1): the update by kexec, timed like scenario 1's (request to
# the agent answering).
kexec_update() {
  local j t0 t_up plain_a plain_b upd_fw method down to=$2
  if [[ -n ${plain:-} && -n ${plain2:-} ]]; then
    plain_a=$plain plain_b=$plain2
    upd_fw=$(awk -v c="$t2" -v d="$t3" 'BEGIN { printf "%.1f", d - c }')
  else
    say "plain reboots for comparison (scenario 1 did not run before)"
    t0=$(date +%s.%N); reboot_up --force; plain_a=$(secs_since "$t0")
    plain_b=$plain_a
    upd_fw="n/a"
  fi
  say "kexec scenario 1: $1 -> $to, rebooted by kexec"
  ctl update --version "$to" --wait
  kexec_t=$(date +%s.%N)
  kexec_down || fail "no kexec: the node rebooted through the firmware (serial log: $w/serial-$boots.log)"
  wait_api
  j=$(status_json)
  t_up=$(date +%s.%N)
  ctl status
  [[ $(field "['state']" <<<"$j") == committed ]] || fail "$to was not committed: $j"
  [[ $(field "['running_version']" <<<"$j") == "$to" ]] || fail "the node does not run $to: $j"
  on_console "updateagent.boot=kexec" || fail "$to was not the kexec'd kernel"
  method=$(field "['last_result']['boot']['method']" <<<"$j")
  down=$(field "['last_result']['boot']['downtime_ms']" <<<"$j")
  [[ $method == kexec ]] || fail "status does not say $to booted by kexec: $j"
  log "kexec: the way down: $(way_down)"
  log "kexec: the kexec'd boot: $(guest_split)"
  # The ratio (the issue's goal) is against plain reboots, which have no gate; the
  # update by firmware reboot (a trial, gated too) is the like-for-like comparison.
  awk -v r="$kexec_t" -v j="$jump_at" -v k="$kexec_at" -v a="$t_up" -v p="$plain_a" -v q="$plain_b" -v f="$upd_fw" \
    -v m="$down" -v b="$bootloader" 'BEGIN {
    fr = (f == "n/a") ? "n/a" : sprintf("%.2f", (a - r) / f)
    printf "kexec (%s): update by kexec %.1f s (down to the next kernel %.1f s: to the jump %.1f s, the jump to the new kernel'"'"'s first line %.1f s; kernel to answer %.1f s; the agent measured %.1f s to its commit); update by firmware reboot %s s (kexec/firmware update %s); plain firmware reboots %.1f s and %.1f s; ratio %.2f\n",
      b, a - r, k - r, j - r, k - j, a - k, m / 1000, f, fr, p, q, 2 * (a - r) / (p + q) }'
}
