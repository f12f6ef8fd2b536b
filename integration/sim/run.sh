#!/bin/bash
# integration/sim/run.sh [NODES] [SLOTS] [FAILURE_RATE]: the rollout simulation
# (agent/examples/rollout_sim.rs, the agent's own policy code under a simulated clock)
# and its plot, docs/rollout-sim.png (matplotlib from PyPI, pinned, into the project's
# venv). Numbers: docs/benchmarks.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$(dirname "$here")")
source "$repo/integration/setup.sh" >/dev/null
cd "$repo"
venv=$(dirname "$(dirname "$UPDATE_AGENT_PYTHON")")
if ! cmp -s "$here/requirements.txt" "$venv/sim-requirements.txt" 2>/dev/null; then
  "$UPDATE_AGENT_PYTHON" -m pip install -q --disable-pip-version-check -r "$here/requirements.txt"
  cp "$here/requirements.txt" "$venv/sim-requirements.txt"
fi
cargo build --release --locked -q --example rollout_sim
csv=$(mktemp)
trap 'rm -f "$csv"' EXIT
ROLLOUT_SIM_CSV=$csv "$CARGO_TARGET_DIR/release/examples/rollout_sim" "$@"
"$UPDATE_AGENT_PYTHON" "$here/plot.py" "$csv" docs/rollout-sim.png
echo "plot: docs/rollout-sim.png"
