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
#      counter brings the node back to v2 without the agent's help; status says so
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

# change_systemd_block SLOT: with the VM down, flips one bit in the first block of
# systemd's binary in SLOT (which holds 8.0), a block every boot reads: where it sits in
# 8.0's image, then on the disk (the slot partition's start).
change_systemd_block() {
  local blk start at
  blk=$(debugfs -R "bmap /usr/lib/systemd/systemd 0" "$w/8.0.img" 2>/dev/null)
  [[ $blk =~ ^[0-9]+$ ]] || fail "cannot find /usr/lib/systemd/systemd in 8.0.img"
  start=$(sfdisk -d "$w/disk.img" | sed -n "s/.*start= *\([0-9]*\),.*name=\"root-$1\".*/\1/p")
  at=$((start * 512 + blk * 4096 + 100))
  python3 -c 'import sys
p, at = sys.argv[1], int(sys.argv[2])
with open(p, "r+b") as f:
    f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0x20]))' "$w/disk.img" "$at"
  log "flipped one bit of byte $at of the disk (slot $1, block $blk of 8.0's image)"
}
# shellcheck source=scenarios-kexec.sh
source "$here/scenarios-kexec.sh"

say "boot 1: the node runs 1.0"
boot
wait_api
ctl status

for s in "${scenarios[@]}"; do
  case $s in
    1)
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
      ;;
    2)
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
      ;;
    3)
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
      ;;
    4)
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
      ;;
    5)
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
      ;;
    6)
      say "scenario 6: manual rollback over the API, 5.0 -> 2.0"
      ctl rollback
      reboot_up
      j=$(status_json)
      ctl status
      [[ $(field "['state']" <<<"$j") == rolled_back && $(field "['running_version']" <<<"$j") == 2.0 ]] \
        || fail "the node did not go back to 2.0: $j"
      field "['last_result']['reason']" <<<"$j" | grep -q 'manual rollback from 5.0 to 2.0' \
        || fail "the reason does not say it was a manual rollback: $j"
      ;;
    7)
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
      ;;
    8)
      say "scenario 8 (verity): 8.0 staged, one byte of its slot changed before the reboot"
      j=$(status_json)
      from=$(field "['running_version']" <<<"$j")
      other=$(field "['other']['name']" <<<"$j")
      ctl update --version 8.0 --wait
      reboot_down
      change_systemd_block "$other"
      say "boots: each try of 8.0 hits the verity error and restarts; then $from again"
      boot_until_api 5
      j=$(status_json)
      ctl status
      grep -a -h 'device-mapper: verity: .*corrupted' "$w"/serial-*.log | head -n 1 \
        || fail "no dm-verity corruption on any trial's console"
      [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "8.0 was not rolled back: $j"
      [[ $(field "['running_version']" <<<"$j") == "$from" ]] || fail "the node does not run $from: $j"
      field "['last_result']['reason']" <<<"$j" | grep -q 'failed its integrity check' \
        || fail "the reason does not name the integrity failure: $j"
      printf 'scenario 8 (verity, %s): passed: a changed block of the staged slot was caught by dm-verity at boot, the node fell back to %s and says "%s"\n' \
        "$bootloader" "$from" "$(field "['last_result']['reason']" <<<"$j" | cut -c1-90)"
      ;;
    9)
      say "scenario 9 (verity): the committed release's slot changes between two boots"
      # A committed release that stops booting (here a changed block of systemd under
      # dm-verity, which restarts the node at every boot) must not loop: the default's
      # guard runs out and the bootloader boots the release before it.
      j=$(status_json)
      from=$(field "['running_version']" <<<"$j")
      ctl update --version 8.0 --wait
      reboot_up
      j=$(status_json)
      [[ $(field "['state']" <<<"$j") == committed && $(field "['running_version']" <<<"$j") == 8.0 ]] \
        || fail "8.0 was not committed: $j"
      slot=$(field "['booted']['name']" <<<"$j")
      reboot_down --force
      # GRUB: ua_boots=3 in grubenv; systemd-boot: the default's entry renamed
      # …-SLOT-8.0@default+3.conf, counted by the loader like a trial.
      if [[ $bootloader == grub ]]; then
        grep -q '^ua_boots=3$' <<<"$("$here/grubenv.sh" "$w/disk.img" list)" \
          || fail "the committed default is not guarded: $("$here/grubenv.sh" "$w/disk.img" list | tr '\n' ' ')"
      else
        grep -q -- "-$slot-8\.0@default+3\.conf\$" <<<"$(esp_entries)" \
          || fail "the committed default is not guarded: $(esp_entries | tr '\n' ' ')"
      fi
      change_systemd_block "$slot"
      say "boots: each boot of 8.0 hits the verity error and restarts; after 3 the bootloader boots $from"
      first=$((boots + 1))
      boot_until_api 5
      j=$(status_json)
      ctl status
      tried=$(grep -a -l 'device-mapper: verity: .*corrupted' $(seq -f "$w/serial-%g.log" "$first" "$boots") 2>/dev/null | wc -l)
      ((tried == 3)) || fail "8.0 was booted $tried times with the verity error, not 3"
      [[ $(field "['state']" <<<"$j") == rolled_back ]] || fail "8.0 was not rolled back: $j"
      [[ $(field "['running_version']" <<<"$j") == "$from" ]] || fail "the node does not run $from: $j"
      field "['last_result']['reason']" <<<"$j" | grep -q "slot $slot stopped booting.*failed its integrity check" \
        || fail "the reason does not name the stopped slot and the integrity failure: $j"
      printf 'scenario 9 (verity, %s): passed: a changed block of the committed slot restarted 3 boots in a row, the bootloader fell back to %s and the node says "%s"\n' \
        "$bootloader" "$from" "$(field "['last_result']['reason']" <<<"$j" | cut -c1-100)"
      ;;
    k[0-9h]) kexec_scenario "$s" ;;
    *) fail "unknown scenario $s" ;;
  esac
done

say "power off"
ctl reboot --force >/dev/null 2>&1 || true
wait_down
say "VM lab ($bootloader): scenarios ${scenarios[*]} passed ($boots boots)"
