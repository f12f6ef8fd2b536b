#!/bin/bash
# integration/check-packages.sh OUTDIR [ROOTFS_TAR [NEXTDIR]]: checks the packages package.sh
# wrote into OUTDIR, on this Debian machine (no RPM host needed):
#   .rpm  rpm -qpl lists exactly the expected files; the config file is %config(noreplace);
#         rpm -qp --scripts has the sysusers/tmpfiles/systemd/updatectl steps and each
#         scriptlet parses; it installs into a scratch root with rpm --root (--nodeps:
#         that root's rpm database is empty, so libc, systemd and /bin/sh, which Debian's
#         packages provide there, are unknown to rpm), and rpm -V finds it intact
#   .deb  lintian with no errors; dpkg-deb -c lists the same files as the .rpm (paths
#         mapped between the ecosystems' conventions); agent.toml is a conffile
#   both, given ROOTFS_TAR (a Debian root with systemd: the VM lab's): installed into
#         a copy of it with their scriptlets run there (dpkg --root, rpm --root): the
#         group and directories exist, `updatectl` points at update-agentctl; then
#         removed again, `updatectl` gone
#   both, given NEXTDIR too (the same packages one revision up: UA_PKG_RELEASE=2):
#         an upgrade over an agent.toml the admin changed keeps the admin's file
set -euo pipefail
out=${1:?usage: check-packages.sh OUTDIR [ROOTFS_TAR]}
rootfs=${2:-}
next=${3:-}
export PATH=$PATH:/usr/sbin:/sbin
fail() { echo "check-packages: FAIL: $*" >&2; exit 1; }
ok() { echo "check-packages: ok: $*"; }
command -v lintian >/dev/null || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq lintian >/dev/null
}

