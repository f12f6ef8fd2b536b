#!/bin/bash
# integration/vm/install-agent.sh TREE DEB: installs the update-agent .deb into an
# image root as a distribution's image build would, for the VM lab's releases:
#   * dpkg --root runs the maintainer scripts chrooted in TREE (sysusers' group, the
#     `updatectl` alternative); skipped when TREE has that package version already
#   * an upgrade must keep the agent.toml the image had (a conffile the lab changed)
#   * then what the package leaves to the image: tmpfiles' directories (in dpkg's
#     chroot tmpfiles has no /proc, and the root is read-only at run time) and the
#     units enabled (the package does not enable them: docs/packaging.md)
set -euo pipefail
tree=${1:?usage: install-agent.sh TREE DEB} deb=${2:?usage: install-agent.sh TREE DEB}
export PATH=$PATH:/usr/sbin:/sbin
fail() { echo "vm/install-agent: FAIL: $*" >&2; exit 1; }
admin=$tree/var/lib/dpkg
want=$(dpkg-deb -f "$deb" Version)
have=$(dpkg-query --admindir="$admin" -W -f='${Version}' update-agent 2>/dev/null || true)
conf=$tree/etc/update-agent/agent.toml
if [[ $have != "$want" ]]; then
  before=""
  [[ -z $have ]] || before=$(cat "$conf")
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  # --force-confold as image builds do: never stop to ask about a conffile.
  dpkg --root="$tree" --force-confold -i "$deb" >"$log" 2>&1 || { cat "$log" >&2; fail "dpkg -i $deb"; }
  if [[ -n $have ]]; then
    [[ $(cat "$conf") == "$before" ]] || fail "the upgrade $have -> $want did not keep agent.toml"
    echo "vm/install-agent: update-agent $have -> $want, agent.toml kept" >&2
  else
    echo "vm/install-agent: update-agent $want installed" >&2
  fi
fi
[[ $(chroot "$tree" readlink -f /usr/bin/updatectl) == /usr/bin/update-agentctl ]] ||
  fail "updatectl is not the update-agentctl alternative"
systemd-tmpfiles --root="$tree" --create update-agent.conf
systemctl --root="$tree" --quiet enable update-agent.service update-agent-boot-check.service
