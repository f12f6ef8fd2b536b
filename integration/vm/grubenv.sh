#!/bin/bash
# integration/vm/grubenv.sh DISK.img [grub-editenv command...]: reads or changes the
# GRUB environment block on a lab disk's ESP while the VM is not running, without loop
# devices: the ESP is found in the GPT by PARTLABEL "esp" and reached with mtools at
# its byte offset.
#   grubenv.sh disk.img                          # = list
#   grubenv.sh disk.img list
#   grubenv.sh disk.img set ua_trial=b ua_tries=3 ua_b_ok=1
#   grubenv.sh disk.img unset ua_trial
# The block is copied out, edited with grub-editenv and copied back (grub-editenv keeps
# it at 1024 bytes); GRUB's save_env later writes into whatever sectors the file has.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin MTOOLS_SKIP_CHECK=1

if (($# < 1)); then
  echo "usage: $0 DISK.img [list | set K=V... | unset K...]" >&2
  exit 2
fi
disk=$1
shift
(($#)) || set -- list
path=${UA_VM_GRUBENV_PATH:-::/EFI/BOOT/grubenv}

# Byte offset of the partition named "esp" ("... : start=2048, size=..., name="esp"").
start=$(sfdisk -d "$disk" | sed -n 's/.*start= *\([0-9]*\),.*name="esp".*/\1/p')
[[ -n $start ]] || { echo "grubenv: no partition named esp on $disk" >&2; exit 1; }
esp="$disk@@$((start * 512))"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mcopy -n -i "$esp" "$path" "$tmp/grubenv"
grub-editenv "$tmp/grubenv" "$@"
if [[ $1 != list ]]; then
  mcopy -o -i "$esp" "$tmp/grubenv" "$path"
fi
