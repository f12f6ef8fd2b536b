#!/bin/bash
# integration/bench/api.sh [SECONDS_IDLE] [SECONDS_LOAD] [RATE]
#
# API benchmark: `update-agent serve` (release build) on a loop-device node with a
# full history (200 records, the cap), the unattended loop running (a maintenance
# window configured) and the metrics endpoint on. First idle for 60 s: RSS, CPU time and
# context switches (wake-ups) of all its threads. Then GetStatus over the Unix socket
# at a steady 1,000 calls/s for 30 s (agent/examples/status_load.rs, open loop):
# latency percentiles, and the daemon's CPU and RSS under that load; then 500
# scrapes of /metrics. Then the same load under attack (docs/security.md): 200 TCP
# connections held silent on the mutual-TLS listener and one check hung on a release
# server that never answers. Needs root.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$(dirname "$here")")
# shellcheck source=../setup.sh
source "$repo/integration/setup.sh"
# shellcheck source=../node.sh
source "$repo/integration/node.sh"
idle=${1:-60}
load=${2:-30}
rate=${3:-1000}

cd "$repo"
cargo build --release --locked -q --bin update-agent --bin updatectl --example status_load
bin=$CARGO_TARGET_DIR/release
load_gen=$bin/examples/status_load
# UA_BENCH_BIN=DIR: the update-agent and updatectl of another build (an older
# release, for a before/after comparison in one sitting); the load generator stays
# this checkout's.
bin=${UA_BENCH_BIN:-$bin}
w=$(mktemp -d /var/tmp/ua-api-bench.XXXXXX)
loop=""
daemon=""
cleanup() {
  [[ -n $daemon ]] && kill "$daemon" 2>/dev/null || true
  [[ -n ${blackhole:-} ]] && kill "$blackhole" 2>/dev/null || true
  [[ -n ${flood:-} ]] && kill "$flood" 2>/dev/null || true
  [[ -n $loop ]] && losetup -d "$loop" 2>/dev/null || true
  rm -rf "$w"
}
trap cleanup EXIT

truncate -s 16M "$w/v1.img"
make_node_disk "$w" "$w/v1.img"
"$bin/updatectl" bundle keygen --out "$w/keys" >/dev/null
mkdir -p "$w/keys.d" "$w/state" && cp "$w/keys/update-agent.pub" "$w/keys.d/"
python3 - "$w/state/history.json" <<'PY'
import json, sys
entries = [{"version": f"1.{i}", "from_version": f"1.{i-1}", "slot": "b" if i % 2 else "a",
            "outcome": "committed" if i % 5 else "rolled_back",
            "reason": "" if i % 5 else "unit kubelet.service: failed 40 s after start",
            "bytes_fetched": 6830000, "at": 1790000000 + i * 604800} for i in range(1, 201)]
