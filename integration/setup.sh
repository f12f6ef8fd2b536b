#!/bin/bash
# integration/setup.sh: installs what the project needs on a fresh Debian 12 machine
# (idempotent; only missing packages are installed). Sourced or run by demo.sh,
# test.sh and the benchmark scripts.
set -euo pipefail

# command -> Debian package
declare -A want=(
  [mkfs.ext4]=e2fsprogs
  [zstd]=zstd
  [xdelta3]=xdelta3
  [debootstrap]=debootstrap
  [losetup]=mount
  [sfdisk]=fdisk
  [python3]=python3
  [sha256sum]=coreutils
  [grub-editenv]=grub-common
  [grub-emu]=grub-emu
  [mkfs.vfat]=dosfstools
  [mcopy]=mtools
  [partx]=util-linux
  [systemd-analyze]=systemd
  [openssl]=openssl
  [setpriv]=util-linux
  [veritysetup]=cryptsetup-bin
  # promtool checks the example alerting rules; the fleet run starts Prometheus.
  [promtool]=prometheus
)
need=()
export PATH=$PATH:/usr/sbin:/sbin
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${want[$cmd]}")
done
[[ -x /usr/bin/time ]] || need+=(time)
if ((${#need[@]})); then
  echo "setup: installing ${need[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: need root to install packages (run with sudo)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x $HOME/.cargo/bin/cargo ]]; then
    export PATH=$HOME/.cargo/bin:$PATH
  else
    # Debian 12's own rustc (1.63) is too old for this workspace.
    echo "setup: cargo not found; install Rust >= 1.88 with rustup (see README)" >&2
    exit 1
  fi
fi
# Builds go outside the checkout so clean clones on one machine share dependency builds.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/update-agent-target}

# The Python gRPC client of the API tests, in a venv of its own (PyPI, pinned).
export UPDATE_AGENT_PYTHON=${UPDATE_AGENT_PYTHON:-/var/tmp/update-agent-py/bin/python}
py_reqs=$(dirname "${BASH_SOURCE[0]}")/grpc/requirements.txt
python3 -c 'import ensurepip' 2>/dev/null || {
  [[ $(id -u) -eq 0 ]] && apt-get install -y -qq python3-venv >/dev/null
}
if ! cmp -s "$py_reqs" "$(dirname "$UPDATE_AGENT_PYTHON")/../requirements.txt" 2>/dev/null; then
  echo "setup: installing the Python gRPC client into $(dirname "$(dirname "$UPDATE_AGENT_PYTHON")")"
  python3 -m venv "$(dirname "$(dirname "$UPDATE_AGENT_PYTHON")")"
  "$UPDATE_AGENT_PYTHON" -m pip install -q --disable-pip-version-check -r "$py_reqs"
  cp "$py_reqs" "$(dirname "$UPDATE_AGENT_PYTHON")/../requirements.txt"
fi
