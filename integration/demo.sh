#!/bin/bash
# integration/demo.sh: the main job end to end on this machine, printing each step.
#
# Builds two real ext4 root images (v1, and v2 = v1 plus changed and added files),
# publishes v2 as a signed full payload and a delta against v1, checks them as a node
# would, writes the delta into a "slot" file, and mounts the result to show it is v2;
# a payload with one corrupted byte is refused. Then the node itself: a GPT disk on a
# loop device running v1 in slot a, `update-agent stage` over HTTP into slot b with
# GRUB armed, a simulated reboot into b, `update-agent boot-check` running a health
# check and committing. Needs root (mkfs, mount, losetup); about a minute on 2 cores.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=setup.sh
source "$here/setup.sh"
# shellcheck source=node.sh
source "$here/node.sh"
cd "$repo"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

say "building updatectl (release)"
cargo build --release --locked -q --bin updatectl --bin update-agent
updatectl=$CARGO_TARGET_DIR/release/updatectl
agent=$CARGO_TARGET_DIR/release/update-agent

work=${DEMO_DIR:-/var/tmp/update-agent-demo}
rm -rf "$work"
mkdir -p "$work"
loop=""
server=""
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
  umount "$work/mnt" 2>/dev/null || true
  [[ -n $server ]] && kill "$server" 2>/dev/null || true
  [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null || true
}
trap cleanup EXIT

say "making two root images from this machine's files (v1, then v2 with a month of changes)"
mkdir -p "$work/v1/usr/lib" "$work/v1/usr/bin" "$work/v1/etc" "$work/v2/usr/share/doc"
# About 100 MB of real binaries and libraries (smallest first, so the pick is stable).
copy_upto() { # SRC DST MB
  find "$1" -maxdepth 1 -type f -printf '%s %p\n' | sort -n | awk -v cap=$(($3 << 20)) \
    '{ t += $1; if (t <= cap) print $2 }' | xargs -r cp -a -t "$2"
}
copy_upto /usr/bin "$work/v1/usr/bin" 40
copy_upto /usr/lib/x86_64-linux-gnu "$work/v1/usr/lib" 60
cp -a /etc/. "$work/v1/etc/" 2>/dev/null || true
echo "VERSION_ID=1.0" >"$work/v1/etc/release"
cp -a "$work/v1/." "$work/v2/"
# v2: a changed release file, patched binaries (a few bytes differ, as after a rebuild),
# a removed directory and newly installed documentation.
echo "VERSION_ID=2.0" >"$work/v2/etc/release"
find "$work/v2/usr/bin" -type f -size +100k | sort | head -20 | while read -r f; do
  printf 'patched-%s' "$(basename "$f")" | dd of="$f" bs=1 seek=4096 conv=notrunc status=none
done
rm -rf "$work/v2/etc/ssl"
find /usr/share/doc -maxdepth 1 -mindepth 1 | sort | head -150 | xargs -r cp -a -t "$work/v2/usr/share/doc"
size=$(du -sm "$work/v2" | cut -f1)
size=$(( (size * 13 / 10 + 64) / 4 * 4 ))M
for v in v1 v2; do
  rm -f "$work/$v.img"
  truncate -s "$size" "$work/$v.img"
  E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -b 4096 -L root -U 6d1b3c2e-0000-4000-8000-000000000001 \
    -E hash_seed=6d1b3c2e-0000-4000-8000-000000000002 -d "$work/$v" "$work/$v.img"
done
ls -l "$work/v1.img" "$work/v2.img"
sha256sum "$work/v1.img" "$work/v2.img"

say "publisher: make a signing key"
run "$updatectl" bundle keygen --out "$work/keys"
mkdir -p "$work/node-keys.d"
cp "$work/keys/update-agent.pub" "$work/node-keys.d/"

say "publisher: bundle v2 as a full payload and a delta from v1 (all cores)"
run "$updatectl" bundle create --target "$work/v2.img" --source "$work/v1.img" \
  --version 2.0 --compatible demo-x86_64 --key "$work/keys/update-agent.key" --out "$work/payloads"
