#!/bin/bash
# integration/vm/make-disk.sh OUT.img SLOT_A [SLOT_B]: builds the lab's GPT boot disk,
# without loop devices or mounts.
#
# SLOT_A, SLOT_B: what goes into root-a / root-b, each one of
#   * a directory (a root file system tree, e.g. an extracted rootfs.tar),
#   * a tarball of one (*.tar, *.tar.gz, *.tar.zst, ...; extracted as root),
#   * a file-system image (e.g. an ext4 release image), copied into the slot as is,
#   * "-" or nothing: the slot stays zeroed (no file system, no kernel).
# A tree must have the kernel at /boot/vmlinuz (build-rootfs.sh puts it there).
#
# Layout (DESIGN.md, "Disk layout contract"; PARTLABELs are what the agent and the
# guest's fstab look for; GRUB addresses the slots as gpt2/gpt3):
#   1 esp     vfat  UA_VM_ESP_MIB   (64)   GRUB, grub.cfg, update-agent.cfg, grubenv
#   2 root-a  ext4  UA_VM_SLOT_MIB  (600; grown to fit the larger tree)
#   3 root-b  ext4  UA_VM_SLOT_MIB
#   4 state   ext4  UA_VM_STATE_MIB (64)   mounted at /var/lib/update-agent
# Each file system is made as a file of its own and dd'd into the sparse disk file.
#
# The ESP with UA_VM_BOOTLOADER=grub (default): a standalone GRUB (grub-mkimage, prefix
# /EFI/BOOT) as EFI/BOOT/BOOTX64.EFI; EFI/BOOT/grub.cfg sets ua_cmdline and sources
# EFI/BOOT/update-agent.cfg (the fragment from bootloader-hooks/grub, as its README
# describes for a standalone install); EFI/BOOT/grubenv as Grub::create(path, Slot::A)
# writes it.
# With UA_VM_BOOTLOADER=systemd-boot: systemd-bootx64.efi as EFI/BOOT/BOOTX64.EFI,
# loader/loader.conf from bootloader-hooks/systemd-boot (timeout 0, no default), and
# what SystemdBoot::create(esp, cfg, Slot::A, version, kernel, None) leaves: slot a's
# kernel as update-agent/a/vmlinuz and the blessed entry
# loader/entries/update-agent-1-a-VERSION.conf (VERSION: VERSION_ID of the slot's
# /etc/os-release). The entry's options are ua_cmdline below, which must equal the
# guest's agent.toml [boot] options, since the agent writes the next entries.
#
# Knobs (environment):
#   UA_VM_SLOT_MIB, UA_VM_ESP_MIB, UA_VM_STATE_MIB   partition sizes in MiB
#   UA_VM_CMDLINE   ua_cmdline, the kernel arguments after root= and updateagent.slot=
#                   (default: ro rootwait rootfstype=ext4 console=ttyS0 panic=-1)
#   UA_VM_CMDLINE_EXTRA  appended to it (e.g. ua_lab.analyze: the guest prints
#                   systemd-analyze time/blame on the serial console)
#   UA_VM_POWEROFF  1 (default): add ua_lab.poweroff, so the guest powers off once it
#                   reaches multi-user (one QEMU run = one boot to multi-user); 0: stays up
#   UA_VM_BOOTLOADER  grub (default) or systemd-boot
#   UA_VM_GRUBENV   initial variables (default: ua_default=a ua_trial= ua_tries=0
#                   ua_a_ok=1 ua_b_ok=0); change them later with grubenv.sh
#   UA_VM_FRAGMENT  the GRUB fragment (default: bootloader-hooks/grub/update-agent.cfg)
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=setup.sh
source "$here/setup.sh"

