# shellcheck shell=bash
# integration/vm/lab-helpers.sh: how the VM lab runs and watches its node (one QEMU run
# per boot, the API, power cuts at a console line, the ESP, the guest's own clock).
# Sourced by lab.sh once its work directory, disk, servers and ports are set up; the
# scenario files use these.

# boot: one QEMU run in the background (one boot); returns at once.
boot() {
  boots=$((boots + 1))
  UA_VM_HOSTFWD="$api_port:7443" UA_VM_PIDFILE="$w/qemu.pid" \
    UA_VM_NETDEV="guestfwd=tcp:10.0.2.100:8080-cmd:nc 127.0.0.1 $http_port" \
    "$here/boot.sh" "$w/disk.img" "$w/serial-$boots.log" &
  qemu_pid=$!
  boot_started=$(date +%s.%N)
  # When the kernel starts (host time), to split a reboot into its phases; gives up
  # when QEMU exits first.
  local pid=$qemu_pid n=$boots
  rm -f "$w/kernel-$n.t"
  (
    until grep -aqF "Linux version" "$w/serial-$n.log" 2>/dev/null; do
      kill -0 "$pid" 2>/dev/null || exit 0
      sleep 0.05
    done
    date +%s.%N >"$w/kernel-$n.t"
  ) &
}
# wait_down: until QEMU exits (the guest rebooted or powered off).
wait_down() {
  local rc=0
  wait "$qemu_pid" || rc=$?
  down_at=$(date +%s.%N)
  qemu_pid=""
  log "boot $boots ended (qemu exit $rc)"
}
ctl() {
  "$updatectl_host" --address "https://127.0.0.1:$api_port" --tls-ca "$w/pki/ca.crt" \
    --tls-cert "$w/pki/client.crt" --tls-key "$w/pki/client.key" "$@"
}
# wait_api: until the guest's agent answers over TLS (after the health gate).
wait_api() {
  local deadline=$((SECONDS + ${1:-240}))
  # A short connect timeout: through QEMU's user network a connection made before the
  # guest's network is up is accepted by QEMU and then waits on TCP's retransmission
  # backoff, which once added up to 7 s to a measured reboot.
  until ctl --connect-timeout 1 status >/dev/null 2>&1; do
    agent_error
    ((SECONDS < deadline)) || fail "the agent did not answer within ${1:-240} s (serial log: $w/serial-$boots.log)"
    kill -0 "$qemu_pid" 2>/dev/null || fail "the VM stopped before its agent answered (serial log: $w/serial-$boots.log)"
    # A short poll: the downtime figures are read from when this loop ends.
    sleep 0.25
  done
  log "agent answers, $(awk -v a="$boot_started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s after QEMU started"
}
status_json() { ctl status --json; }
# reboot_down [--force]: asks the agent to reboot the node and waits for QEMU to exit.
# The answer may not arrive when the node goes down first; the exit is what counts.
reboot_down() {
  ctl reboot "$@" || log "the reboot call got no answer (the node went down first)"
  wait_down
}
# reboot_up [--force]: the same, then the next boot, until the agent answers.
reboot_up() {
  reboot_down "$@"
  boot
  wait_api
}
# boot_until_api: boots until the agent answers; a boot that ends first (a kernel
# panic, with panic=-1 and -no-reboot) is followed by the next, as firmware would.
boot_until_api() {
  local tries=0
  boot
  until ctl --connect-timeout 1 status >/dev/null 2>&1; do
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
      wait_down
      tries=$((tries + 1))
      ((tries <= ${1:-6})) || fail "no boot reached the agent after $tries boots"
      log "boot $boots ended before the agent answered: $({ tr -d '\r' <"$w/serial-$boots.log" | grep -a -o 'Kernel panic.*' | sed -n 1p; } || echo 'no panic line')"
      boot
    fi
    sleep 1
  done
}
# phases T_REQUEST T_ANSWER: the last reboot in phases: the old system going down
# (request to QEMU's exit), firmware and bootloader (QEMU's start to the kernel's
# first line), kernel and user space (to the agent answering).
phases() {
  local k
  k=$(cat "$w/kernel-$boots.t" 2>/dev/null || echo "$boot_started")
  awk -v r="$1" -v d="$down_at" -v s="$boot_started" -v k="$k" -v a="$2" 'BEGIN {
    printf "down %.1f s, firmware and bootloader %.1f s, kernel to answer %.1f s", d - r, k - s, a - k }'
  printf ' [%s]' "$(guest_split)"
}
secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval('d' + sys.argv[1]))" "$1"; }
# cut_on PATTERN DELAY [STOP [FROM_BYTE]]: the power cut. Follows this boot's serial
# console (the guest's journal is forwarded there) from FROM_BYTE (default 0) and kills
# QEMU DELAY seconds after a line containing PATTERN appears. Prints "cut", or "stop" when a line with
# STOP came first, or "ended" when QEMU exited first. Reading the log every 5 ms keeps
# the kill within a few ms of the line reaching the console.
cut_on() {
  python3 - "$w/serial-$boots.log" "$w/qemu.pid" "$qemu_pid" "$1" "$2" "${3:-}" "${4:-0}" <<'PY'
import os, signal, sys, time
log, pidfile, runner, pattern, delay, stop, start = sys.argv[1:8]
pattern, stop, delay, pos = pattern.encode(), stop.encode(), float(delay), int(start)
tail = b""
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    try:
        with open(log, "rb") as f:
            f.seek(pos)
            chunk = f.read()
    except FileNotFoundError:
        chunk = b""
    pos += len(chunk)
    text = tail + chunk
    hit, halt = text.find(pattern), text.find(stop) if stop else -1
    if hit >= 0 and (halt < 0 or hit < halt):
        time.sleep(delay)
        try:
            os.kill(int(open(pidfile).read()), signal.SIGKILL)
        except (OSError, ValueError):
            print("ended")
            sys.exit(0)
        print("cut")
        sys.exit(0)
    if halt >= 0:
        print("stop")
        sys.exit(0)
    tail = text[-256:]
    try:
        os.kill(int(runner), 0)
    except OSError:
        print("ended")
        sys.exit(0)
    time.sleep(0.005)
print("timeout")
PY
}
# booted_slot: the slot this boot's kernel was given (its command line, on the console).
booted_slot() {
  local deadline=$((SECONDS + 60)) s
  # No grep -m1/-q on a pipe here or below: the reader quitting early kills tr with
  # SIGPIPE, and pipefail turns a match into a failure once the log passes 64 KiB.
  until s=$(tr -d '\000' 2>/dev/null <"$w/serial-$boots.log" | grep -a -o 'Command line: .*updateagent\.slot=[ab]' | sed -n 1p | grep -o '[ab]$'); do
    ((SECONDS < deadline)) || fail "no kernel command line on the console (serial log: $w/serial-$boots.log)"
    sleep 0.2
  done
  echo "$s"
}
# on_console TEXT: whether this boot's console shows TEXT so far.
# (grep -c reads to the end: with -q, tr could die of SIGPIPE and pipefail would turn
# a match into a miss.)
on_console() { tr -d '\000' <"$w/serial-$boots.log" | grep -acF "$1" >/dev/null; }
# esp_image: the ESP inside the disk image, as mtools names it.
esp_image() {
  local start
  start=$(sfdisk -d "$w/disk.img" | sed -n 's/.*start= *\([0-9]*\),.*name="esp".*/\1/p')
  echo "$w/disk.img@@$((start * 512))"
}
# esp_entries: the .conf entries on the (powered-off) disk's ESP, as mtools paths.
esp_entries() {
  MTOOLS_SKIP_CHECK=1 mdir -b -i "$(esp_image)" ::/loader/entries | grep '\.conf$' || true
}
# esp_whole WHEN: after a power cut, what the bootloader reads must be whole, checked
# on the disk image from the host (mtools, grub-editenv): GRUB's grubenv parses and
# names a default; every systemd-boot entry has its linux line and that kernel is on
# the ESP, not empty (a renamed file on vfat is empty until its inode is written back
# unless the agent fsyncs it: that cut once left no entry to boot). The one empty entry
# allowed is fsck.vfat's residue of a torn rename: beside a whole entry of its slot
# (systemd-boot skips it; the agent removes it at its next write).
esp_whole() {
  local esp names n k size out="" whole=" " empty=""
  if [[ $bootloader == grub ]]; then
    out=$("$here/grubenv.sh" "$w/disk.img" list) || fail "$1: grubenv does not parse"
    grep -q '^ua_default=[ab]$' <<<"$out" || fail "$1: grubenv names no default: $out"
    log "$1: grubenv whole: $(grep '^ua_' <<<"$out" | tr '\n' ' ')"
    return
  fi
  esp=$(esp_image)
  names=$(esp_entries)
  [[ -n $names ]] || fail "$1: no loader entry on the ESP"
  for n in $names; do
    if [[ $(MTOOLS_SKIP_CHECK=1 mcopy -n -i "$esp" "$n" - | wc -c) == 0 ]]; then
      empty+="$n "
      continue
    fi
    k=$(MTOOLS_SKIP_CHECK=1 mcopy -n -i "$esp" "$n" - | sed -n 's/^linux *//p')
    [[ -n $k ]] || fail "$1: ${n##*/} has no linux line"
    size=$(MTOOLS_SKIP_CHECK=1 mcopy -n -i "$esp" "::$k" - | wc -c)
    ((size > 0)) || fail "$1: ${n##*/} boots $k, which is missing or empty"
    out+="${n##*/} ($k, $size bytes) "
    # update-agent-RANK-SLOT-...: the slot this entry boots.
    whole+="$(cut -d- -f4 <<<"${n##*/}") "
  done
  for n in $empty; do
    [[ $whole == *" $(cut -d- -f4 <<<"${n##*/}") "* ]] || fail "$1: ${n##*/} is empty"
    out+="${n##*/} (empty: fsck.vfat's residue of a torn rename) "
  done
  log "$1: ESP whole: $out"
}
# kernel_log [N]: this boot's console from the Nth-last kernel's first line (default 1,
# the last) to the next kernel's: a kexec starts the next kernel on the same console.
kernel_log() {
  tr -d '\000\r' 2>/dev/null <"$w/serial-$boots.log" | awk -v back="${1:-1}" '
    /Linux version/ { k++ } { line[NR] = $0; of[NR] = k }
    END { for (i = 1; i <= NR; i++) if (of[i] == k - back + 1) print line[i] }'
}
# uptime_of TEXT [N]: the guest's uptime (s) at the first console line with TEXT of
# this boot's last kernel (or the Nth-last: kernel_log) (journal lines carry it in
# brackets, the lab's marker lines as uptime=).
uptime_of() {
  { kernel_log "${2:-1}" | grep -a -F "$1" \
    | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p; s/.*uptime=\([0-9.]*\).*/\1/p' | sed -n 1p; } || true
}
# guest_split: this boot's last kernel from its start to the agent answering, in the
# guest's own clock (its console): kernel (start to the initramfs, or to systemd when
# it boots without one), initramfs (to the switch to the root's init), systemd (to
# multi-user.target), then to the API answering (on a trial boot the gate's checks and
# commit, then the daemon's start).
guest_split() {
  local i r s m a g0 g1
  i=$(uptime_of "Run /init as init process")
  r=$({ kernel_log | sed -n 's/.*ua-initrd: root .* switching to .* after \([0-9.]*\) s.*/\1/p' | sed -n 1p; } || true)
  s=$(uptime_of "running in system mode")
  m=$(uptime_of "Reached target multi-user.target")
  a=$(uptime_of "serving the update API")
  g0=$(uptime_of "trial boot: running the health checks")
  g1=$(uptime_of "trial boot healthy; committed")
  awk -v i="$i" -v r="$r" -v s="$s" -v m="$m" -v a="$a" -v g0="$g0" -v g1="$g1" 'BEGIN {
    if (s == "" || m == "" || a == "") { printf "guest: no split (a milestone is missing on the console)"; exit }
    # A root without dm-verity may boot without an initramfs (systemd-boot: 1.0).
    if (i == "" && r == "") printf "guest: kernel %.1f s (no initramfs)", s
    else if (i == "" || r == "") { printf "guest: no split (a milestone is missing on the console)"; exit }
    else printf "guest: kernel %.1f s, initramfs %.1f s, to systemd %.1f s", i, r - i, s - r
    printf ", systemd to multi-user %.1f s, to answering %.1f s", m - s, a - m
    if (g0 != "" && g1 != "") printf " (gate %.1f s)", g1 - g0
    printf ", answering at uptime %.1f s", a }'
}
# agent_error: fails at once, with the agent's words, when this boot's agent refused to
# start (otherwise the lab would only time out waiting for it).
agent_error() {
  local e
  e=$(tr -d '\000\r' 2>/dev/null <"$w/serial-$boots.log" | grep -a 'update-agent\[[0-9]*\]: error: starting' | sed -n 1p || true)
  [[ -z $e ]] || fail "the agent does not start: ${e#*: } (serial log: $w/serial-$boots.log)"
}
# wait_console REGEX: until this boot's console shows a line matching REGEX (grep BRE).
wait_console() {
  local deadline=$((SECONDS + 240))
  until tr -d '\000' <"$w/serial-$boots.log" | grep -ac "$1" >/dev/null; do
    agent_error
    ((SECONDS < deadline)) || fail "nothing matching '$1' on the console (serial log: $w/serial-$boots.log)"
    kill -0 "$qemu_pid" 2>/dev/null || fail "the VM stopped before '$1' (serial log: $w/serial-$boots.log)"
    sleep 0.2
  done
}
