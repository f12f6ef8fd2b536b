//! Loading and validating `agent.toml` and its drop-ins: merges, unknown keys,
//! the rules each section checks.

use super::*;

#[test]
fn defaults_and_dropins_merge() {
    let d = tempfile::tempdir().expect("tempdir");
    let main = d.path().join("agent.toml");
    fs::write(&main, "compatible = \"azl3\"\n[fetch]\nretries = 2\n").expect("write");
    fs::create_dir(d.path().join("agent.toml.d")).expect("mkdir");
    fs::write(
        d.path().join("agent.toml.d/50-x.toml"),
        "[fetch]\nparallel = 4\n",
    )
    .expect("write");
    fs::write(d.path().join("agent.toml.d/ignored.conf"), "garbage").expect("write");
    let c = Config::load(&main).expect("load");
    assert_eq!(c.compatible, "azl3");
    assert_eq!(c.fetch.retries, 2);
    assert_eq!(c.fetch.parallel, 4);
    assert_eq!(c.boot.tries, 3);
    assert_eq!(c.slots.label_a, "root-a");
}

#[test]
fn unknown_keys_are_named() {
    let e =
        Config::from_toml("compatible = \"x\"\n[fetch]\nretrys = 3\n").expect_err("unknown key");
    let chain = format!(
        "{e}: {}",
        std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default()
    );
    assert!(chain.contains("retrys"), "{chain}");
}

#[test]
fn bad_values_are_named() {
    let e = Config::from_toml("compatible = \"x\"\n[boot]\ntries = 0\n").expect_err("tries");
    assert!(e.to_string().contains("boot.tries"), "{e}");
    let e = Config::from_toml("").expect_err("compatible");
    assert!(e.to_string().contains("compatible"), "{e}");
    let e =
        Config::from_toml("compatible = \"x\"\n[boot]\nkexec_panic_secs = 0\n").expect_err("panic");
    assert!(e.to_string().contains("boot.kexec_panic_secs"), "{e}");
    let e = Config::from_toml("compatible = \"x\"\n[boot]\nkexec_watchdog_secs = 5\n")
        .expect_err("watchdog");
    assert!(e.to_string().contains("boot.kexec_watchdog_secs"), "{e}");
}

#[test]
fn reboot_method_is_firmware_unless_kexec_is_asked_for() {
    use crate::reboot_method::RebootMethod;
    let c = Config::from_toml("compatible = \"x\"\n").expect("parse");
    assert_eq!(c.boot.reboot, RebootMethod::Firmware);
    let c = Config::from_toml("compatible = \"x\"\n[boot]\nreboot = \"kexec\"\n").expect("parse");
    assert_eq!(c.boot.reboot, RebootMethod::Kexec);
    let e = Config::from_toml("compatible = \"x\"\n[boot]\nreboot = \"warm\"\n").expect_err("warm");
    let mut chain = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        chain.push_str(&format!(": {s}"));
        src = s.source();
    }
    assert!(chain.contains("warm"), "{chain}");
}

#[test]
fn stall_guard_keys() {
    let c = Config::from_toml("compatible = \"x\"\n").expect("defaults");
    assert_eq!(c.fetch.stall_timeout(), Duration::from_secs(30));
    assert_eq!(c.fetch.min_throughput_bytes, 256 << 10);
    assert_eq!(c.fetch.min_throughput_secs, 60);
    assert_eq!(c.fetch.staging_deadline_secs, 86_400);
    // The old key still works, as the inactivity timeout it now is.
    let c = Config::from_toml("compatible = \"x\"\n[fetch]\nrequest_timeout_secs = 7\n")
        .expect("old key");
    assert_eq!(c.fetch.stall_timeout(), Duration::from_secs(7));
    let bad = |t: &str| {
        Config::from_toml(&format!("compatible = \"x\"\n[fetch]\n{t}\n"))
            .expect_err(t)
            .to_string()
    };
    let e = bad("request_timeout_secs = 7\nstall_timeout_secs = 9");
    assert!(e.contains("fetch.request_timeout_secs"), "{e}");
    assert!(bad("stall_timeout_secs = 0").contains("fetch.stall_timeout_secs"));
    assert!(bad("min_throughput_secs = 0").contains("fetch.min_throughput_secs"));
    Config::from_toml("compatible = \"x\"\n[fetch]\nmin_throughput_bytes = 0\nmin_throughput_secs = 0\nstaging_deadline_secs = 0\n")
        .expect("rules off");
}