if (($# < 2 || $# > 3)); then
  echo "usage: $0 OUT.img SLOT_A [SLOT_B]   (slot: dir | tarball | fs image | -)" >&2
  exit 2
fi
out=$1
src_a=$2
src_b=${3:--}
esp_mib=${UA_VM_ESP_MIB:-64}
state_mib=${UA_VM_STATE_MIB:-64}
slot_mib=${UA_VM_SLOT_MIB:-600}
cmdline=${UA_VM_CMDLINE:-ro rootwait rootfstype=ext4 console=ttyS0 panic=-1}
[[ -n ${UA_VM_CMDLINE_EXTRA:-} ]] && cmdline+=" $UA_VM_CMDLINE_EXTRA"
[[ ${UA_VM_POWEROFF:-1} == 1 ]] && cmdline+=" ua_lab.poweroff"
grubenv_vars=${UA_VM_GRUBENV:-ua_default=a ua_trial= ua_tries=0 ua_a_ok=1 ua_b_ok=0}
fragment=${UA_VM_FRAGMENT:-$here/../../bootloader-hooks/grub/update-agent.cfg}
[[ -f $fragment ]] || { echo "make-disk: no GRUB fragment at $fragment" >&2; exit 1; }
bootloader=${UA_VM_BOOTLOADER:-grub}
hooks=$here/../../bootloader-hooks
case $bootloader in
  grub | systemd-boot) ;;
  *) echo "make-disk: UA_VM_BOOTLOADER must be grub or systemd-boot, not $bootloader" >&2; exit 2 ;;
esac

log() { printf 'vm/make-disk: %s\n' "$*" >&2; }
start=$SECONDS
outdir=$(cd "$(dirname "$out")" && pwd)
# Scratch space beside the output: slot images are large (but sparse).
work=$(mktemp -d "$outdir/.make-disk.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Turns a slot source into something mkfs/dd can take: prints "dir PATH", "image PATH"
# or "empty".
prepare_slot() {
  local name=$1 src=$2
  if [[ $src == - ]]; then
    echo empty
  elif [[ -d $src ]]; then
    echo "dir $(cd "$src" && pwd)"
  elif [[ -f $src && $src == *.tar* ]]; then
    mkdir "$work/tree-$name"
    # As root, tar keeps owners, modes and xattrs (capabilities) of the tree.
    tar -C "$work/tree-$name" --numeric-owner --xattrs --xattrs-include='*' -xaf "$src"
    echo "dir $work/tree-$name"
  elif [[ -f $src ]] && [[ -n $(blkid -p -o value -s TYPE "$src" 2>/dev/null) ]]; then
    echo "image $(cd "$(dirname "$src")" && pwd)/$(basename "$src")"
  else
    log "slot $name: $src is neither a directory, a tarball nor a file-system image"
    return 1
  fi
}
slot_a=$(prepare_slot a "$src_a")
slot_b=$(prepare_slot b "$src_b")
read -r kind_a path_a <<<"$slot_a"
read -r kind_b path_b <<<"$slot_b"

# Slot size: the requested size, grown so the larger tree fits with room to spare
# (ext4 metadata, journal, and a v2 a little larger than v1).
for p in "$kind_a:${path_a:-}" "$kind_b:${path_b:-}"; do
  case $p in
    dir:*)
      used=$(du -s -B1M --apparent-size "${p#dir:}" | cut -f1)
      fit=$(((used * 13 / 10 + 64 + 63) / 64 * 64))
      ;;
    image:*)
      fit=$((($(stat -c %s "${p#image:}") + (1 << 20) - 1) >> 20))
      ;;
    *) fit=0 ;;
  esac
  if ((fit > slot_mib)); then
    log "slots grown to $fit MiB to fit ${p#*:}"
    slot_mib=$fit
  fi
done

# Each slot's file system as a file of its own. The label is the slot's PARTLABEL
# (cosmetic: GRUB and the kernel address the slots by partition, not by label).
make_slot() {
  local name=$1 kind=$2 path=${3:-} f=$work/root-$1.img
  case $kind in
    dir)
      [[ -f $path/boot/vmlinuz ]] || log "warning: slot $name has no /boot/vmlinuz"
      mkfs.ext4 -q -F -L "root-$name" -d "$path" "$f" "${slot_mib}M" >/dev/null
      ;;
    image)
      if (($(stat -c %s "$path") > slot_mib << 20)); then
        log "slot $name: image $path is larger than the slot"
        return 1
      fi
      cp --sparse=always "$path" "$f"
      ;;
    empty) ;;
  esac
}
make_slot a "$kind_a" "${path_a:-}"
make_slot b "$kind_b" "${path_b:-}"
mkfs.ext4 -q -F -L state "$work/state.img" "${state_mib}M" >/dev/null