delta=$(ls "$work"/payloads/2.0.from-*.uap)
full=$work/payloads/2.0.full.uap

say "what the delta holds"
run "$updatectl" bundle inspect "$delta"

say "node: verify the delta's signature and blob, rebuild v2 from v1 in a scratch file"
run "$updatectl" bundle verify "$delta" --keys "$work/node-keys.d" --source "$work/v1.img"

say "node without the delta: the full payload, reusing what v1 already has"
run "$updatectl" bundle verify "$full" --keys "$work/node-keys.d" --source "$work/v1.img"

say "node: write the delta into the inactive slot (a file here) and check it"
run "$updatectl" bundle apply "$delta" --keys "$work/node-keys.d" --source "$work/v1.img" --output "$work/slot-b.img"
run sha256sum "$work/v2.img" "$work/slot-b.img"
mkdir -p "$work/mnt"
mount -o ro,loop "$work/slot-b.img" "$work/mnt"
printf 'mounted slot-b: /etc/release says "%s"; /usr/share/doc holds %s packages'"'"' docs\n' \
  "$(cat "$work/mnt/etc/release")" "$(ls "$work/mnt/usr/share/doc" | wc -l)"
umount "$work/mnt"

say "a payload with one flipped byte is refused and nothing is written"
cp "$delta" "$work/corrupt.uap"
len=$(stat -c %s "$work/corrupt.uap")
printf '\x5a' | dd of="$work/corrupt.uap" bs=1 seek=$((len - 1000)) conv=notrunc status=none
set +e
"$updatectl" bundle apply "$work/corrupt.uap" --keys "$work/node-keys.d" --source "$work/v1.img" --output "$work/slot-c.img"
code=$?
set -e
echo "exit code $code (3 = payload rejected); slot-c.img exists: $([[ -e $work/slot-c.img ]] && echo yes || echo no)"
[[ $code -eq 3 && ! -e $work/slot-c.img ]]

say "node: a GPT disk (esp, root-a, root-b, state) on a loop device, running v1 in slot a"
make_node_disk "$work" "$work/v1.img"
sfdisk -l "$loop" | tail -n 5
mkdir -p "$work/health.d"
# A health check as an operator would write one: exit 0 means healthy.
printf '#!/bin/sh\necho "workloads answer"\n' >"$work/health.d/10-demo"
chmod +x "$work/health.d/10-demo"
write_node_config "$work" demo-x86_64 "$work/node-keys.d"
cat >>"$work/agent.toml" <<TOML
[health]
scripts_dir = "$work/health.d"
deadline_secs = 30
reboot_on_failure = false
TOML
start_range_server "$work/payloads"

say "node: stage the release over HTTP into slot b (only the delta's ranges are fetched)"
run "$agent" --config "$work/agent.toml" stage "http://127.0.0.1:$port/$(basename "$delta")"
run grub-editenv "$work/grubenv" list

say "reboot into slot b (modelled: GRUB counts a try down, the kernel line names root-b)"
grub-editenv "$work/grubenv" set ua_tries=2
echo "root=PARTLABEL=root-b ro" >"$work/cmdline"
sed -i "s#^root_device = .*#root_device = \"${loop}p3\"#" "$work/agent.toml"
echo "VERSION_ID=2.0" >"$work/os-release"
run "$agent" --config "$work/agent.toml" boot-check
run grub-editenv "$work/grubenv" list
mount -o ro "${loop}p3" "$work/mnt"
printf 'slot b, now the default: /etc/release says "%s"\n' "$(cat "$work/mnt/etc/release")"
umount "$work/mnt"

say "the daemon: update-agent serve, and updatectl over its API socket"
cat >>"$work/agent.toml" <<TOML
[api]
socket = "$work/agent.sock"
socket_group = ""
TOML
"$agent" --config "$work/agent.toml" serve 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 200); do [[ -S $work/agent.sock ]] && break; sleep 0.05; done
run "$updatectl" --socket "$work/agent.sock" status
run "$updatectl" --socket "$work/agent.sock" history
kill "$daemon"
wait "$daemon" 2>/dev/null || true

say "demo done: files are in $work"
