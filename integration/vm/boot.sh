#!/bin/bash
# integration/vm/boot.sh DISK.img LOG [extra qemu args...]: one QEMU run = one boot.
#
# Runs QEMU in the foreground and returns when it exits: -no-reboot turns a guest
# reboot into an exit, and panic=-1 on the kernel command line (make-disk.sh) turns a
# panic into a reboot, hence an exit. A harness models a reboot by running this again,
# and a power cut by killing QEMU (UA_VM_PIDFILE gives its pid).
#
# TCG, not KVM: /dev/kvm on these machines is a nested PVM module that stock guests do
# not run on (see vm-lab-notes.md). One vCPU: -smp 2 is slower on 2 host cores.
#
# Firmware: OVMF code read-only plus a per-disk copy of the variable store
# (DISK.img.vars.fd, created on first use and kept, like a machine's NVRAM;
# make-disk.sh removes it when it makes a new disk).
# Serial console -> LOG (overwritten). No display, no monitor.
# Network: user-mode, restrict=on (the guest reaches nothing outside QEMU), guest
# address 10.0.2.15 by DHCP.
# Watchdog: an Intel 6300ESB (-device i6300esb), idle until a driver starts it (the
# lab's initramfs does, and systemd's RuntimeWatchdogSec= feeds it; build-wdt.sh).
# On expiry it resets the machine (-action watchdog=reset, QEMU's default said out
# loud), and -no-reboot turns that reset into QEMU exiting: a hang the watchdog
# catches ends the run like a reboot does, and the harness boots again.
#
# Knobs (environment):
#   UA_VM_TIMEOUT    seconds before QEMU is killed (default 300; 0: no limit); exit 124
#   UA_VM_HOSTFWD    port forwards, "HOSTPORT:GUESTPORT[,HOSTPORT:GUESTPORT...]" (TCP,
#                    host side bound to 127.0.0.1), e.g. 7000:7000
#   UA_VM_NETDEV     extra -netdev user options, e.g.
#                    guestfwd=tcp:10.0.2.100:8080-tcp:127.0.0.1:8080
#   UA_VM_PIDFILE    where QEMU writes its pid
#   UA_VM_ACCEL      default tcg
#   UA_VM_MEM        MiB, default 512
# Prints "vm/boot: qemu exit=RC after S.S s" on stderr and exits with QEMU's status.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

if (($# < 2)); then
  echo "usage: $0 DISK.img LOG [extra qemu args...]" >&2
  exit 2
fi
disk=$1
log=$2
shift 2
[[ -f $disk ]] || { echo "vm/boot: no disk $disk" >&2; exit 1; }

code=${UA_VM_OVMF_CODE:-/usr/share/OVMF/OVMF_CODE_4M.fd}
vars=$disk.vars.fd
[[ -f $vars ]] || cp /usr/share/OVMF/OVMF_VARS_4M.fd "$vars"

netdev="user,id=net0,restrict=on"
if [[ -n ${UA_VM_HOSTFWD:-} ]]; then
  IFS=, read -r -a fwds <<<"$UA_VM_HOSTFWD"
  for f in "${fwds[@]}"; do
    netdev+=",hostfwd=tcp:127.0.0.1:${f%%:*}-:${f##*:}"
  done
fi
[[ -n ${UA_VM_NETDEV:-} ]] && netdev+=",$UA_VM_NETDEV"

qemu=(
  qemu-system-x86_64
  -machine q35 -accel "${UA_VM_ACCEL:-tcg}" -cpu max -smp 1 -m "${UA_VM_MEM:-512}"
  -drive "if=pflash,format=raw,unit=0,readonly=on,file=$code"
  -drive "if=pflash,format=raw,unit=1,file=$vars"
  -drive "if=none,id=disk0,format=raw,file=$disk"
  -device "nvme,drive=disk0,serial=ua-lab-disk0"
  -netdev "$netdev" -device "virtio-net-pci,netdev=net0"
  -device virtio-rng-pci
  -device i6300esb -action watchdog=reset
  -display none -serial "file:$log" -monitor none -no-reboot
)
[[ -n ${UA_VM_PIDFILE:-} ]] && qemu+=(-pidfile "$UA_VM_PIDFILE")
qemu+=("$@")

timeout=${UA_VM_TIMEOUT:-300}
t0=$(date +%s.%N)
rc=0
if ((timeout > 0)); then
  # --foreground: QEMU stays in the caller's process group (Ctrl-C reaches it).
  timeout --foreground -k 5 "$timeout" "${qemu[@]}" || rc=$?
else
  "${qemu[@]}" || rc=$?
fi
t1=$(date +%s.%N)
awk -v rc="$rc" -v a="$t0" -v b="$t1" 'BEGIN { printf "vm/boot: qemu exit=%s after %.1f s\n", rc, b - a }' >&2
exit "$rc"
