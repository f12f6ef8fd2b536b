#!/bin/bash
# integration/package.sh OUTDIR: the packages a distribution ships, from the release
# build: OUTDIR/update-agent_VERSION-REL_amd64.deb (cargo-deb, metadata in
# agent/Cargo.toml [package.metadata.deb], maintainer scripts in packaging/deb/) and
# OUTDIR/update-agent-VERSION-REL.x86_64.rpm (rpmbuild, packaging/rpm/update-agent.spec).
# Why these tools: docs/packaging.md. REL is UA_PKG_RELEASE (default 1), the package
# revision: the VM lab builds 1 and 2 to upgrade one over the other.
#
# Man pages and completions are generated here from the binaries just built (the
# clap definitions), for the installed name update-agentctl.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${1:?usage: package.sh OUTDIR}
rel=${UA_PKG_RELEASE:-1}
# shellcheck source=setup.sh
source "$here/setup.sh"
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Tools: rpmbuild (Debian's rpm) and cargo-deb, pinned, built once into a cache
# outside the checkout.
export PATH=$PATH:/usr/sbin:/sbin
if ! command -v rpmbuild >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rpm >/dev/null
fi
cargo_deb_version=3.8.0
tools=${UA_TOOLS_DIR:-/var/tmp/update-agent-tools}
if [[ $("$tools/bin/cargo-deb" --version 2>/dev/null) != *"$cargo_deb_version"* ]]; then
  echo "package: installing cargo-deb $cargo_deb_version into $tools (a few minutes, once)"
  cargo install -q --locked --version "$cargo_deb_version" --root "$tools" cargo-deb
fi

cd "$repo"
version=$(cargo metadata --no-deps --format-version 1 --locked |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "update-agent"))')
echo "package: update-agent $version-$rel"
cargo build --release --locked -q --bin update-agent --bin updatectl
bin=$CARGO_TARGET_DIR/release

# Generated files live where cargo-deb's target/release/ prefix finds them.
gen=$bin/package-gen
rm -rf "$gen"
mkdir -p "$gen/bin" "$gen/man" "$gen/bash" "$gen/zsh" "$gen/fish"
"$bin/updatectl" man --name update-agentctl "$gen/man"
"$bin/update-agent" man "$gen/man"
gzip -9n "$gen"/man/*
"$bin/updatectl" completions bash --name update-agentctl >"$gen/bash/update-agentctl"
"$bin/updatectl" completions zsh --name update-agentctl >"$gen/zsh/_update-agentctl"
"$bin/updatectl" completions fish --name update-agentctl >"$gen/fish/update-agentctl.fish"
# The rpm's binaries, stripped as cargo-deb strips the .deb's (the release profile
# keeps line tables for backtraces in development, ~80 MB a binary).
for b in update-agent updatectl; do strip -o "$gen/bin/$b" "$bin/$b"; done

deb=$out/update-agent_${version}-${rel}_amd64.deb
rm -f "$deb"
"$tools/bin/cargo-deb" -p update-agent --no-build --locked --strip --deb-revision "$rel" -o "$deb" >/dev/null

rpmtop=$(mktemp -d)
trap 'rm -rf "$rpmtop"' EXIT
# Debian's rpm runs its brp-compress (bash) with dash, which prints errors; the pages
# are compressed already and the binaries stripped, so its post-install steps are off.
rpmbuild -bb --quiet --target x86_64 --define "_topdir $rpmtop" --define "__os_install_post %{nil}" \
  --define "ua_version $version" --define "ua_release $rel" \
  --define "ua_repo $repo" --define "ua_gen $gen" packaging/rpm/update-agent.spec
rpm=$out/update-agent-${version}-${rel}.x86_64.rpm
mv "$rpmtop/RPMS/x86_64/update-agent-${version}-${rel}.x86_64.rpm" "$rpm"
ls -l "$deb" "$rpm"
