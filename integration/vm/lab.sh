#!/bin/bash
# integration/vm/lab.sh [--bootloader grub|systemd-boot] [SCENARIO...]: the VM lab's
# scenarios on real firmware (OVMF), a real bootloader (GRUB with our fragment, or
# systemd-boot with boot counting), a real kernel and systemd, the agent installed in
# the image the way a distribution would (our .deb installed with dpkg into the image
# root, revision 1 in 1.0 and 2 in the later releases, an upgrade that keeps the
# image's agent.toml; our units enabled, config in /etc/update-agent). The bootloader is GRUB unless --bootloader (or
# UA_LAB_BOOTLOADER) says systemd-boot; each has its own work directory and disk. The host drives the guest's agent over gRPC with mutual TLS
# through a QEMU host-forward, using updatectl; the guest fetches payloads from an HTTP
# server on the host's loopback through an explicit guest-forward and reaches nothing
# else. One QEMU run per boot: a reboot is QEMU exiting (-no-reboot) and a new run.
#
# Scenarios (default: 1 2 3 4 6 5 7 8 9, in this order; each starts where the last
# ended):
#   1  v1 -> v2: staged over gRPC while the node runs, reboot, health passes, committed;
#      the downtime is measured next to a plain reboot of the same VM
#   2  v2 -> v3 whose required unit fails a few seconds after start: the trial fails
#      its health check, the node reboots itself into v2, status says which check
#      failed and why
#   3  v2 -> v4 whose kernel never reaches user space (no init): the bootloader's try
#      counter brings the node back to v2 without the agent's help; status says so,
#      and why in the kernel's words (its pstore record: the initramfs's error, the panic)
#   4  v2 -> v5 with power cuts (QEMU killed) every few seconds while its frames
#      download, over a link so slow that no 16 MiB frame arrives between two cuts:
#      after each cut the node boots v2 and the agent resumes the staging by itself
#      from the bytes it kept, and v5 is committed after its reboot
#   5  the running release -> v6 with power cuts (QEMU killed) during the bootloader
#      flip and during the commit; after every cut the node must boot a good slot and
#      the agent must say something consistent; v6 is committed in the end
#   6  manual rollback over the API to the release before (4 before it: v5 -> v2)
#   7  the release key is rotated (v6 or v2 -> v7): the images ship root 1 (root
#      keys 1 and 2, both needed; releases signed by the lab key); the publisher puts
#      root 2 on the server, which replaces the lab key by a new one; the node follows
#      it, refuses v7 signed by the old key and takes v7 signed by the new one
#   8  dm-verity: the running release -> v8 (v7 plus a file), and one byte of the
#      staged slot changed on the disk between the arming and the reboot: every trial
#      boot hits the verity error and restarts, the bootloader falls back, and the
#      agent names the integrity failure (the slot no longer reaches its signed root)
#   9  dm-verity: v8 committed, then one bit of systemd in its slot changed on the
#      disk while the node is off: every boot restarts on the verity error, the
#      default's guard (GRUB: ua_boots; systemd-boot: the entry's @default+3 counter)
#      runs out after 3 boots, the bootloader boots the release before, and the agent
#      there rolls 8.0 back with cause stopped_booting and names the integrity failure
#
# Every release from v2 on is published with --verity: the node builds each tree,
# boots it through dm-verity (scenario 1 checks the root is /dev/mapper/root and that
# status says so), and reads the booted slot through it for the next delta.
#
# Releases (built from the lab's cached rootfs): v1; v2 = v1 plus a package (jq) and
# VERSION_ID 2.0; v3 = v2 plus a unit that exits 1 two seconds after it starts,
# listed as required in v3's health config; v4 = v2 without an init (the kernel
# panics); v5 = v2 plus 48 MiB of new data (a delta worth cutting the power in); v6 =
# v2 plus a small file. Each is published with `updatectl bundle create` as a delta
# against the release it replaces (v2 for v3, v4 and v5; v2 and v5 for v6).
#
# systemd-boot images also carry Debian's systemd-boot package (bootctl and
# systemd-bless-boot, as a distribution booting systemd-boot installs them), and their
# agent.toml says backend = "systemd-boot" with the kernel options of the disk's first
# entry. Every image forwards the guest's journal to the serial console, so the serial
# logs show what the agent did and when (scenario 5 times its power cuts by it).
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${UA_LAB_CACHE:-/var/tmp/update-agent-vm}
bootloader=${UA_LAB_BOOTLOADER:-grub}
if [[ ${1:-} == --bootloader ]]; then
  bootloader=${2:-}
  shift 2 || true
