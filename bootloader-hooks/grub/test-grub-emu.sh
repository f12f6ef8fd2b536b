#!/bin/sh
# Runs update-agent.cfg in grub-emu, i.e. GRUB 2.06's own script engine, load_env /
# save_env, GPT and file-system code, against a real GPT disk image: an ESP (FAT) with
# the fragment and grubenv, and two ext4 slots with /boot/vmlinuz. Each step is one
# "boot"; the script checks which slot GRUB chose (the slot it tried first, then the fallback) and
# what it left in grubenv. grub-emu has no `linux` loader, so the test's grub.cfg
# defines `linux`/`initrd` functions that log their arguments to a second env block.
#
# Needs: grub-emu grub-common fdisk e2fsprogs dosfstools mtools (Debian package names).
# Usage: sh test-grub-emu.sh    (exit 0: all passed)
set -eu

for tool in grub-emu:grub-emu grub-editenv:grub-common sfdisk:fdisk mkfs.ext4:e2fsprogs \
    mkfs.vfat:dosfstools mcopy:mtools; do
    command -v "${tool%%:*}" >/dev/null 2>&1 ||
        PATH=$PATH:/usr/sbin:/sbin command -v "${tool%%:*}" >/dev/null 2>&1 || {
        echo "missing ${tool%%:*}: apt-get install -y ${tool#*:}" >&2
        exit 2
    }
