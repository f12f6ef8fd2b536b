//! Staging over a faulty server, hostile payloads, a delta for another image, a
//! busy slot, a read-only state directory, cancel and a missing slot.

use super::*;

#[test]
fn stage_over_http_with_faults_then_hostile_inputs() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 256 << 10);

    // Flaky server: two 500s and a connection cut mid-body, all retried.
    n.server.set(Faults {
        errors_500: 2,
        drops: 1,
        stalls: 1,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("armed: slot b holds 2.0"), "{}", text(&o));
    n.assert_armed_v2();
    let fetched = n.state()["staged"]["bytes_fetched"]
        .as_u64()
        .expect("bytes_fetched");
    let size = fs::metadata(n.payloads.join(&delta)).expect("meta").len();
    assert!(fetched <= size, "fetched {fetched} of a {size}-byte delta");

    // A 404 fails at once and names the URL.
    let o = n.agent(&["stage", &n.server.url("3.0.from-nothing.uap")], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("HTTP 404") && text(&o).contains("3.0.from-nothing.uap"),
        "{}",
        text(&o)
    );

    // A corrupted range: the operation's hash catches it; slot b is left unbootable.
    n.server.set(Faults {
        corrupt: 1,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    // Which check sees it depends on where the byte lands: zstd's own, or the hash.
    assert!(
        text(&o).contains("does not match the manifest")
            || text(&o).contains("zstd frame is corrupt"),
        "{}",
        text(&o)
    );
    assert_eq!(n.state()["state"], "failed");
    assert!(n.state()["reason"]
        .as_str()
        .expect("reason")
        .contains("operation"));
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.assert_booted_untouched();
    n.server.set(Faults::default());

    // Wrong product line.
    let other = n.publish("2.1", "other-board", &n.path("v2.img"), 1 << 20);
    let o = n.agent(&["stage", &n.server.url(&other)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("other-board"),
        "{}",
        text(&o)
    );
    // Downgrade below the running 1.0.
    let old = n.publish("0.9", "test-board", &n.path("v2.img"), 1 << 20);
    let o = n.agent(&["stage", &n.server.url(&old)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("older than the running release 1.0"),
        "{}",
        text(&o)
    );
    // Untrusted key.
    let stranger = PublisherKey::from_seed([8u8; 32]);
    let mut opts = Options::new(
        "test-board",
        "2.2",
        update_agent::timefmt::now() - 60,
        update_agent::timefmt::now() + 86_400,
    );
    opts.level = 3;
    let t = Image::open(&n.path("v2.img")).expect("t");
    generate::create_full(&t, None, &opts, &stranger, &n.payloads.join("2.2.full.uap"))
        .expect("full");
    let o = n.agent(&["stage", &n.server.url("2.2.full.uap")], &[]);
    assert!(
        !o.status.success() && text(&o).contains("does not trust"),
        "{}",
        text(&o)
    );
    // Expired manifest.
    let opts = Options {
        version: "2.3".into(),
        created: 1_000,
        expires: 2_000,
        ..opts
    };
    generate::create_full(&t, None, &opts, &n.key, &n.payloads.join("2.3.full.uap")).expect("full");
    let o = n.agent(&["stage", &n.server.url("2.3.full.uap")], &[]);
    assert!(
        !o.status.success() && text(&o).contains("expired"),
        "{}",
        text(&o)
    );
    // A target larger than the slot is refused before anything is written.
    let big = n.path("big.img");
    let mut b = n.v2.clone();
    b.resize((SLOT + MIB) as usize, 7);
    fs::write(&big, &b).expect("big");
    let mut o2 = Options::new(
        "test-board",
        "2.4",
        update_agent::timefmt::now() - 60,
        update_agent::timefmt::now() + 86_400,
    );
    o2.level = 1;
    generate::create_full(
        &Image::open(&big).expect("big"),
        None,
        &o2,
        &n.key,
        &n.payloads.join("2.4.full.uap"),
    )
    .expect("full");
    let o = n.agent(&["stage", &n.server.url("2.4.full.uap")], &[]);
    assert!(
        !o.status.success() && text(&o).contains("holds only"),
        "{}",
        text(&o)
    );
    n.assert_booted_untouched();
}

#[test]
fn delta_for_another_image_falls_back_to_the_full_payload() {
    let n = Node::new();
    // Publish against a different "v1", so the delta's source hash is wrong for slot a.
    let fake = n.path("fake-v1.img");
    // A delta built from v2 itself is all COPYs of blocks slot a does not have. (A
    // delta whose differing source blocks are never read, or only where zstd chose
    // literals, still yields the exact, verified target and is accepted.)
    let f = n.v2.clone();
    fs::write(&fake, &f).expect("fake");
    let mut o = Options::new(
        "test-board",
        "2.0",
        update_agent::timefmt::now() - 60,
        update_agent::timefmt::now() + 86_400,
    );
    o.level = 3;
    let t = Image::open(&n.path("v2.img")).expect("t");
    let s = Image::open(&fake).expect("s");
    generate::create_delta(&t, &s, &o, &n.key, &n.payloads.join("2.0.from-fake.uap"))
        .expect("delta");
    // No full payload yet: a clear error.
    let out = n.agent(&["stage", &n.server.url("2.0.from-fake.uap")], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("different image than the booted slot"),
        "{}",
        text(&out)
    );
    // With a full payload beside it, the agent uses that (reusing slot a's blocks).
    generate::create_full(
        &t,
        Some(&Image::open(&n.path("v1.img")).expect("v1")),
        &o,
        &n.key,
        &n.payloads.join("2.0.full.uap"),
    )
    .expect("full");
    let out = n.agent(&["stage", &n.server.url("2.0.from-fake.uap")], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("staging full payload 2.0"),
        "{}",
        text(&out)
    );
    n.assert_armed_v2();
}

#[test]
fn busy_slot_and_readonly_state_are_refused() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 1 << 20);
    // Someone holds slot b open exclusively.
    let holder = fs::OpenOptions::new()
        .read(true)
        .custom_flags_excl()
        .open(n.disk.part(3))
        .expect("hold slot b");
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("in use"),
        "{}",
        text(&o)
    );
    drop(holder);
    // A read-only state directory: the error names it; nothing is written to slot b's boot flag.
    let state = n.path("state");
    fs::create_dir_all(&state).expect("mkdir");
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "ro,size=1m",
            "tmpfs",
            state.to_str().expect("p"),
        ],
    );
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    sh("umount", &[state.to_str().expect("p")]);
    assert!(
        !o.status.success() && text(&o).contains("state"),
        "{}",
        text(&o)
    );
    // A full state file system.
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            state.to_str().expect("p"),
        ],
    );
    fs::write(state.join("filler"), vec![1u8; 60 << 10]).ok();
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    sh("umount", &[state.to_str().expect("p")]);
    assert!(!o.status.success(), "{}", text(&o));
    n.assert_booted_untouched();
    let g = n.grub_vars();
    assert_eq!(g.get("ua_default").map(String::as_str), Some("a"));
    assert!(g.get("ua_trial").is_none_or(|t| t.is_empty()), "{g:?}");
}