#[test]
fn auto_settings_are_checked_at_load() {
    let base = "compatible = \"x\"\n[releases]\nurl = \"http://h/p\"\n";
    // The whole chain, as updatectl and the daemon print it.
    let bad = |extra: &str| {
        let e = Config::from_toml(&format!("{base}{extra}")).expect_err(extra);
        format!("{:#}", anyhow::Error::from(e))
    };
    let e = bad("[auto]\nenabled = true\nreboot = \"window\"\n");
    assert!(
        e.contains("auto.reboot") && e.contains("[[auto.windows]]"),
        "{e}"
    );
    let e = bad("[auto]\nenabled = true\nreboot = \"fleetlock\"\n");
    assert!(e.contains("auto.fleetlock.url"), "{e}");
    let e = bad("[auto]\ncheck_interval = \"10s\"\n");
    assert!(
        e.contains("auto.check_interval") && e.contains("10s"),
        "{e}"
    );
    let e = bad("[auto]\ntime_zone = \"Mars/Base\"\n");
    assert!(e.contains("auto.time_zone"), "{e}");
    let e = bad("[[auto.windows]]\ndays = [\"sat\"]\nstart = \"2am\"\nlength = \"1h\"\n");
    assert!(e.contains("auto.windows") && e.contains("2am"), "{e}");
    let e = bad("[auto.fleetlock]\ngroup = \"a b\"\n");
    assert!(e.contains("auto.fleetlock.group"), "{e}");
    let e = bad("[metrics]\nlisten = \"localhost\"\n");
    assert!(e.contains("metrics.listen"), "{e}");
    let e = Config::from_toml("compatible = \"x\"\n[auto]\nenabled = true\n")
        .expect_err("no releases url")
        .to_string();
    assert!(
        e.contains("auto.enabled") && e.contains("[releases] url"),
        "{e}"
    );
    let ok = Config::from_toml(&format!(
        "{base}[auto]\nenabled = true\nreboot = \"never\"\ncheck_interval = \"1h30m\"\n"
    ))
    .expect("valid");
    assert_eq!(ok.auto.reboot, crate::policy::RebootStrategy::Never);
}

#[test]
fn halt_and_soak_settings_are_checked_at_load() {
    let base = "compatible = \"x\"\n[releases]\nurl = \"http://h/p\"\n";
    let bad = |extra: &str| {
        let e = Config::from_toml(&format!("{base}{extra}")).expect_err(extra);
        format!("{:#}", anyhow::Error::from(e))
    };
    let p = "[auto.halt]\nprometheus = \"http://prom:9090\"\n";
    let e = bad(p);
    assert!(e.contains("auto.halt.alerts"), "{e}");
    let e = bad(&format!("{p}alerts = \"(Rollback\"\n"));
    assert!(e.contains("auto.halt.alerts") && e.contains("regex"), "{e}");
    let e = bad(&format!(
        "{p}alerts = \".*\"\nlabels = {{ severity = \"[\" }}\n"
    ));
    assert!(e.contains("auto.halt.labels.severity"), "{e}");
    let e = bad("[auto.halt]\nprometheus = \"prom:9090\"\nalerts = \"A\"\n");
    assert!(e.contains("auto.halt.prometheus"), "{e}");
    let e = bad(&format!("{p}alerts = \"A\"\non_error = \"ignore\"\n"));
    assert!(e.contains("ignore"), "{e}");
    let e = bad(&format!("{p}alerts = \"A\"\ntimeout = \"1h\"\n"));
    assert!(e.contains("auto.halt.timeout"), "{e}");
    let e = bad(&format!("{p}alerts = \"A\"\nrecheck = \"0s\"\n"));
    assert!(e.contains("auto.halt.recheck"), "{e}");
    let e = bad(&format!("{p}alerts = \"A\"\nalert = \"B\"\n"));
    assert!(e.contains("alert"), "{e}");
    let e = bad("[auto.fleetlock]\nsoak = \"-5m\"\n");
    assert!(e.contains("auto.fleetlock.soak"), "{e}");
    let ok = Config::from_toml(&format!(
        "{base}{p}alerts = \"UpdateAgent.*\"\non_error = \"proceed\"\n[auto.fleetlock]\nsoak = \"30m\"\n"
    ))
    .expect("valid");
    let s = ok.auto.settings(None).expect("parsed");
    let h = s.halt.as_ref().expect("halt");
    assert_eq!(h.on_error, crate::policy::OnError::Proceed);
    assert_eq!(h.timeout, std::time::Duration::from_secs(10));
    assert_eq!(s.soak, jiff::SignedDuration::from_mins(30));
    assert!(Config::from_toml(base)
        .expect("valid")
        .auto
        .settings(None)
        .expect("parsed")
        .halt
        .is_none());
}