done
PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "$0")" && pwd)
mods=/usr/lib/grub/x86_64-emu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# Slots: a has no initrd, b has one. File-system labels deliberately say nothing.
mkdir -p sa/boot sb/boot
echo kernel-a >sa/boot/vmlinuz
echo kernel-b >sb/boot/vmlinuz
echo initrd-b >sb/boot/initrd.img
mkfs.ext4 -q -F -d sa -L image a.img 8M
mkfs.ext4 -q -F -d sb -L image b.img 8M
mkdir -p empty/boot
mkfs.ext4 -q -F -d empty -L image b-nokernel.img 8M
mkfs.vfat -C esp-base.img 24576 >/dev/null
mmd -i esp-base.img ::/grub ::/grub/x86_64-emu
mcopy -i esp-base.img "$mods"/*.mod "$mods"/*.lst ::/grub/x86_64-emu/
echo "(hd0) $work/disk.img" >device.map

cat >grub.cfg <<'EOF'
function linux {
  load_env -f "$prefix/emulog" log
  set log="${log}[$*]"
  save_env -f "$prefix/emulog" log
  # Fails, as the real command does, when there is no kernel.
  test -f "$1"
}
function initrd {
  load_env -f "$prefix/emulog" log
  set log="${log}[initrd $*]"
  save_env -f "$prefix/emulog" log
}
# Entry 0: when the default entry returns (grub-emu boots nothing), end the emulator.
menuentry emu-exit { reboot }
set fallback=0
source "$prefix/prelude.cfg"
source "$prefix/update-agent.cfg"
EOF

# new_disk PRELUDE_FILE [grubenv set args...]: a fresh disk whose grubenv has the args.
# Slot b's image is $b_img.
b_img=b.img
new_disk() {
    cp esp-base.img esp.img
    rm -f grubenv
    mcopy -i esp.img grub.cfg "$here/update-agent.cfg" ::/grub/
    mcopy -i esp.img "$1" ::/grub/prelude.cfg
    shift
    if [ "$1" != "--no-grubenv" ]; then
        grub-editenv grubenv create
        [ $# -eq 0 ] || grub-editenv grubenv set "$@"
        mcopy -i esp.img grubenv ::/grub/
    fi
    rm -f disk.img
    truncate -s 48M disk.img
    sfdisk -q disk.img <<'EOF'
label: gpt
start=1MiB, size=24MiB, name=esp
size=8MiB, name=root-a
size=8MiB, name=root-b
EOF
    dd if=esp.img of=disk.img bs=1M seek=1 conv=notrunc status=none
    dd if=a.img of=disk.img bs=1M seek=25 conv=notrunc status=none
    dd if="$b_img" of=disk.img bs=1M seek=33 conv=notrunc status=none
}

failed=0
passed=0
# boot NAME EXPECTED_LOG EXPECTED_GRUBENV_LIST [EXPECTED_MESSAGE]
boot() {
    rm -f grubenv emulog
    grub-editenv emulog create
    mcopy -o -i disk.img@@1M emulog ::/grub/emulog
    # GRUB waits 10 s ("Press any key to continue...") after an entry printed an
    # error, and every entry does here (grub-emu has no kernel to boot): answer each
    # wait as it appears on the screen. The FIFO is held open on fd 3, so grub-emu's
    # input never ends and a write never blocks.
    rm -f keys screen.txt
    mkfifo keys
    exec 3<>keys
    : >screen.txt
    timeout 30 grub-emu -m device.map -r hd0,gpt1 -d /grub <keys >screen.txt 2>&1 &
    emu=$!
    answered=0
    while kill -0 "$emu" 2>/dev/null; do
        waits=$(grep -a -o "Press any key" screen.txt | wc -l)
        if [ "$waits" -gt "$answered" ]; then
            printf '\n' >&3
            answered=$((answered + 1))
        fi
        sleep 0.05
    done
    wait "$emu" || true
    exec 3>&-
    rm -f emulog
    mcopy -i disk.img@@1M ::/grub/emulog emulog
    log=$(grub-editenv emulog list | sed -n 's/^log=//p')
    if mcopy -i disk.img@@1M ::/grub/grubenv grubenv 2>/dev/null; then
        env=$(grub-editenv grubenv list | tr '\n' ' ')
    else
        env="(no grubenv)"
    fi
    screen=$(tr '\033\r' '\n\n' <screen.txt)
    ok=1
    [ "$log" = "$2" ] || ok=0
    [ "$env" = "$3" ] || ok=0
    if [ -n "${4:-}" ]; then
        echo "$screen" | grep -qF "$4" || ok=0
    fi
    if [ $ok = 1 ]; then
        passed=$((passed + 1))
        echo "ok   $1"
    else
        failed=$((failed + 1))
        echo "FAIL $1"
        echo "     booted: $log"
        echo "     wanted: $2"
        echo "     grubenv: $env"
        echo "     wanted:  $3"
        [ -z "${4:-}" ] || echo "     message wanted: $4"
        echo "$screen" | grep -a 'update-agent' | sed 's/^/     | /'
    fi
}

A='(hd0,gpt2)/boot/vmlinuz root=PARTLABEL=root-a updateagent.slot=a ro'
B='(hd0,gpt3)/boot/vmlinuz root=PARTLABEL=root-b updateagent.slot=b ro'
IB='initrd (hd0,gpt3)/boot/initrd.img'
: >none.cfg

new_disk none.cfg ua_default=a ua_trial=b ua_tries=2 ua_a_ok=1 ua_b_ok=1 saved_entry=x
boot "trial 1/2 boots b, falls back to a" "[$B][$IB][$A]" \
    "ua_default=a ua_trial=b ua_tries=1 ua_a_ok=1 ua_b_ok=1 saved_entry=x " \
    "trial boot of slot b, 1 tries left"
boot "trial 2/2 boots b" "[$B][$IB][$A]" \
    "ua_default=a ua_trial=b ua_tries=0 ua_a_ok=1 ua_b_ok=1 saved_entry=x "
boot "tries used up: clears the trial, boots a" "[$A][$B][$IB]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 saved_entry=x " \
    "slot b used up its tries"
boot "then stays on a, writes nothing" "[$A][$B][$IB]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 saved_entry=x "

new_disk none.cfg ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=0
boot "b marked 0: never booted, not even as fallback" "[$A]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=0 "

new_disk none.cfg ua_default=a ua_trial=b ua_tries=3 ua_a_ok=1 ua_b_ok=0
boot "trial of a slot marked 0 is ignored" "[$A]" \
    "ua_default=a ua_trial=b ua_tries=3 ua_a_ok=1 ua_b_ok=0 " "ignoring ua_trial=b"

new_disk none.cfg ua_default=b ua_trial= ua_tries=0 ua_a_ok=0 ua_b_ok=0
boot "default marked 0 boots anyway, says so" "[$B][$IB]" \
    "ua_default=b ua_trial= ua_tries=0 ua_a_ok=0 ua_b_ok=0 " "last resort, booting it"

new_disk none.cfg ua_default=b ua_trial=a ua_tries=1 ua_a_ok=1 ua_b_ok=1
boot "trial of a from default b" "[$A][$B][$IB]" \
    "ua_default=b ua_trial=a ua_tries=0 ua_a_ok=1 ua_b_ok=1 "

# A slot with a verified dm-verity tree boots its root through it; the other slot,
# without one, boots its partition as before.
H=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
BV="(hd0,gpt3)/boot/vmlinuz root=/dev/mapper/root roothash=$H systemd.verity_root_data=PARTLABEL=root-b systemd.verity_root_hash=PARTLABEL=root-b systemd.verity_root_options=hash-offset=7340032,restart-on-corruption updateagent.slot=b ro"
new_disk none.cfg ua_default=a ua_trial=b ua_tries=2 ua_a_ok=1 ua_b_ok=1 ua_b_roothash=$H ua_b_hashoff=7340032
boot "verity root for b, plain root for a" "[$BV][$IB][$A]" \
    "ua_default=a ua_trial=b ua_tries=1 ua_a_ok=1 ua_b_ok=1 ua_b_roothash=$H ua_b_hashoff=7340032 "

# The default guard: each boot of the default counts ua_boots down; at 0 the other
# slot boots and ua_fallen names the default; the two then alternate.
new_disk none.cfg ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=2
boot "guard 2: boots a, counts down" "[$A][$B][$IB]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=1 "
boot "guard 1: boots a, counts down to 0" "[$A][$B][$IB]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=0 "
boot "guard 0: a gave up, boots b" "[$B][$IB][$A]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=1 ua_fallen=a " \
    "default slot a failed its last boots; booting slot b"
boot "b did not reach the agent either: a once more" "[$A][$B][$IB]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=0 ua_fallen=a "
new_disk none.cfg ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=0 ua_boots=0
boot "guard 0, b marked 0: a as the last resort" "[$A]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=0 ua_boots=0 " \
    "failed its last boots, and slot b"
new_disk none.cfg ua_default=a ua_trial=b ua_tries=1 ua_a_ok=1 ua_b_ok=1 ua_boots=3
boot "trial boot: the guard is not counted" "[$B][$IB][$A]" \
    "ua_default=a ua_trial=b ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=3 "
boot "trial used up: the default's boot is counted" "[$A][$B][$IB]" \
    "ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=1 ua_boots=2 "

new_disk none.cfg ua_default=c
boot "garbage default: a, with a message" "[$A][$B][$IB]" "ua_default=c " "is not a or b"

b_img=b-nokernel.img
new_disk none.cfg ua_default=a ua_trial=b ua_tries=5 ua_a_ok=1 ua_b_ok=1
boot "trial slot without a kernel: straight on to a" "[$B][$A]" \
    "ua_default=a ua_trial=b ua_tries=4 ua_a_ok=1 ua_b_ok=1 " "slot b did not boot"
b_img=b.img

new_disk none.cfg saved_entry=x
boot "no agent variables: a, then b" "[$A][$B][$IB]" "saved_entry=x "

new_disk none.cfg --no-grubenv
boot "no grubenv: a" "[$A][$B][$IB]" "(no grubenv)" "cannot read"

# What /etc/grub.d/09_update-agent emits as its header, with the slots swapped and an
# explicit disk and command line.
UA_A_PART=gpt3 UA_B_PART=gpt2 UA_GRUB_DISK=hd0 UA_CMDLINE="console=ttyS0 panic=-1" \
    UA_GRUB_FRAGMENT=/dev/null sh "$here/09_update-agent" | grep '^set ' >swapped.cfg
new_disk swapped.cfg ua_default=b ua_trial= ua_tries=0 ua_a_ok=0 ua_b_ok=1
boot "09_update-agent settings: slot b on gpt2" \
    "[(hd0,gpt2)/boot/vmlinuz root=PARTLABEL=root-b updateagent.slot=b console=ttyS0 panic=-1]" \
    "ua_default=b ua_trial= ua_tries=0 ua_a_ok=0 ua_b_ok=1 "

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
