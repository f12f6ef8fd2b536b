#!/bin/bash
# integration/vm/setup.sh: installs what the VM lab needs on a fresh Debian 12 machine
# (idempotent; only missing packages are installed). Run it, or source it from the
# other lab scripts.
#
# qemu-system-x86 must come from bookworm-backports: the machine's qemu-utils is the
# backports build, which conflicts with bookworm's qemu-system-common. Only the QEMU
# packages are pinned to backports; a blanket `-t bookworm-backports` would also
# upgrade systemd and GRUB on the host.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin

ua_vm_setup() {
  local sources=/etc/apt/sources.list.d/update-agent-backports.sources
  local prefs=/etc/apt/preferences.d/update-agent-backports
  # Packages allowed to come from backports: QEMU itself and the firmware blobs whose
  # versions it requires.
  local pinned="qemu-system-x86 qemu-system-common qemu-system-data qemu-system-modules-* seabios ipxe-qemu"
  local src_text prefs_text changed=0
  src_text="Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"
  prefs_text="# update-agent VM lab: QEMU from bookworm-backports, everything else from bookworm.
Package: $pinned
Pin: release n=bookworm-backports
Pin-Priority: 990
"
  # command or file -> Debian package
  local -A want=(
    [qemu-system-x86_64]=qemu-system-x86
    [/usr/share/OVMF/OVMF_CODE_4M.fd]=ovmf
    [/usr/lib/grub/x86_64-efi/linux.mod]=grub-efi-amd64-bin
    [grub-mkimage]=grub-common
    [grub-editenv]=grub-common
    [/usr/lib/systemd/boot/efi/systemd-bootx64.efi]=systemd-boot-efi
    [mkfs.vfat]=dosfstools
    [mcopy]=mtools
    [sfdisk]=fdisk
    [mkfs.ext4]=e2fsprogs
    [debootstrap]=debootstrap
    [dpkg-deb]=dpkg
    [nc]=netcat-openbsd
    [openssl]=openssl
    # The initramfs (build-initrd.sh) and its smoke (initrd-smoke.sh).
    [/bin/busybox]=busybox-static
    [veritysetup]=cryptsetup-bin
    [depmod]=kmod
    [cpio]=cpio
    [zstd]=zstd
    # The out-of-tree i6300esb watchdog driver (build-wdt.sh): Kbuild with the
    # compiler the lab kernel was built with; the kernel source is an xz tarball.
    [make]=make
    [gcc-12]=gcc-12
    [xz]=xz-utils
    [modinfo]=kmod
    [/usr/lib/x86_64-linux-gnu/libelf.so.1]=libelf1
  )
  local need=() k
  for k in "${!want[@]}"; do
    if [[ $k == /* ]]; then
      [[ -e $k ]] || need+=("${want[$k]}")
    else
      command -v "$k" >/dev/null 2>&1 || need+=("${want[$k]}")
    fi
  done
  # The pinning is needed whenever QEMU is (re)installed; keep it in place anyway so a
  # later `apt-get upgrade` keeps the backports QEMU consistent with qemu-utils.
  if ! cmp -s <(printf '%s' "$src_text") "$sources" 2>/dev/null \
    || ! cmp -s <(printf '%s' "$prefs_text") "$prefs" 2>/dev/null; then
    changed=1
  fi
  if ((${#need[@]} == 0 && changed == 0)); then
    return 0
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "vm/setup: need root to install ${need[*]:-apt sources} (run with sudo)" >&2
    return 1
  fi
  if ((changed)); then
    echo "vm/setup: adding bookworm-backports ($sources) pinned for: $pinned"
    printf '%s' "$src_text" >"$sources"
    printf '%s' "$prefs_text" >"$prefs"
  fi
  apt-get update -qq
  if ((${#need[@]})); then
    # Deduplicate (grub-common appears twice).
    mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
    echo "vm/setup: installing ${need[*]}"
    # No recommends: qemu-system-x86 would otherwise pull the GUI and its X stack.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      "${need[@]}" >/dev/null
  fi
}

ua_vm_setup
