#!/bin/bash
# integration/bench/resume.sh [PAIR_DIR]
#
# Staging under interruptions: the realistic pair's delta (v1 -> v2) staged by the
# real `update-agent stage` onto a loop-device slot from integration/range-server.py
# on 127.0.0.1, its range bodies paced to RATE bytes a second (default 1,500,000, the
# link of issue 20), under each profile:
#   clean  no interruption;
#   drops  every connection closed after CUT bytes of its body (default 1 MiB, less
#          than the delta's largest frame);
#   kills  the process SIGKILLed after a random 0.05 s to KILL_MAX_MS (default 2500)
#          (bash RANDOM, seeded with SEED), restarted at once, until the release is
#          armed.
# for the binaries built from this checkout ("after") and, when BEFORE names a
# directory holding another build's `update-agent` (e.g. main's release build), for
# that one too ("before"). Reports, per profile, the bytes the server sent over the
# payload's size and the wall time to an armed release (restarts included). A run
# that has not finished after LIMIT seconds (default 600) is stopped and reported
# with what it had cost so far; one that fails (drops, before) is restarted like a
# kill, as an operator or the unattended loop would, so its cost is comparable.
# Needs root. Prints a markdown report.
set -euo pipefail
# shellcheck source=pair.sh
source "$(dirname "$0")/pair.sh"
# shellcheck source=../node.sh
source "$repo/integration/node.sh"
rate=${RATE:-1500000}
cut=${CUT:-1048576}
limit=${LIMIT:-600}
seed=${SEED:-20}
kill_max=${KILL_MAX_MS:-2500}
profiles=(${PROFILES:-clean drops kills})

cd "$repo"
cargo build --release --locked -q --bin updatectl --bin update-agent
after=$CARGO_TARGET_DIR/release
w=$(mktemp -d /var/tmp/ua-resume-bench.XXXXXX)
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
"$after/updatectl" bundle keygen --out "$w/keys" >/dev/null
mkdir -p "$w/keys.d" "$w/www" && cp "$w/keys/update-agent.pub" "$w/keys.d/"
"$after/updatectl" bundle create --target "$v2" --source "$v1" --version 2.0 --compatible bench \
  --key "$w/keys/update-agent.key" --out "$w/www" --no-full >/dev/null
delta=$(cd "$w/www" && ls 2.0.from-*.uap)
payload=$(stat -c %s "$w/www/$delta")
largest=$("$after/updatectl" bundle inspect "$w/www/$delta" --ops |
  awk '$1 ~ /^[0-9]+$/ && $2 ~ /^(DATA|PATCH)$/ && $NF > m { m = $NF } END { print m + 0 }')
write_node_config "$w" bench "$w/keys.d"
size=$(stat -c %s "$v2")

# run_profile BIN PROFILE LOG: stages until armed (or LIMIT), the runs' output in LOG;
# prints "seconds served runs kills failures state".
run_profile() {
  local bin=$1 profile=$2 out=$3
  rm -rf "$w/state" "$w/served.log"
  grub-editenv "$w/grubenv" set ua_default=a ua_trial= ua_a_ok=1 ua_b_ok=1
  export RANGE_SERVER_LOG=$w/served.log RANGE_SERVER_RATE=$rate RANGE_SERVER_CUT_AFTER=0
  [[ $profile == drops ]] && RANGE_SERVER_CUT_AFTER=$cut
  start_range_server "$w/www"
  local url="http://127.0.0.1:$port/$delta" t0 runs=0 kills=0 fails=0 state="" pid ms
  RANDOM=$seed
  t0=$(date +%s.%N)
  while :; do
    runs=$((runs + 1))
    "$bin/update-agent" --config "$w/agent.toml" stage "$url" >>"$out" 2>&1 &
    pid=$!
    ms=$((50 + RANDOM % (kill_max - 49)))
    # Other profiles: until it ends, or LIMIT is reached.
    [[ $profile == kills ]] || ms=$(awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$limit" 'BEGIN { printf "%d", 1000 * (l - (b - a)) }')
    # By the clock (microseconds), not by counting sleeps, which drift under load.
    local until=$((${EPOCHREALTIME/./} + ms * 1000))
    while kill -0 "$pid" 2>/dev/null && ((${EPOCHREALTIME/./} < until)); do
      sleep 0.01
    done
    if kill -9 "$pid" 2>/dev/null; then
      kills=$((kills + 1))
      wait "$pid" 2>/dev/null || true
    elif ! wait "$pid"; then
      fails=$((fails + 1))
    fi
    state=$(python3 -c "import json;print(json.load(open('$w/state/state.json'))['state'])" 2>/dev/null || echo none)
    [[ $state == armed ]] && break
    awk -v a="$t0" -v b="$(date +%s.%N)" -v l="$limit" 'BEGIN { exit !(b - a < l) }' || break
  done
  local secs served
  secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  server=""
  served=$(awk -v d="/$delta" '$1 == d { s += $4 } END { print s + 0 }' "$w/served.log")
  if [[ $state == armed ]]; then
    cmp -s <(head -c "$size" "${loop}p3") "$v2" || { echo "bench: slot b does not hold v2 ($profile)" >&2; exit 1; }
  fi
  echo "$secs $served $runs $kills $fails $state"
}

rows=()
for build in before after; do
  if [[ $build == before ]]; then
    [[ -n ${BEFORE:-} ]] || continue
    bin=$BEFORE
  else
    bin=$after
  fi
  for p in "${profiles[@]}"; do
    echo "bench: $build, $p..." >&2
    read -r secs served runs kills fails state < <(run_profile "$bin" "$p" "$w/$build-$p.log")
    ratio=$(awk -v a="$served" -v b="$payload" 'BEGIN { printf "%.2f", a / b }')
    done_txt="$secs s"
    [[ $state == armed ]] || done_txt="not armed after $secs s (state $state)"
    rows+=("| $build | $p | $done_txt | $served | **$ratio** | $runs | $kills | $fails |")
  done
done

cat <<MD
## Staging under interruptions ($(date -u +%Y-%m-%d), $(nproc) cores)

\`sudo ${BEFORE:+BEFORE=$BEFORE }integration/bench/resume.sh\`: the Debian pair's delta ($payload bytes, largest frame
$largest bytes) staged by \`update-agent stage\` into slot b of a loop-device disk, served by
integration/range-server.py at $rate bytes/s; drops: every connection closed after $cut body bytes;
kills: SIGKILL after 50-$kill_max ms at random (seed $seed), restarted at once; a failed run is restarted too.

| build | profile | time to armed | bytes served | served / payload | runs | kills | failed runs |
|---|---|---|---|---|---|---|---|
$(printf '%s\n' "${rows[@]}")
MD
