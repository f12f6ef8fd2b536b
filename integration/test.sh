#!/bin/bash
# integration/test.sh: sets up what is missing, then runs every test tier:
#   1. formatting and lints (cargo fmt --check, clippy -D warnings)
#   2. unit, property and file-level tests (cargo test --workspace)
# Later tiers (loop devices, HTTP, gRPC, the VM lab) are added here as they land.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
# shellcheck source=setup.sh
source "$here/setup.sh"
cd "$repo"

step() { printf '\n== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test (unit, property, payload end-to-end)"
cargo test --workspace --locked

step "all tiers passed"
