//! After the reboot: every trial-boot scenario (commit, manual rollback, failed
//! health, the bootloader's own fallback, probes, deadlines, mark-good).

use super::*;

/// Every reboot scenario of the after-boot issue, on one node, each starting from a
/// fresh staging of v2 into slot b while a runs.
#[test]
fn trial_boots_commit_or_roll_back() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 1 << 20);
    let url = n.server.url(&delta);
    let stage = |n: &Node| {
        n.reset();
        n.boot_into("a");
        n.clear_health();
        let o = n.agent(&["stage", &url], &[]);
        assert!(o.status.success(), "{}", text(&o));
        n.assert_armed_v2();
    };
    let check = |n: &Node, env: &[(&str, &str)]| n.agent(&["boot-check"], env);
    let history = |n: &Node| -> Vec<serde_json::Value> {
        serde_json::from_slice(&fs::read(n.path("state/history.json")).expect("history"))
            .expect("json")
    };

    // 1. Healthy trial: committed, b is the default, the trial is over.
    stage(&n);
    n.health_script("10-ok", "echo fine");
    n.boot_into("b");
    assert_eq!(n.grub_vars().get("ua_tries").map(String::as_str), Some("2"));
    let o = check(&n, &[]);
    assert!(
        o.status.success() && text(&o).contains("committed: 2.0 on slot b"),
        "{}",
        text(&o)
    );
    let g = n.grub_vars();
    assert_eq!(g.get("ua_default").map(String::as_str), Some("b"), "{g:?}");
    assert!(g.get("ua_trial").is_none_or(|t| t.is_empty()), "{g:?}");
    assert_eq!(n.state()["state"], "committed");
    let last = history(&n).last().expect("entry").clone();
    assert_eq!(last["outcome"], "committed");
    assert_eq!(last["version"], "2.0");
    assert_eq!(last["from_version"], "1.0");
    assert!(last["bytes_fetched"].as_u64().expect("bytes") > 0, "{last}");
    // A second start is a normal boot.
    let o = check(&n, &[]);
    assert!(text(&o).contains("normal boot"), "{}", text(&o));

    // 2. Manual rollback to the previous release, then the reboot finishes it.
    let o = n.agent(&["rollback"], &[]);
    assert!(
        o.status.success() && text(&o).contains("rolling back from 2.0 to slot a"),
        "{}",
        text(&o)
    );
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    // The rollback ends the default's guard (the agent on a might not know it) ...
    assert_eq!(n.grub_vars().get("ua_boots").map(String::as_str), Some(""));
    n.boot_into("a");
    let o = check(&n, &[]);
    assert_rolled_back(&o, "manual rollback");
    // ... and this agent on a, which does, guards it again.
    assert_eq!(n.grub_vars().get("ua_boots").map(String::as_str), Some("3"));
    assert_eq!(
        n.grub_vars().get("ua_b_ok").map(String::as_str),
        Some("1"),
        "a manual rollback keeps b bootable"
    );

    // 3. A failing health script: its name and output are the reason; a is the default again.
    stage(&n);
    n.health_script("20-disk", "echo 'disk /var is 100% full' >&2; exit 3");
    n.boot_into("b");
    let o = check(&n, &[]);
    // The health gate fails, so boot-complete.target (and systemd-bless-boot) is not reached.
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rolling back from 2.0 to slot a: script 20-disk: exited with exit status: 3: disk /var is 100% full"), "{}", text(&o));
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert_rolled_back(&o, "20-disk");
    assert_eq!(n.state()["state"], "rolled_back");
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    let last = history(&n).last().expect("entry").clone();
    assert_eq!(last["outcome"], "rolled_back");
    assert!(
        last["reason"]
            .as_str()
            .expect("reason")
            .contains("100% full"),
        "{last}"
    );

    // 4. The bootloader fell back by itself (a kernel that never reached user space).
    stage(&n);
    sh(
        "grub-editenv",
        &[
            n.grubenv.to_str().expect("p"),
            "set",
            "ua_trial=",
            "ua_tries=0",
        ],
    );
    // What the kernel left in pstore: one record from before the arming (another
    // story, not told) and the panic of the trial's boots, across two parts.
    let pstore = n.path("pstore");
    std::fs::create_dir_all(&pstore).expect("pstore");
    // Each record at now + `secs` (a dump's parts are timed one by one).
    let record = |name: &str, text: &str, secs: i64| {
        let p = pstore.join(name);
        std::fs::write(&p, text).expect("record");
        let d = std::time::Duration::from_secs(secs.unsigned_abs());
        let now = std::time::SystemTime::now();
        let t = if secs < 0 { now - d } else { now + d };
        std::fs::File::options()
            .write(true)
            .open(&p)
            .and_then(|f| f.set_modified(t))
            .expect("mtime");
    };
    record(
        "dmesg-efi-1",
        "Panic#1 Part1\n<0>[ 3.0] Kernel panic - not syncing: an old panic\n",
        -3600,
    );
    // Part1 (the newest text) is written first, Part2 a second later; the kernel logs
    // the VFS line at its default level, so the panic alone is told.
    record(
        "dmesg-efi-3",
        "Panic#1 Part1\n<0>[ 3.0] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\n<4>[ 3.1] Call Trace:\n",
        0,
    );
    record(
        "dmesg-efi-2",
        "Panic#1 Part2\n<4>[ 2.9] VFS: Cannot open root device \"root-b\" or unknown-block(0,0): error -6\n",
        1,
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert_rolled_back(&o, "the new slot did not boot");
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    let reason = history(&n).last().expect("entry")["reason"].clone();
    let reason = reason.as_str().expect("reason");
    assert!(
        reason.starts_with("the new slot did not boot; the kernel's last words (pstore record of ")
            && reason.ends_with("dmesg-efi-3): \"Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)\""),
        "{reason}"
    );
    assert!(!reason.contains("an old panic"), "{reason}");
    std::fs::remove_dir_all(&pstore).expect("records read");

    // 5. A probe that times out, and 6. the overall deadline.
    stage(&n);
    n.server.set(Faults {
        delay_ms: 3000,
        ..Faults::default()
    });
    n.health_config(&format!("http = [\"{}\"]", n.server.url("healthz")));
    n.boot_into("b");
    let o = check(&n, &[]);
    n.server.set(Faults::default());
    assert!(
        text(&o).contains("rolling back") && text(&o).contains("http "),
        "{}",
        text(&o)
    );
    stage(&n);
    n.health_script("30-slow", "sleep 8");
    n.boot_into("b");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("script 30-slow: still running when the 4 s deadline passed"),
        "{}",
        text(&o)
    );

    // 7. A unit that looks active, then restarts: caught. (A stand-in systemctl
    //    reports what systemd would: the restart counter and invocation change.)
    stage(&n);
    let fake = n.path("systemctl");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\nc=$(cat {0} 2>/dev/null || echo 0); c=$((c+1)); echo $c > {0}\n\
             if [ $c -lt 4 ]; then r=0; else r=1; fi\n\
             printf 'ActiveState=active\\nSubState=running\\nNRestarts=%s\\nInvocationID=inv%s\\n' $r $r\n",
            n.path("calls").display()
        ),
    )
    .expect("fake systemctl");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    n.health_config(&format!(
        "units = [\"kubelet.service\"]\nsystemctl = \"{}\"",
        fake.display()
    ));
    n.boot_into("b");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("unit kubelet.service: restarted"),
        "{}",
        text(&o)
    );

    // 8. Killed during the commit, and 9. during the rollback: the next start finishes.
    stage(&n);
    n.boot_into("b");
    let o = check(&n, &[("UPDATE_AGENT_FAILPOINT", "after-boot-commit")]);
    assert!(!o.status.success());
    let o = check(&n, &[]);
    assert!(text(&o).contains("committed: 2.0"), "{}", text(&o));
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("b")
    );
    // 8b. Killed between the commit's state and its history entry (VM lab scenario 5
    // once cut there): the next start records the commit, once, with its bytes.
    n.reset();
    stage(&n);
    n.boot_into("b");
    let o = check(&n, &[("UPDATE_AGENT_FAILPOINT", "after-commit-state")]);
    assert!(!o.status.success());
    let commits = || -> Vec<serde_json::Value> {
        let all: Vec<serde_json::Value> = fs::read(n.path("state/history.json"))
            .map(|b| serde_json::from_slice(&b).expect("history"))
            .unwrap_or_default();
        all.into_iter()
            .filter(|e| e["outcome"] == "committed" && e["version"] == "2.0")
            .collect()
    };
    assert!(commits().is_empty(), "{:?}", commits());
    let o = check(&n, &[]);
    assert!(text(&o).contains("recorded it"), "{}", text(&o));
    let _ = check(&n, &[]);
    let c = commits();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0]["bytes_fetched"].as_u64() > Some(0), "{c:?}");
    n.reset();
    stage(&n);
    n.health_script("40-bad", "exit 1");
    n.boot_into("b");
    let o = check(
        &n,
        &[("UPDATE_AGENT_FAILPOINT", "after-rolling-back-state")],
    );
    assert!(!o.status.success());
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("rolling back from 2.0 to slot a"),
        "{}",
        text(&o)
    );
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert_rolled_back(&o, "40-bad");

    // 10. mark-good commits a trial without waiting; refused when there is none.
    stage(&n);
    n.boot_into("b");
    let o = n.agent(&["mark-good"], &[]);
    assert!(
        o.status.success() && text(&o).contains("committed: 2.0"),
        "{}",
        text(&o)
    );
    let o = n.agent(&["mark-good"], &[]);
    assert!(
        !o.status.success() && text(&o).contains("no trial boot to mark good"),
        "{}",
        text(&o)
    );
    n.boot_into("a");
}
