#!/bin/bash
# integration/bench/frames.sh [PAIR_DIR]
#
# Frame size against delta size: the realistic pair's delta and full payload built
# by `updatectl bundle create` with the output of one DATA operation of new content
# (--data-chunk-kib, default 16 MiB) and of one delta operation (--delta-chunk-kib,
# default 2 MiB) capped lower, as update_engine splits its operations. Reports the
# payload's size, its operations and its largest frame (compressed bytes, the unit a
# node downloads before it can verify anything). Prints a markdown report.
set -euo pipefail
# shellcheck source=pair.sh
source "$(dirname "$0")/pair.sh"

cd "$repo"
cargo build --release --locked -q --bin updatectl
u=$CARGO_TARGET_DIR/release/updatectl
w=$(mktemp -d /var/tmp/ua-frames-bench.XXXXXX)
trap 'rm -rf "$w"' EXIT
"$u" bundle keygen --out "$w/keys" >/dev/null

# stats FILE: "bytes operations largest_frame"
stats() {
  "$u" bundle inspect "$1" --ops | awk -v size="$(stat -c %s "$1")" '
    $1 ~ /^[0-9]+$/ && $2 ~ /^(ZERO|COPY|DATA|PATCH)$/ { n++; if ($NF > m) m = $NF }
    END { print size, n, m }'
}

rows=()
base=""
# data_chunk_kib:delta_chunk_kib
for c in ${CHUNKS:-16384:2048 8192:2048 4096:2048 2048:2048 1024:1024}; do
  data=${c%%:*} delta=${c##*:}
  echo "bench: data chunk $data KiB, delta chunk $delta KiB..." >&2
  rm -rf "$w/out"
  t0=$(date +%s.%N)
  "$u" bundle create --target "$v2" --source "$v1" --version 2.0 --compatible bench \
    --key "$w/keys/update-agent.key" --out "$w/out" \
    --data-chunk-kib "$data" --delta-chunk-kib "$delta" >/dev/null
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
  read -r dsize dops dmax < <(stats "$(ls "$w"/out/2.0.from-*.uap)")
  read -r fsize fops fmax < <(stats "$w/out/2.0.full.uap")
  [[ -n $base ]] || base="$dsize $fsize"
  read -r bd bf <<<"$base"
  rows+=("| $data KiB / $delta KiB | $dsize ($(awk -v a="$dsize" -v b="$bd" 'BEGIN { printf "%+.1f %%", 100 * (a - b) / b }')) | $dops | $dmax | $fsize ($(awk -v a="$fsize" -v b="$bf" 'BEGIN { printf "%+.1f %%", 100 * (a - b) / b }')) | $fops | $fmax | $secs s |")
done

cat <<MD
## Frame size ($(date -u +%Y-%m-%d), $(nproc) cores)

\`sudo integration/bench/frames.sh\`: the Debian pair, delta and full payload, zstd level 19.

| data / delta chunk (output per op) | delta bytes | delta ops | largest delta frame | full bytes | full ops | largest full frame | create (both) |
|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")
MD
