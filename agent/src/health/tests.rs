//! Health checks against a fake `systemctl` and `journalctl`: a unit that fails after
//! its start, the sustain period (served since early boot; ended on time).

use super::*;
use std::os::unix::fs::PermissionsExt as _;

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    p
}

/// A fake `systemctl`: answers with the `first` properties (`Key=Value`) on its first
/// call and with `later` on every call after it.
fn fake_systemctl(dir: &Path, first: &[&str], later: &[&str]) -> PathBuf {
    let words = |props: &[&str]| {
        props
            .iter()
            .map(|p| format!("'{p}'"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let seen = dir.join("systemctl-seen");
    script(
        dir,
        "systemctl",
        &format!(
            "if [ -e {seen} ]; then printf '%s\\n' {later}\n\
             else touch {seen}; printf '%s\\n' {first}\n\
             fi",
            seen = seen.display(),
            first = words(first),
            later = words(later),
        ),
    )
}

#[test]
fn a_unit_that_fails_after_start_is_named_with_its_exit_and_last_output() {
    let d = tempfile::tempdir().expect("tempdir");
    // Active on the first look, failed with exit status 1 on every later one.
    let systemctl = fake_systemctl(
        d.path(),
        &[
            "LoadState=loaded",
            "ActiveState=active",
            "SubState=running",
            "NRestarts=0",
            "InvocationID=x",
            "Result=success",
            "ExecMainStatus=0",
        ],
        &[
            "LoadState=loaded",
            "ActiveState=failed",
            "SubState=failed",
            "NRestarts=0",
            "InvocationID=x",
            "Result=exit-code",
            "ExecMainStatus=1",
        ],
    );
    let journalctl = script(
        d.path(),
        "journalctl",
        "echo 'Started worker.service - a worker'; echo 'starting worker'; \
         echo 'worker: cannot open /var/lib/worker/db'; \
         echo 'worker.service: Main process exited, code=exited, status=1/FAILURE'",
    );
    let cfg = HealthConfig {
        units: vec!["worker.service".into()],
        sustain_secs: 5,
        poll_ms: 10,
        deadline_secs: 10,
        scripts_dir: d.path().join("none"),
        systemctl,
        journalctl,
        ..HealthConfig::default()
    };
    let r = run_all(&cfg);
    assert_eq!(r.len(), 1);
    assert!(!r[0].ok);
    let s = r[0].summary();
    assert!(s.starts_with("unit worker.service: failed "), "{s}");
    assert!(s.contains("(Result=exit-code, ExecMainStatus=1)"), "{s}");
    assert!(
        s.ends_with("last output: starting worker | worker: cannot open /var/lib/worker/db"),
        "{s}"
    );
}

#[test]
fn a_unit_active_since_early_boot_has_served_its_sustain_period() {
    let d = tempfile::tempdir().expect("tempdir");
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    let since_us = (now.tv_sec() as u64).saturating_sub(40) * 1_000_000;
    let active = [
        "LoadState=loaded",
        "ActiveState=active",
        "SubState=running",
        "NRestarts=0",
        "InvocationID=x",
        &format!("ActiveEnterTimestampMonotonic={since_us}"),
    ];
    let systemctl = fake_systemctl(d.path(), &active, &active);
    let cfg = HealthConfig {
        units: vec!["kubelet.service".into()],
        sustain_secs: 30,
        poll_ms: 10,
        deadline_secs: 60,
        scripts_dir: d.path().join("none"),
        systemctl,
        ..HealthConfig::default()
    };
    let t = std::time::Instant::now();
    let r = run_all(&cfg);
    assert!(r[0].ok, "{}", r[0].summary());
    // Active for 40 s already: no 30 s wait on the trial boot.
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn the_sustain_period_ends_on_time_not_at_the_next_poll() {
    let d = tempfile::tempdir().expect("tempdir");
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("clock");
    // Active for half a second when first seen: 2.5 s of a 3 s sustain period left.
    let since_us = (now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1_000) - 500_000;
    let active = [
        "LoadState=loaded",
        "ActiveState=active",
        "SubState=running",
        "NRestarts=0",
        "InvocationID=x",
        &format!("ActiveEnterTimestampMonotonic={since_us}"),
    ];
    let systemctl = fake_systemctl(d.path(), &active, &active);
    let cfg = HealthConfig {
        units: vec!["kubelet.service".into()],
        sustain_secs: 3,
        poll_ms: 2000,
        deadline_secs: 60,
        scripts_dir: d.path().join("none"),
        systemctl,
        ..HealthConfig::default()
    };
    let t = std::time::Instant::now();
    let r = run_all(&cfg);
    assert!(r[0].ok, "{}", r[0].summary());
    // Polls at 0 and 2 s, then at the end of the period (2.5 s), not at 4 s.
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(2300) && took < Duration::from_millis(3500),
        "{took:?}"
    );
}
