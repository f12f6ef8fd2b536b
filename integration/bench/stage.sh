#!/bin/bash
# integration/bench/stage.sh [PAIR_DIR]
#
# Staging benchmark: the real `update-agent stage` taking v1 -> v2 from a local HTTP
# server (range requests) onto a loop-device slot of a GPT disk, beside `xdelta3 -d`
# on the same pair and the raw sequential write speed of the same loop device
# (dd oflag=direct, 1 GiB), in one run; then the same release signed with its
# dm-verity tree (`bundle create --verity`) staged twice, alternating with the plain
# one, for the cost of building the tree on the node. Needs root. Prints a markdown
# report.
set -euo pipefail
# shellcheck source=pair.sh
source "$(dirname "$0")/pair.sh"
# shellcheck source=../node.sh
source "$repo/integration/node.sh"
size=$(stat -c %s "$v2")

cd "$repo"
cargo build --release --locked -q --bin updatectl --bin update-agent
bin=$CARGO_TARGET_DIR/release
w=$(mktemp -d /var/tmp/ua-stage-bench.XXXXXX)
loop=""
server=""
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null || true
  [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null || true
  [[ -n ${KEEP:-} ]] || rm -rf "$w"
}
trap cleanup EXIT

echo "bench: building the disk and the payload..." >&2
make_node_disk "$w" "$v1"

"$bin/updatectl" bundle keygen --out "$w/keys" >/dev/null
mkdir -p "$w/keys.d" "$w/www" && cp "$w/keys/update-agent.pub" "$w/keys.d/"
"$bin/updatectl" bundle create --target "$v2" --source "$v1" --version 2.0 --compatible bench \
  --key "$w/keys/update-agent.key" --out "$w/www" --no-full >/dev/null
delta=$(cd "$w/www" && ls 2.0.from-*.uap)
mkdir -p "$w/www/verity"
"$bin/updatectl" bundle create --target "$v2" --source "$v1" --version 2.0 --compatible bench \
  --key "$w/keys/update-agent.key" --out "$w/www/verity" --no-full --verity >/dev/null
root=$("$bin/updatectl" bundle inspect --json "$w/www/verity/$delta" | python3 -c 'import json,sys;print(json.load(sys.stdin)["verity"]["root_hash"])')

start_range_server "$w/www"

write_node_config "$w" bench "$w/keys.d"

echo "bench: staging (update-agent), xdelta3 -d, dd oflag=direct..." >&2
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
/usr/bin/time -f "%e %M" -o "$w/stage.t" "$bin/update-agent" --config "$w/agent.toml" stage \
  "http://127.0.0.1:$port/$delta" >"$w/stage.out"
cmp -s <(head -c "$size" "${loop}p3") "$v2" || { echo "bench: slot b does not hold v2" >&2; exit 1; }
cat "$w/stage.out" >&2
fetched=$(python3 -c "import json;print(json.load(open('$w/state/state.json'))['staged']['bytes_fetched'])")
xdelta3 -e -9 -S lzma -f -s "$v1" "$v2" "$w/x.vcdiff"
sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
/usr/bin/time -f "%e %M" -o "$w/xd.t" xdelta3 -d -f -s "$v1" "$w/x.vcdiff" "$w/x.out"
# The dm-verity cost: plain and --verity staged alternately (cancel in between), cold
# cache each time; the tree must be one veritysetup accepts.
stage_again() { # NAME PATH
  "$bin/update-agent" --config "$w/agent.toml" cancel >/dev/null
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "%e %M" -o "$w/$1.t" "$bin/update-agent" --config "$w/agent.toml" stage \
    "http://127.0.0.1:$port/$2" >"$w/$1.out"
}
pairs=${PAIRS:-5}
for i in $(seq "$pairs"); do
  stage_again "plain$i" "$delta"
  stage_again "verity$i" "verity/$delta"
  veritysetup verify "${loop}p3" "${loop}p3" "$root" --hash-offset="$size" \
    || { echo "bench: veritysetup does not accept the tree on slot b" >&2; exit 1; }