shopt -s nullglob
debs=("$out"/update-agent_*_amd64.deb)
rpms=("$out"/update-agent-*.x86_64.rpm)
((${#debs[@]} == 1 && ${#rpms[@]} == 1)) || fail "want one .deb and one .rpm in $out"
deb=${debs[0]} rpm=${rpms[0]}
t=$(mktemp -d)
trap 'rm -rf "$t"' EXIT

# ---- the .rpm's file list: exactly these, plus the man pages
cat >"$t/want" <<'LIST'
/etc/update-agent
/etc/update-agent/agent.toml
/usr/bin/update-agent
/usr/bin/update-agentctl
/usr/lib/systemd/system/systemd-bless-boot.service.d
/usr/lib/systemd/system/systemd-bless-boot.service.d/update-agent.conf
/usr/lib/systemd/system/update-agent-boot-check.service
/usr/lib/systemd/system/update-agent.service
/usr/lib/sysusers.d/update-agent.conf
/usr/lib/tmpfiles.d/update-agent.conf
/usr/share/bash-completion/completions/update-agentctl
/usr/share/doc/update-agent/README.md
/usr/share/fish/vendor_completions.d/update-agentctl.fish
/usr/share/licenses/update-agent/LICENSE
/usr/share/man/man8/update-agent.8.gz
/usr/share/update-agent
/usr/share/update-agent/grub
/usr/share/update-agent/grub/09_update-agent
/usr/share/update-agent/grub/update-agent.cfg
/usr/share/zsh/site-functions/_update-agentctl
LIST
# Version-free doc and licence directories; the man pages checked below.
rpm -qpl "$rpm" | sed -E 's#^(/usr/share/(doc|licenses)/update-agent)-[^/]+#\1#' |
  grep -v -E '^/usr/share/(doc|licenses)/update-agent$' | grep -v '^/usr/share/man/man1/' |
  sort >"$t/rpm-files"
diff -u "$t/want" "$t/rpm-files" || fail "rpm -qpl: the file list differs from the expected one"
man1=$(rpm -qpl "$rpm" | grep -c '^/usr/share/man/man1/update-agentctl.*\.1\.gz$')
((man1 >= 20)) || fail "rpm: $man1 man pages in man1, want the CLI's and each subcommand's"
! rpm -qpl "$rpm" | grep -E '/updatectl[^/]*$' || fail "rpm: a file named updatectl (systemd's name)"
ok "rpm -qpl: $(rpm -qpl "$rpm" | wc -l) paths as expected ($man1 man pages for update-agentctl)"
[[ $(rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm" | awk '$2 ~ /c/') == "/etc/update-agent/agent.toml cn" ]] ||
  fail "rpm: agent.toml must be the one %config(noreplace) file"
ok "rpm: /etc/update-agent/agent.toml is %config(noreplace)"

# ---- the .rpm's scriptlets
rpm -qp --scripts "$rpm" >"$t/scripts"
for want in 'systemd-sysusers /usr/lib/sysusers.d/update-agent.conf' \
  'systemd-tmpfiles --create /usr/lib/tmpfiles.d/update-agent.conf' \
  'preset update-agent.service update-agent-boot-check.service' \
  'disable --now update-agent.service update-agent-boot-check.service' \
  'try-restart update-agent.service' 'ln -s update-agentctl /usr/bin/updatectl'; do
  grep -qF -- "$want" "$t/scripts" || fail "rpm --scripts: no '$want'"
done
for tag in POSTIN PREUN POSTUN POSTTRANS; do
  rpm -qp --qf "%{$tag}" "$rpm" >"$t/$tag.sh"
  sh -n "$t/$tag.sh" || fail "rpm: the $tag scriptlet does not parse"
done
ok "rpm --scripts: sysusers, tmpfiles, preset/disable/try-restart, updatectl where free; all parse"

# ---- the .rpm into a scratch root (files only: the root has no shell to run scriptlets)
r=$t/rpmroot
mkdir -p "$r"
rpm --root "$r" --initdb
rpm --root "$r" -i --nodeps --noscripts --force-debian "$rpm"
rpm --root "$r" -q update-agent >/dev/null || fail "rpm --root: not installed"
rpm --root "$r" -V --nodeps update-agent || fail "rpm --root -V: files differ from the package"
[[ -x $r/usr/bin/update-agentctl && -f $r/etc/update-agent/agent.toml ]] || fail "rpm --root: files missing"
"$r/usr/bin/update-agentctl" --version >/dev/null || fail "rpm --root: update-agentctl does not run"
ok "rpm --root: installed into a scratch root ($(rpm --root "$r" -q update-agent)), rpm -V clean"

# ---- the .deb: lintian, the same files as the .rpm, the conffile
lintian --fail-on error --suppress-tags initial-upload-closes-no-bugs "$deb" 2>&1 |
  grep -v 'running with root privileges' || true
lintian --fail-on error "$deb" >/dev/null 2>&1 || fail "lintian: errors"
ok "lintian: no errors"
# Debian's conventions: units under /lib (bookworm), zsh's vendor directory, the
# licence in copyright, a changelog.
dpkg-deb -c "$deb" | awk '{print $6}' | sed -e 's#^\./#/#' -e 's#/$##' |
  grep -v -E '^/$|^/(etc|usr|lib|usr/bin|usr/lib|usr/share)$' | grep -v '^/usr/share/man/man1/' |
  grep -v -E '^/lib/systemd(/system)?$|^/usr/lib/(sysusers|tmpfiles)\.d$|^/usr/share/(man|man/man1|man/man8|doc|bash-completion|bash-completion/completions|fish|fish/vendor_completions.d|zsh|zsh/vendor-completions)$' |
  sed -e 's#^/lib/systemd/#/usr/lib/systemd/#' -e 's#/zsh/vendor-completions/#/zsh/site-functions/#' \
    -e 's#^/usr/share/doc/update-agent/copyright$#/usr/share/licenses/update-agent/LICENSE#' |
  grep -v -E '^/usr/share/doc/update-agent(/changelog\.Debian\.gz)?$' | sort >"$t/deb-files"
diff -u "$t/rpm-files" "$t/deb-files" || fail "dpkg-deb -c: the .deb's files differ from the .rpm's"
deb_man1=$(dpkg-deb -c "$deb" | grep -c '/usr/share/man/man1/update-agentctl.*\.1\.gz$')
((deb_man1 == man1)) || fail "deb: $deb_man1 man pages in man1, the rpm has $man1"
[[ $(dpkg-deb -f "$deb" Package) == update-agent ]] || fail "deb: package name"
dpkg-deb -e "$deb" "$t/control"
[[ $(cat "$t/control/conffiles") == /etc/update-agent/agent.toml ]] || fail "deb: agent.toml must be the one conffile"
ok "dpkg-deb -c: the same $(wc -l <"$t/deb-files") paths as the .rpm (+ $deb_man1 man pages); agent.toml a conffile"

[[ -n $rootfs ]] || { echo "check-packages: no ROOTFS_TAR: scriptlets not run in a root"; exit 0; }

# ---- both with their scriptlets, each in a copy of a Debian root with systemd
installed() { # ROOT: what the scriptlets must have done
  grep -q '^update-agent:' "$1/etc/group" || fail "$2: no update-agent group (sysusers)"
  # tmpfiles needs /proc, which a chroot lacks: an image recipe applies it from
  # outside, as here (on a running system the scriptlets do).
  systemd-tmpfiles --root="$1" --create update-agent.conf
  [[ -d $1/var/lib/update-agent && -d $1/etc/update-agent/keys.d ]] || fail "$2: no directories (tmpfiles)"
  [[ $(stat -c %G "$1/var/lib/update-agent") == update-agent || $(stat -c %g "$1/var/lib/update-agent") == $(awk -F: '$1 == "update-agent" {print $3}' "$1/etc/group") ]] ||
    fail "$2: the state directory's group is not update-agent"
  [[ $(chroot "$1" readlink -f /usr/bin/updatectl) == /usr/bin/update-agentctl ]] || fail "$2: updatectl does not lead to update-agentctl"
}
d=$t/debroot
mkdir -p "$d"
tar -C "$d" --numeric-owner -xf "$rootfs"
dpkg --root="$d" -i "$deb" >"$t/dpkg.log" 2>&1 || { cat "$t/dpkg.log"; fail "dpkg --root -i"; }
installed "$d" "dpkg --root"
upgraded() { # ROOT WHAT: the admin's agent.toml survived
  grep -q '^compatible = "lab-upgrade"' "$1/etc/update-agent/agent.toml" || fail "$2: agent.toml not kept"
  [[ ! -e $1/etc/update-agent/agent.toml.dpkg-new && ! -e $1/etc/update-agent/agent.toml.rpmnew ]] ||
    fail "$2: the shipped agent.toml did not change, nothing should be set aside"
}
if [[ -n $next ]]; then
  echo 'compatible = "lab-upgrade"' >>"$d/etc/update-agent/agent.toml"
  dpkg --root="$d" -i "$next"/update-agent_*_amd64.deb >"$t/dpkg.log" 2>&1 || { cat "$t/dpkg.log"; fail "dpkg --root -i (upgrade)"; }
  upgraded "$d" "dpkg upgrade"
  ok "dpkg --root: upgraded to $(dpkg-query --root="$d" -W -f '${Version}' update-agent), the changed agent.toml kept"
fi
dpkg --root="$d" -r update-agent >"$t/dpkg.log" 2>&1 || { cat "$t/dpkg.log"; fail "dpkg --root -r"; }
[[ ! -e $d/usr/bin/updatectl && ! -L $d/usr/bin/updatectl ]] || fail "dpkg -r: updatectl left behind"
ok "dpkg --root: installed with its scripts (group, directories, updatectl alternative), removed cleanly"
rm -rf "$d"

r=$t/rpmroot2
mkdir -p "$r"
tar -C "$r" --numeric-owner -xf "$rootfs"
rpm --root "$r" --initdb
# --nodeps: the root's libc and systemd are Debian packages, unknown to rpm.
rpm --root "$r" -i --nodeps --force-debian "$rpm" 2>&1 | tee "$t/rpm.log"
! grep -q 'scriptlet failed' "$t/rpm.log" || fail "rpm --root: a scriptlet failed"
installed "$r" "rpm --root"
if [[ -n $next ]]; then
  echo 'compatible = "lab-upgrade"' >>"$r/etc/update-agent/agent.toml"
  rpm --root "$r" -U --nodeps --force-debian "$next"/update-agent-*.x86_64.rpm 2>&1 | tee "$t/rpm.log"
  ! grep -q 'scriptlet failed' "$t/rpm.log" || fail "rpm --root -U: a scriptlet failed"
  upgraded "$r" "rpm upgrade"
  installed "$r" "rpm upgrade"
  ok "rpm --root: upgraded to $(rpm --root "$r" -q update-agent), the changed agent.toml kept"
fi
rpm --root "$r" -e --nodeps --force-debian update-agent
[[ ! -e $r/usr/bin/updatectl && ! -L $r/usr/bin/updatectl ]] || fail "rpm -e: updatectl left behind"
ok "rpm --root: installed with its scriptlets into a systemd root (group, directories, updatectl link), erased cleanly"