# The ESP.
esp=$work/esp.img
mkfs.vfat -C -n ESP "$esp" $((esp_mib * 1024)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT
boot_dir=$work/esp-files
mkdir -p "$boot_dir"
if [[ $bootloader == grub ]]; then
  grub-mkimage -O x86_64-efi -p /EFI/BOOT -o "$boot_dir/BOOTX64.EFI" \
    part_gpt fat ext2 normal linux loadenv search search_label test echo regexp configfile
  cp "$fragment" "$boot_dir/update-agent.cfg"
  cat >"$boot_dir/grub.cfg" <<EOF
# update-agent VM lab (written by integration/vm/make-disk.sh). The ua_* settings go
# before the fragment; everything else (slot choice, tries) is the fragment's.
set ua_cmdline="$cmdline"
source "\${prefix}/update-agent.cfg"
EOF
  grub-editenv "$boot_dir/grubenv" create
  # shellcheck disable=SC2086 # one word per variable
  grub-editenv "$boot_dir/grubenv" set $grubenv_vars
  mcopy -i "$esp" "$boot_dir/BOOTX64.EFI" "$boot_dir/grub.cfg" "$boot_dir/update-agent.cfg" \
    "$boot_dir/grubenv" ::/EFI/BOOT/
else
  # Slot a's kernel and version, from its tree or (without mounting) its ext4 image.
  os_release=
  case $kind_a in
    dir)
      cp "$path_a/boot/vmlinuz" "$boot_dir/vmlinuz"
      os_release=$(cat "$path_a/etc/os-release" 2>/dev/null || true)
      ;;
    image)
      debugfs -R "dump /boot/vmlinuz $boot_dir/vmlinuz" "$path_a" >/dev/null 2>&1
      os_release=$(debugfs -R "cat /etc/os-release" "$path_a" 2>/dev/null || true)
      ;;
    *) log "systemd-boot needs a kernel in slot a"; exit 1 ;;
  esac
  [[ -s $boot_dir/vmlinuz ]] || { log "slot a has no /boot/vmlinuz"; exit 1; }
  version=$(sed -n 's/^VERSION_ID="\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' <<<"$os_release")
  version=${version:-0}
  # What the agent's entry_text writes with its default title and root labels.
  cat >"$boot_dir/entry.conf" <<EOF
title update-agent $version (slot a)
version $version
linux /update-agent/a/vmlinuz
options root=PARTLABEL=root-a updateagent.slot=a $cmdline
EOF
  mmd -i "$esp" ::/loader ::/loader/entries ::/update-agent ::/update-agent/a
  mcopy -i "$esp" /usr/lib/systemd/boot/efi/systemd-bootx64.efi ::/EFI/BOOT/BOOTX64.EFI
  mcopy -i "$esp" "$hooks/systemd-boot/loader.conf" ::/loader/loader.conf
  mcopy -i "$esp" "$boot_dir/vmlinuz" ::/update-agent/a/vmlinuz
  mcopy -i "$esp" "$boot_dir/entry.conf" "::/loader/entries/update-agent-1-a-$version.conf"
fi

# The disk: 1 MiB for the primary GPT, the partitions, 1 MiB for the backup GPT.
esp_at=1
a_at=$((esp_at + esp_mib))
b_at=$((a_at + slot_mib))
state_at=$((b_at + slot_mib))
total=$((state_at + state_mib + 1))
img=$work/disk.img
truncate -s "${total}M" "$img"
sfdisk --quiet --no-reread --no-tell-kernel "$img" <<EOF
label: gpt
unit: sectors
start=$((esp_at * 2048)), size=$((esp_mib * 2048)), type=U, name="esp"
start=$((a_at * 2048)), size=$((slot_mib * 2048)), type=L, name="root-a"
start=$((b_at * 2048)), size=$((slot_mib * 2048)), type=L, name="root-b"
start=$((state_at * 2048)), size=$((state_mib * 2048)), type=L, name="state"
EOF
place() { dd if="$1" of="$img" bs=1M seek="$2" conv=notrunc,sparse status=none; }
place "$esp" "$esp_at"
[[ -f $work/root-a.img ]] && place "$work/root-a.img" "$a_at"
[[ -f $work/root-b.img ]] && place "$work/root-b.img" "$b_at"
place "$work/state.img" "$state_at"
mv "$img" "$out"
# boot.sh keeps the machine's UEFI variables beside the disk; a new disk gets new ones
# (the old boot entries would name the old ESP's partition GUID).
rm -f "$out.vars.fd"
log "$out: ${total} MiB (esp ${esp_mib}, slots ${slot_mib} each, state ${state_mib}); $bootloader;" \
  "a=$kind_a b=$kind_b; $(du -h "$out" | cut -f1) allocated; $((SECONDS - start)) s"