done
/usr/bin/time -f "%e %M" -o "$w/dd.t" dd if=/dev/zero of="${loop}p3" bs=4M count=$(( size / 4194304 )) oflag=direct status=none

t() { cut -d' ' -f1 "$w/$1.t"; }
# med KIND: the median wall time of the KIND1..KINDn stagings.
med() { for i in $(seq "$pairs"); do t "$1$i"; done | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'; }
# low KIND: the fastest of the KIND1..KINDn stagings.
low() { for i in $(seq "$pairs"); do t "$1$i"; done | sort -n | head -1; }
# phase NAME: seconds from "verifying the whole slot" to "armed" in the agent's output.
phase() {
  sed -n 's/^\[ *\([0-9.]*\)s\] \(verifying\|armed\).*/\2 \1/p' "$w/$1.out" |
    awk '/^verifying/{v=$2} /^armed/{a=$2} END{printf "%.2f", a-v}'
}
lowphase() { for i in $(seq "$pairs"); do phase "$1$i"; echo; done | sort -n | head -1; }
r() { awk '{printf "%.0f", $2/1024}' "$w/$1.t"; }
worst=$(awk -v a="$(t xd)" -v b="$(t dd)" 'BEGIN{print (a>b)?a:b}')
cat <<MD
## Staging benchmark ($(date -u +%Y-%m-%d), $(nproc) cores)

\`sudo integration/bench/stage.sh\`: v1 → v2 of the Debian pair ($size bytes), delta served over
HTTP from 127.0.0.1, written by \`update-agent stage\` into slot b of a GPT disk on a loop device
(cold page cache for each timed command).

| what | wall | peak RSS | bytes fetched |
|---|---|---|---|
| update-agent stage (fetch, apply, per-operation hashes, fsync, O_DIRECT read-back hash, GRUB arm) | $(t stage) s | $(r stage) MiB | $fetched |
| xdelta3 -d (to a file, no verification) | $(t xd) s | $(r xd) MiB | $(stat -c %s "$w/x.vcdiff") |
| dd 1 GiB to the same loop device, oflag=direct | $(t dd) s | | |

dm-verity (the tree built on the node from the read-back's bytes, root checked before
arming; \`veritysetup verify\` accepted slot b), staged alternately with the plain delta:

| pair | plain | --verity | ratio | verify phase: plain | verify phase: --verity |
|---|---|---|---|---|---|
$(for i in $(seq "$pairs"); do
  printf '| %s | %s s | %s s | %s | %s s | %s s |\n' "$i" "$(t "plain$i")" "$(t "verity$i")" \
    "$(awk -v a="$(t "plain$i")" -v b="$(t "verity$i")" 'BEGIN{printf "%.3f", b/a}')" \
    "$(phase "plain$i")" "$(phase "verity$i")"
done)

The verify phase is the agent's own clock from "verifying the whole slot" to "armed":
the read-back, and with --verity the tree built from it (no second whole-image hash).
Fastest of each kind (what the machine's other load did not slow): plain $(low plain) s,
--verity $(low verity) s, ratio $(awk -v a="$(low plain)" -v b="$(low verity)" 'BEGIN{printf "%.3f", b/a}'); verify phase plain $(lowphase plain) s, --verity $(lowphase verity) s.

Medians: plain $(med plain) s, --verity $(med verity) s, ratio $(awk -v a="$(med plain)" -v b="$(med verity)" 'BEGIN{printf "%.3f", b/a}'); median of the pair ratios $(for i in $(seq "$pairs"); do awk -v a="$(t "plain$i")" -v b="$(t "verity$i")" 'BEGIN{printf "%.3f\n", b/a}'; done | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}'). Peak RSS with the tree: $(r verity1) MiB (plain $(r plain1) MiB). Target: --verity ≤ 1.15 × plain.

Target: stage ≤ 1.2 × max(xdelta3 -d, dd) = $(awk -v w="$worst" 'BEGIN{printf "%.2f", 1.2*w}') s → $(awk -v s="$(t stage)" -v w="$worst" 'BEGIN{printf "%.2f", s/w}') × max.
MD
