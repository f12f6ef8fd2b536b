#!/bin/bash
# integration/fleet/run.sh [--nodes N] [--slots K] ...: builds the agent (release) and
# runs fleet.py, a fleet of real agents on loop devices with a real Prometheus (see
# fleet.py and docs/benchmarks.md). Needs root. The last line is a JSON object.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$(dirname "$here")")
source "$repo/integration/setup.sh" >/dev/null
cd "$repo"
[[ $(id -u) -eq 0 ]] || { echo "fleet: needs root (loop devices)" >&2; exit 1; }
cargo build --release --locked -q --bin update-agent --bin updatectl
exec python3 "$here/fleet.py" --agent "$CARGO_TARGET_DIR/release/update-agent" \
  --updatectl "$CARGO_TARGET_DIR/release/updatectl" "$@"