fi
case $bootloader in
  grub | systemd-boot) ;;
  *) echo "usage: $0 [--bootloader grub|systemd-boot] [SCENARIO...]" >&2; exit 2 ;;
esac
scenarios=("$@")
((${#scenarios[@]})) || scenarios=(1 2 3 4 6 5 7 8 9)
export UA_VM_TIMEOUT=${UA_VM_TIMEOUT:-600}

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
log() { printf 'vm/lab: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

# shellcheck source=../setup.sh
source "$repo/integration/setup.sh"
"$here/setup.sh"
"$here/build-rootfs.sh" "$cache" >&2

w=$cache/lab
[[ $bootloader == grub ]] || w=$cache/lab-$bootloader
rm -rf "$w"
mkdir -p "$w/www" "$w/pki" "$w/keys"

# The images get the agent as a distribution's would: its .deb, installed with dpkg.
# Package revision 1 goes into 1.0, revision 2 (the same build) into 2.0 and later,
# an upgrade over 1.0's tree whose agent.toml the lab changed.
# UA_LAB_PKGS=DIR1:DIR2 takes them from a build of the same tree (test.sh's packages
# tier) instead of building them again for each lab.
if [[ -n ${UA_LAB_PKGS:-} ]]; then
  say "the update-agent packages: revisions 1 and 2 from ${UA_LAB_PKGS}"
  IFS=: read -r pkg1 pkg2 <<<"$UA_LAB_PKGS"
  mkdir -p "$w/pkg-1" "$w/pkg-2"
  cp "$pkg1"/update-agent_*-1_amd64.deb "$w/pkg-1/"
  cp "$pkg2"/update-agent_*-2_amd64.deb "$w/pkg-2/"
else
  say "building the update-agent packages (release build; revisions 1 and 2)"
  bash "$repo/integration/package.sh" "$w/pkg-1" >&2
  UA_PKG_RELEASE=2 bash "$repo/integration/package.sh" "$w/pkg-2" >&2
fi
bin=$CARGO_TARGET_DIR/release
updatectl_host=$bin/updatectl
qemu_pid=""
server=""
cleanup() {
  # QEMU itself too: killing boot.sh alone leaves it running, holding the serial log.
  if [[ -n $qemu_pid ]]; then
    kill "$(cat "$w/qemu.pid" 2>/dev/null)" 2>/dev/null || true
    kill "$qemu_pid" 2>/dev/null || true
  fi
  [[ -n $server ]] && kill "$server" 2>/dev/null || true
}
trap cleanup EXIT

# ---- trust: the publisher's key, and a PKI for the API (server in the guest, the
# ---- fleet controller on the host)
"$updatectl_host" bundle keygen --out "$w/keys" >/dev/null
# The root of trust the images ship: root keys 1 and 2 (both must sign a new root),
# the lab key for releases and channels; release2 is the key scenario 7 rotates to.
for k in root1 root2 release2; do
  "$updatectl_host" bundle keygen --out "$w/keys" --name "$k" >/dev/null
done
"$updatectl_host" bundle root init --out "$w/root-1.json" --root-key "$w/keys/root1.pub" \
  --root-key "$w/keys/root2.pub" --releases-key "$w/keys/update-agent.pub" \
  --channels-key "$w/keys/update-agent.pub" >/dev/null
"$updatectl_host" bundle root threshold "$w/root-1.json" --role root 2 >/dev/null
"$updatectl_host" bundle root sign "$w/root-1.json" --key "$w/keys/root1.key" --key "$w/keys/root2.key"
"$updatectl_host" bundle root verify "$w/root-1.json" >&2
pki() { openssl "$@" >/dev/null 2>&1; }
( cd "$w/pki"
  pki req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt \
    -subj /CN=ua-lab-ca -days 7
  for who in server:ua-lab:"subjectAltName=DNS:ua-lab,IP:127.0.0.1\nextendedKeyUsage=serverAuth" \
             client:lab-controller:"subjectAltName=DNS:lab-controller\nextendedKeyUsage=clientAuth"; do
    IFS=: read -r name cn ext <<<"$who"
    pki req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$name.key" -out "$name.csr" -subj "/CN=$cn"
    printf '%b\n' "$ext" >"$name.ext"
    pki x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$name.crt" -days 7 -extfile "$name.ext"
  done )

# ---- release images
# release VERSION DIR [health units...]: the rootfs with the agent installed, as a
# distribution image would carry it, made into an ext4 image file $w/VERSION.img 16 MiB
# smaller than a slot: room for the dm-verity tree the node builds after it (every
# release but 1.0 is published with --verity; ~5 MiB of tree). Deterministic (fixed
# time, UUID and hash seed), so consecutive releases share most of their blocks, as
# real ones do.
slot_mib=${UA_VM_SLOT_MIB:-600}
img_mib=$((slot_mib - 16))
# The kernel arguments after root= and updateagent.slot=: GRUB's ua_cmdline
# (make-disk.sh writes it into grub.cfg); with systemd-boot, the options of the first
# entry and, in agent.toml, of every entry the agent writes.
boot_options="ro rootwait rootfstype=ext4 console=ttyS0 panic=-1${UA_VM_CMDLINE_EXTRA:+ $UA_VM_CMDLINE_EXTRA}"
# Scenario 5's flip cuts, in seconds after the agent logs "arming the bootloader": GRUB
# writes grubenv and then the state within a few ms; systemd-boot first copies the
# kernel onto the ESP and reads it back (~1 s under TCG), then renames the entry. The
# last delay is meant to land after the flip, so the cut's next boot is the trial.
if [[ $bootloader == grub ]]; then
  # options: the kexec path builds GRUB's line itself and must match ua_cmdline.
  boot_toml=$(printf 'grubenv = "/boot/efi/EFI/BOOT/grubenv"\noptions = "%s"' "$boot_options")
  flip_cuts_default="0 0.03 0.5"
else
  boot_toml=$(printf 'backend = "systemd-boot"\nesp = "/boot/efi"\noptions = "%s"' "$boot_options")
  flip_cuts_default="0.3 0.95 1.6"
fi
release() {
  local version=$1 tree=$2
  shift 2
  local units=""
  local u
  for u in "$@"; do units+="\"$u\", "; done
  local rel=2
  [[ $version == 1.0 ]] && rel=1
  "$here/install-agent.sh" "$tree" "$(echo "$w/pkg-$rel"/update-agent_*_amd64.deb)"
  install -d -m 0755 "$tree/etc/update-agent/tls"
  install -m 0644 "$w/keys/update-agent.pub" "$tree/etc/update-agent/keys.d/lab.pub"
  install -D -m 0644 "$w/root-1.json" "$tree/usr/share/update-agent/root.json"
  install -m 0644 "$w/pki/ca.crt" "$w/pki/server.crt" "$tree/etc/update-agent/tls/"
  install -m 0600 "$w/pki/server.key" "$tree/etc/update-agent/tls/"
  cat >"$tree/etc/update-agent/agent.toml" <<TOML
compatible = "ua-lab-x86_64"
[boot]
$boot_toml
kexec_panic_secs = 1
# Long enough for a kexec'd boot to reach its own systemd (which takes the watchdog
# over), short enough for kexec scenario kh: a hang is reset this long after the kexec.
kexec_watchdog_secs = 45
[api]
tcp_listen = "0.0.0.0:7443"
tls_cert = "/etc/update-agent/tls/server.crt"
tls_key = "/etc/update-agent/tls/server.key"
tls_client_ca = "/etc/update-agent/tls/ca.crt"
tls_allowed_clients = ["lab-controller"]
[releases]
url = "http://10.0.2.100:8080"
[health]
units = [${units}"systemd-networkd.service"]
sustain_secs = 4
deadline_secs = 120
TOML
  rm -f "$tree/etc/os-release"
  printf 'PRETTY_NAME="update-agent lab %s"\nNAME="ua-lab"\nID=ua-lab\nVERSION_ID=%s\n' \
    "$version" "$version" >"$tree/etc/os-release"
  rm -f "$w/$version.img"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -b 4096 -L root -U 6d1b3c2e-0000-4000-8000-0000000000aa \
    -E hash_seed=6d1b3c2e-0000-4000-8000-0000000000bb -d "$tree" "$w/$version.img" "${img_mib}M"
}

say "release images: v1, v2 (+ jq), v3 (+ a required unit that fails)"
t=$w/tree
mkdir -p "$t"
tar -C "$t" --numeric-owner --xattrs --xattrs-include='*' -xf "$cache/rootfs.tar"
mkdir -p "$t/etc/systemd/journald.conf.d"
printf '[Journal]\nForwardToConsole=yes\nTTYPath=/dev/ttyS0\n' >"$t/etc/systemd/journald.conf.d/ua-lab-console.conf"
if [[ $bootloader == systemd-boot ]]; then
  # The version of the guest's systemd: systemd-boot must match it exactly.
  sd_version=$(dpkg-query --admindir="$t/var/lib/dpkg" -W -f='${Version}' systemd)
  ( cd "$w" && apt-get download -qq "systemd-boot=$sd_version" >/dev/null )
  # bookworm's package ships /lib: unpacked straight into the merged-/usr tree it
  # would replace the /lib symlink with a directory (and the kernel would find no init).
  mkdir "$w/sd-boot"
  dpkg-deb -x "$w"/systemd-boot_*.deb "$w/sd-boot"
  tar -C "$w/sd-boot" -c . | tar -C "$t" -x --keep-directory-symlink
fi
# kexec-tools' /sbin/kexec: bookworm's systemd-shutdown runs `kexec -e` for
# `systemctl kexec` and reboots through the firmware without it. Only the binary and
# the Xen libraries it links (the package's units would load a kernel of their own at
# every reboot); run once in the tree to prove it loads.
kexec_debs="kexec-tools libxenmisc4.17 libxentoollog1 libxencall1 libxenevtchn1 libxengnttab1 libxenforeignmemory1 libxendevicemodel1 libxentoolcore1"
# shellcheck disable=SC2086
( mkdir -p "$w/kexec-debs" && cd "$w/kexec-debs" && apt-get download -qq $kexec_debs >/dev/null 2>&1 )
for deb in "$w"/kexec-debs/*.deb; do dpkg-deb -x "$deb" "$w/kexec-tools"; done
install -D -m 0755 "$w/kexec-tools/sbin/kexec" "$t/usr/sbin/kexec"
cp -a "$w"/kexec-tools/usr/lib/x86_64-linux-gnu/libxen*.so.* "$t/usr/lib/x86_64-linux-gnu/"
chroot "$t" /usr/sbin/kexec --version >&2 || fail "kexec does not run in the image"
release 1.0 "$t"
# v2: a package added, as a distribution update would.
( cd "$w" && apt-get download -qq jq libjq1 libonig5 >/dev/null )
for deb in "$w"/jq_*.deb "$w"/libjq1_*.deb "$w"/libonig5_*.deb; do dpkg-deb -x "$deb" "$t"; done
release 2.0 "$t"
# v3: a unit that starts, runs two seconds and fails; v3's health config requires it.
# The lab's sustain period (4 s) is scaled to its ~21 s reboot; the worker dies well
# inside it, so the sustain period is what catches it.
cat >"$t/etc/systemd/system/ua-lab-worker.service" <<'UNIT'
[Unit]
Description=update-agent VM lab: a workload that fails two seconds after it starts
[Service]
ExecStart=/bin/sh -c 'echo "worker: cannot open /var/lib/worker/db: no such file"; sleep 2; exit 1'
[Install]
WantedBy=multi-user.target
UNIT
systemctl --root="$t" --quiet enable ua-lab-worker.service
release 3.0 "$t" ua-lab-worker.service
# v4: v2 whose kernel finds no init (/sbin/init, /etc/init, /bin/init, /bin/sh).
systemctl --root="$t" --quiet disable ua-lab-worker.service
rm -f "$t/etc/systemd/system/ua-lab-worker.service"
init_link=$(readlink "$t/usr/sbin/init")
sh_link=$(readlink "$t/usr/bin/sh")
rm -f "$t/usr/sbin/init" "$t/usr/bin/sh"
release 4.0 "$t"
# v5: v2 (init back) with 48 MiB of new, incompressible data.
ln -s "$init_link" "$t/usr/sbin/init"
ln -s "$sh_link" "$t/usr/bin/sh"
mkdir -p "$t/usr/share/ua-lab"
head -c 48M /dev/urandom >"$t/usr/share/ua-lab/data-5.0"
release 5.0 "$t"
# v6: v2 with one small file added.
rm -f "$t/usr/share/ua-lab/data-5.0"
printf 'update-agent VM lab release 6.0\n' >"$t/usr/share/ua-lab/release-6.0"
release 6.0 "$t"
# v7: v6 with one more small file (scenario 7 publishes it under a rotated key).
printf 'update-agent VM lab release 7.0\n' >"$t/usr/share/ua-lab/release-7.0"
release 7.0 "$t"
# v8: v7 with one more small file (scenario 8 corrupts its slot before the reboot).
printf 'update-agent VM lab release 8.0\n' >"$t/usr/share/ua-lab/release-8.0"
release 8.0 "$t"
# v4.1 (built for kexec scenario kh only): v8's files with an init that blocks forever
# before anything else runs: no panic, no reboot, only the hardware watchdog ends it.
want_kh=0
[[ " ${scenarios[*]} " == *" kh "* ]] && want_kh=1
if ((want_kh)); then
  rm -f "$t/usr/sbin/init"
  cat >"$t/usr/sbin/init" <<'HANG'
#!/bin/sh
# update-agent VM lab, release 4.1: an init that hangs (kexec scenario kh).
echo "UA-LAB: release 4.1: init hangs here, before any service starts" >/dev/console
while :; do sleep 3600; done
HANG
  chmod 0755 "$t/usr/sbin/init"
  release 4.1 "$t"
  rm -f "$t/usr/sbin/init"
  ln -s "$init_link" "$t/usr/sbin/init"
fi
mkdir -p "$w/www/old"
ls -l "$w"/*.img >&2

say "publisher: 2.0 as a delta from 1.0; 3.0, 4.0, 5.0 and 6.0 as deltas from 2.0; 6.0 from 5.0"
# With their dm-verity trees signed: the node builds each tree after the image and
# boots the release through it (the images' initramfs sets the verity device up).
for pair in 2.0:1.0 3.0:2.0 4.0:2.0 5.0:2.0 6.0:2.0 6.0:5.0; do
  "$updatectl_host" bundle create --target "$w/${pair%%:*}.img" --source "$w/${pair##*:}.img" \
    --version "${pair%%:*}" --compatible ua-lab-x86_64 --key "$w/keys/update-agent.key" \
    --out "$w/www" --no-full --level 9 --verity
done
# 7.0 signed by the key root 2 brings, from 6.0 and from 2.0 (so `lab.sh 1 7` works
# too), served where nodes look; and from 6.0 by the old lab key, under old/, where
# scenario 7 points a check by URL.
for k in release2:www:6.0 release2:www:2.0 update-agent:www/old:6.0; do
  IFS=: read -r key out from <<<"$k"
  "$updatectl_host" bundle create --target "$w/7.0.img" --source "$w/$from.img" --version 7.0 \
    --compatible ua-lab-x86_64 --key "$w/keys/$key.key" --out "$w/$out" --no-full --level 9 --verity
done
# 8.0 from 7.0 by the rotated key (after scenario 7), and from 2.0 by the lab key (so
# `lab.sh 1 8` works too).
for k in release2:7.0 update-agent:2.0; do
  "$updatectl_host" bundle create --target "$w/8.0.img" --source "$w/${k#*:}.img" --version 8.0 \
    --compatible ua-lab-x86_64 --key "$w/keys/${k%%:*}.key" --out "$w/www" --no-full --level 9 --verity
done
if ((want_kh)); then
  "$updatectl_host" bundle create --target "$w/4.1.img" --source "$w/2.0.img" --version 4.1 \
    --compatible ua-lab-x86_64 --key "$w/keys/update-agent.key" --out "$w/www" --no-full --level 9 --verity
fi
ls -l "$w/www" >&2

say "the node: GPT disk, $bootloader on the ESP, 1.0 in root-a, root-b empty"
# GRUB's fragment as the package installs it.
UA_VM_FRAGMENT=$t/usr/share/update-agent/grub/update-agent.cfg \
UA_VM_BOOTLOADER=$bootloader UA_VM_CMDLINE=$boot_options UA_VM_CMDLINE_EXTRA='' UA_VM_POWEROFF=0 \
  UA_VM_SLOT_MIB=$slot_mib "$here/make-disk.sh" "$w/disk.img" "$w/1.0.img" - >&2

# ---- running the node
source "$repo/integration/node.sh"
# A slow link for 5.0 only (scenario 4 cuts the power while it downloads): each
# response paced to UA_LAB_RATE bytes a second, so a 16 MiB frame takes longer than
# the UA_LAB_CUT_EVERY seconds between power cuts; every response is logged with the
# bytes sent, to count what was fetched twice.
lab_rate=${UA_LAB_RATE:-3500000}
cut_every=${UA_LAB_CUT_EVERY:-4}
RANGE_SERVER_LOG=$w/served.log RANGE_SERVER_RATE=$lab_rate RANGE_SERVER_DELAY_MATCH=/5.0. \
  start_range_server "$w/www"
http_port=$port
api_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
boots=0
# shellcheck source=lab-helpers.sh
source "$here/lab-helpers.sh"
# shellcheck source=scenarios-update.sh
source "$here/scenarios-update.sh"
# shellcheck source=scenarios-power.sh
source "$here/scenarios-power.sh"
# shellcheck source=scenarios-verity.sh
source "$here/scenarios-verity.sh"
# shellcheck source=scenarios-kexec.sh
source "$here/scenarios-kexec.sh"

say "boot 1: the node runs 1.0"
boot
wait_api
ctl status

for s in "${scenarios[@]}"; do
  case $s in
    [1-9]) "scenario_$s" ;;
    k[0-9h]) kexec_scenario "$s" ;;
    *) fail "unknown scenario $s" ;;
  esac
done

say "power off"
ctl reboot --force >/dev/null 2>&1 || true
wait_down
say "VM lab ($bootloader): scenarios ${scenarios[*]} passed ($boots boots)"