json.dump(entries, open(sys.argv[1], "w"))
PY
write_node_config "$w" bench "$w/keys.d"
metrics_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# The unattended loop runs (a window is configured) and metrics are served, as on a
# fleet node: the idle numbers include both.
cat >>"$w/agent.toml" <<TOML
[api]
socket = "$w/agent.sock"
socket_group = ""
[auto]
time_zone = "UTC"
machine_id = "$w/machine-id"
windows = [{ days = ["sat"], start = "02:00", length = "3h" }]
[metrics]
listen = "127.0.0.1:$metrics_port"
TOML
echo 0123456789abcdef0123456789abcdef >"$w/machine-id"
# The attack phase: a TLS listener to flood, and a release server that accepts and
# never answers (a check on it hangs until api.limits.check_timeout_secs).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
tcp_port=$(free_port)
mkdir -p "$w/pki"
( cd "$w/pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -subj /CN=bench-ca -days 2 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr -subj /CN=node 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 2 -extfile server.ext 2>/dev/null )
python3 - "$w/blackhole.port" <<'PY' &
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(64)
open(sys.argv[1], "w").write(str(s.getsockname()[1]))
held = []
while True:
    held.append(s.accept()[0])
PY
blackhole=$!
for _ in $(seq 100); do [[ -s $w/blackhole.port ]] && break; sleep 0.05; done
cat >>"$w/agent.toml" <<TOML
[releases]
url = "http://127.0.0.1:$(cat "$w/blackhole.port")/rel"
TOML
sed -i "s|^socket_group = \"\"|socket_group = \"\"\ntcp_listen = \"127.0.0.1:$tcp_port\"\ntls_cert = \"$w/pki/server.crt\"\ntls_key = \"$w/pki/server.key\"\ntls_client_ca = \"$w/pki/ca.crt\"\ntls_allowed_clients = [\"spiffe://bench/controller\"]|" "$w/agent.toml"

# As update-agent.service runs it (one malloc arena: the blocking pool's threads would
# otherwise each keep an arena's pages after they exit).
MALLOC_ARENA_MAX=1 RUST_LOG=warn "$bin/update-agent" --config "$w/agent.toml" serve &
daemon=$!
for _ in $(seq 200); do [[ -S $w/agent.sock ]] && break; sleep 0.05; done
"$bin/updatectl" --socket "$w/agent.sock" status >/dev/null

# CPU ticks (utime+stime), context switches of every thread, RSS.
ticks() { awk '{print $14 + $15}' "/proc/$daemon/stat"; }
switches() { cat /proc/"$daemon"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$daemon/status"; }
threads() { ls /proc/"$daemon"/task | wc -l; }
hz=$(getconf CLK_TCK)

# The status call above ran on tokio's blocking pool, whose idle threads end after
# 10 s: start counting once they have (their switches leave the sum when they do).
sleep 12
t0=$(ticks); s0=$(switches)
echo "bench: idle for $idle s..." >&2
sleep "$idle"
t1=$(ticks); s1=$(switches)
idle_rss=$(rss_kib)
idle_threads=$(threads)

echo "bench: GetStatus at $rate/s for $load s..." >&2
l0=$(ticks)
result=$("$load_gen" "$w/agent.sock" "$rate" "$load")
l1=$(ticks)
echo "bench: GET /metrics 500 times..." >&2
scrape=$(python3 - "$metrics_port" <<'PY'
import http.client, sys, time
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
lat = []
for _ in range(500):
    t = time.perf_counter()
    c.request("GET", "/metrics")
    r = c.getresponse()
    body = r.read()
    lat.append((time.perf_counter() - t) * 1000)
    assert r.status == 200 and b"update_agent_updates_total" in body
lat.sort()
print(f"p50 {lat[250]:.2f} ms, p99 {lat[495]:.2f} ms, {len(body)} bytes")
PY
)
load_rss=$(rss_kib)
peak_rss=$(awk '/^VmHWM/ {print $2}' "/proc/$daemon/status")

echo "bench: under attack: 200 silent TCP connections and a hung check..." >&2
python3 - "$tcp_port" <<'PY' &
import socket, sys, time
held = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(200)]
time.sleep(3600)
PY
flood=$!
"$bin/updatectl" --socket "$w/agent.sock" check --version 9.9 >"$w/hung-check.out" 2>&1 &
hung=$!
sleep 2
attack=$("$load_gen" "$w/agent.sock" "$rate" "$load")
attack_fds=$(ls /proc/"$daemon"/fd | wc -l)
# The check ends at api.limits.check_timeout_secs (60 s); an older build without
# that deadline is stopped after as long.
for _ in $(seq 70); do kill -0 "$hung" 2>/dev/null || break; sleep 1; done
kill "$hung" 2>/dev/null || true
wait "$hung" 2>/dev/null || true
attack_rss=$(rss_kib)

cat <<EOF2
## GetStatus over the Unix socket ($(date -u +%Y-%m-%d), $(nproc) cores)

| measure | value |
|---|---|
| idle ${idle} s: CPU time | $(( (t1 - t0) * 1000 / hz )) ms |
| idle ${idle} s: context switches (all threads) | $(( s1 - s0 )) |
| idle RSS | $(( idle_rss / 1024 )).$(( idle_rss % 1024 * 10 / 1024 )) MiB ($idle_threads threads) |
| load: $rate calls/s for $load s | $result |
| GET /metrics, 500 sequential scrapes (200 history records) | $scrape |
| load: daemon CPU | $(( (l1 - l0) * 1000 / hz / load )) ms per second ($(( (l1 - l0) * 100 / hz / load ))% of one core) |
| RSS after load / peak | $(( load_rss / 1024 )).$(( load_rss % 1024 * 10 / 1024 )) MiB / $(( peak_rss / 1024 )).$(( peak_rss % 1024 * 10 / 1024 )) MiB |
| under attack (200 silent TCP connections, one hung check): $rate calls/s for $load s | $attack |
| under attack: daemon descriptors, RSS after | $attack_fds, $(( attack_rss / 1024 )).$(( attack_rss % 1024 * 10 / 1024 )) MiB |
| the hung check ended with | $(tail -1 "$w/hung-check.out") |
EOF2