#[test]
fn cancel_and_missing_slot() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    // SIGTERM mid-write: the agent stops, says cancelled, and slot b stays unbootable.
    n.server.set(Faults {
        delay_ms: 30,
        ..Faults::default()
    });
    let child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&n.config)
        .args(["stage", &n.server.url(&delta)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read(n.path("state/state.json"))
        .map_or(true, |b| !String::from_utf8_lossy(&b).contains("staging"))
    {
        assert!(Instant::now() < deadline, "staging never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let o = child.wait_with_output().expect("wait");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cancelled"), "{}", text(&o));
    assert_eq!(n.state()["state"], "cancelled");
    let g = n.grub_vars();
    assert_eq!(g.get("ua_default").map(String::as_str), Some("a"), "{g:?}");
    assert_eq!(g.get("ua_b_ok").map(String::as_str), Some("0"), "{g:?}");
    n.assert_booted_untouched();
    n.server.set(Faults::default());

    // The network gives out half-way: the written part is kept, resume finishes it.
    let _ = fs::remove_dir_all(n.path("state"));
    n.server.set(Faults {
        break_after: n.server.ranges.load(Ordering::Relaxed) + 12,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("staging stopped after operation"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("HTTP 503"), "{}", text(&o));
    assert_eq!(n.state()["state"], "staging");
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    n.server.set(Faults::default());
    let o = n.agent(&["resume"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("resuming delta 2.0 at operation"),
        "{}",
        text(&o)
    );
    n.assert_armed_v2();
    // An armed release can be dropped: the trial is disarmed, the slot unbootable.
    let o = n.agent(&["cancel"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(n.state()["state"], "cancelled");
    let g = n.grub_vars();
    assert_eq!(g.get("ua_b_ok").map(String::as_str), Some("0"), "{g:?}");
    assert!(g.get("ua_trial").is_none_or(|t| t.is_empty()), "{g:?}");
    let o = n.agent(&["cancel"], &[]);
    assert!(
        !o.status.success() && text(&o).contains("nothing to cancel"),
        "{}",
        text(&o)
    );

    // The slot's partition is not there (a relabelled or replaced disk): named, refused.
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        cfg.replace("[slots]\n", "[slots]\nlabel_b = \"root-x\"\n"),
    )
    .expect("config");
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("no partition labelled \"root-x\""),
        "{}",
        text(&o)
    );
    fs::write(&n.config, cfg).expect("config");
    // The kernel command line and / disagree: an error, never a guess.
    fs::write(n.path("cmdline"), "root=PARTLABEL=root-b\n").expect("cmdline");
    let o = n.agent(&["status"], &[]);
    assert!(
        !o.status.success() && text(&o).contains("says slot b booted"),
        "{}",
        text(&o)
    );
}
