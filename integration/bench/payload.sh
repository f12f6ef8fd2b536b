#!/bin/bash
# integration/bench/payload.sh [PAIR_DIR]
#
# Payload benchmark: our delta and full payload against xdelta3, zstd --patch-from and
# 4 KiB block reuse, side by side in one run on the realistic Debian image pair that
# ../shared/bench/make-image-pair.sh builds (cached in PAIR_DIR). Prints a markdown
# report (also written to PAIR_DIR/../payload-bench.md). Needs root the first time
# (debootstrap). Sizes are bytes on the wire; times are wall clock, best of 3 for
# apply; peak RSS is /usr/bin/time's maximum resident set size, mapped files included.
set -euo pipefail
# shellcheck source=pair.sh
source "$(dirname "$0")/pair.sh"

cd "$repo"
cargo build --release --locked -q --bin updatectl
u=$CARGO_TARGET_DIR/release/updatectl
w=$(mktemp -d /var/tmp/ua-payload-bench.XXXXXX)
trap 'rm -rf "$w"' EXIT

# timed LABEL CMD...: runs CMD, records "wall_s rss_kb" in $w/LABEL.t
timed() {
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$w/$label.t" "$@" >"$w/$label.out" 2>&1 ||
    { cat "$w/$label.out" >&2; echo "bench: $label failed" >&2; exit 1; }
}
wall() { cut -d' ' -f1 "$w/$1.t"; }
rss_mb() { awk '{printf "%.0f", $2/1024}' "$w/$1.t"; }
# best LABEL N CMD...: keeps the fastest of N runs as LABEL
best() {
  local label=$1 n=$2; shift 2
  local b=""
  for i in $(seq "$n"); do
    timed "$label.$i" "$@"
    if [[ -z $b ]] || awk -v a="$(wall "$label.$i")" -v b="$(wall "$label.$b")" 'BEGIN{exit !(a<b)}'; then b=$i; fi
  done
  cp "$w/$label.$b.t" "$w/$label.t"
}
size() { stat -c %s "$1"; }
mb() { awk -v n="$1" 'BEGIN{printf "%.2f MB", n/1e6}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", a/b}'; }

echo "bench: creating (xdelta3, zstd, ours)..." >&2
timed xd_create xdelta3 -e -9 -S lzma -f -s "$v1" "$v2" "$w/x.vcdiff"
timed zs_create zstd -q -f -19 --long=31 --patch-from="$v1" "$v2" -o "$w/z.zst"
"$u" bundle keygen --out "$w/keys" >/dev/null
mkdir -p "$w/trust" && cp "$w/keys/update-agent.pub" "$w/trust/"
common=(--target "$v2" --source "$v1" --version 2 --compatible bench --key "$w/keys/update-agent.key")
timed ua_delta "$u" bundle create "${common[@]}" --out "$w/d" --no-full
timed ua_full "$u" bundle create "${common[@]}" --out "$w/f" --no-deltas
delta=$(ls "$w"/d/2.from-*.uap)
full=$w/f/2.full.uap

echo "bench: 4 KiB block reuse figure..." >&2
python3 - "$v1" "$v2" "$w/absent.bin" <<'PY'
import sys
bs = 4096
have = set()
with open(sys.argv[1], 'rb') as f:
    while b := f.read(bs):
        have.add(b)
zero = bytes(bs)
with open(sys.argv[2], 'rb') as f, open(sys.argv[3], 'wb') as out:
    while b := f.read(bs):
        if b != zero and b not in have:
            out.write(b)
PY
zstd -q -f -19 "$w/absent.bin" -o "$w/absent.zst"

echo "bench: applying (best of 3 each)..." >&2
sync
best xd_apply 3 xdelta3 -d -f -s "$v1" "$w/x.vcdiff" "$w/x.out"
best zs_apply 3 zstd -q -d -f --long=31 --patch-from="$v1" "$w/z.zst" -o "$w/z.out"
best ua_apply 3 "$u" bundle apply "$delta" --keys "$w/trust" --source "$v1" --output "$w/u.out"
cmp -s "$w/u.out" "$v2" || { echo "bench: our output differs from v2" >&2; exit 1; }
timed ua_full_apply "$u" bundle verify "$full" --keys "$w/trust" --source "$v1"
full_dl=$(grep '^download' "$w/ua_full_apply.out" | sed 's/.*= \([0-9.]* [kMG]B\).*/\1/')
full_dl_bytes=$(python3 -c "
import re,sys
v,u=re.match(r'([0-9.]+) ([kMG]B)', sys.argv[1]).groups()
print(int(float(v)*{'kB':1e3,'MB':1e6,'GB':1e9}[u]))" "$full_dl")

xd=$(size "$w/x.vcdiff"); zs=$(size "$w/z.zst"); ua=$(size "$delta"); br=$(size "$w/absent.zst")
report=$(cat <<MD
## Payload benchmark ($(date -u +%Y-%m-%d), $(nproc) cores, $(uname -r))

Image pair: \`$(basename "$v1")\` → \`$(basename "$v2")\` ($(mb "$(size "$v2")") each), built by make-image-pair.sh.
Command: \`sudo integration/bench/payload.sh\`

| what | bytes | vs xdelta3 | create | apply (best of 3) | apply peak RSS |
|---|---|---|---|---|---|
| xdelta3 -e -9 -S lzma | $(mb "$xd") | 1.000 | $(wall xd_create) s | $(wall xd_apply) s | $(rss_mb xd_apply) MiB |
| zstd -19 --long=31 --patch-from | $(mb "$zs") | $(ratio "$zs" "$xd") | $(wall zs_create) s | $(wall zs_apply) s | $(rss_mb zs_apply) MiB |
| 4 KiB block reuse (v2 blocks absent from v1, zstd -19) | $(mb "$br") | $(ratio "$br" "$xd") | | | |
| **update-agent delta** | $(mb "$ua") | **$(ratio "$ua" "$xd")** | $(wall ua_delta) s | $(wall ua_apply) s | $(rss_mb ua_apply) MiB |
| update-agent full payload (whole file) | $(mb "$(size "$full")") | $(ratio "$(size "$full")" "$xd") | $(wall ua_full) s | | |
| update-agent full payload, downloaded by a node on v1 | $full_dl | $(ratio "$full_dl_bytes" "$xd") (vs block reuse $(ratio "$full_dl_bytes" "$br")) | | $(wall ua_full_apply) s | $(rss_mb ua_full_apply) MiB |

Targets: delta ≤ 0.9 × xdelta3 → $(ratio "$ua" "$xd"); full payload download on v1 ≤ block reuse → $(ratio "$full_dl_bytes" "$br");
apply ≤ xdelta3 -d → $(ratio "$(wall ua_apply)" "$(wall xd_apply)") with RSS $(rss_mb ua_apply) MiB (≤ 64); create ≤ 2 × xdelta3 → $(ratio "$(wall ua_delta)" "$(wall xd_create)").
Our apply time is the whole \`updatectl bundle apply\`: signature, blob sha256, every DATA/PATCH/COPY operation's sha256, fsync, and a read-back sha256 of the whole target (the source is hashed only if an operation fails).
MD
)
echo "$report"
echo "$report" >"$(dirname "$pair")/payload-bench.md"
