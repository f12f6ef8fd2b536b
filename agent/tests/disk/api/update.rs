//! An update through the socket with streamed progress, idempotent and busy
//! StartUpdate, a watcher that leaves, commit across a modelled reboot, rollback,
//! history, every error class.

use super::*;

#[test]
fn api_update_commit_rollback_over_the_socket() {
    use pb::start_update_request::Source as S;
    let n = api_node();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let d = Daemon::start(&n);
    let rt = rt();
    rt.block_on(async {
        let mut c = client::unix(&d.socket).await.expect("connect");
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(s.state, "idle");
        assert_eq!(s.running_version, "1.0");
        assert_eq!(s.booted.as_ref().map(|b| b.name.as_str()), Some("a"));
        assert_eq!(
            s.bootloader.as_ref().map(|b| b.backend.as_str()),
            Some("grub")
        );
        assert!(s.operation.is_none() && s.last_result.is_none(), "{s:?}");

        // Bad requests name the field; unknown versions are NOT_FOUND.
        // No source: the node's own channel, not published yet.
        let e = c
            .start_update(pb::StartUpdateRequest::default())
            .await
            .expect_err("no channel yet");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(reason(&e), "CHANNEL_NOT_FOUND");
        assert!(e.message().contains("channel stable"), "{}", e.message());
        let e = c
            .start_update(start_req(S::Path("relative/x.uap".into())))
            .await
            .expect_err("relative path");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert_eq!(
            e.get_error_details()
                .bad_request()
                .expect("field")
                .field_violations[0]
                .field,
            "path"
        );
        let e = c
            .start_update(start_req(S::Url("ftp://x/y".into())))
            .await
            .expect_err("scheme");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let e = c
            .start_update(start_req(S::Version("9.9".into())))
            .await
            .expect_err("9.9");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("9.9"), "{}", e.message());
        let e = c
            .start_update(pb::StartUpdateRequest {
                reboot: pb::RebootPolicy::InWindow as i32,
                ..start_req(S::Version("2.0".into()))
            })
            .await
            .expect_err("no windows");
        assert_eq!(e.code(), Code::InvalidArgument);
        // Channels: none published yet, a bad name, then the publisher's document.
        let e = c
            .start_update(start_req(S::Channel("stable".into())))
            .await
            .expect_err("channel");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert_eq!(reason(&e), "CHANNEL_NOT_FOUND");
        let e = c
            .start_update(start_req(S::Channel("../etc".into())))
            .await
            .expect_err("name");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let o = publish_channel(&n, "2.0", &[]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("channel stable -> 2.0 (test-board, 1 delta)"),
            "{}",
            text(&o)
        );
        let r = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Channel(
                    "stable".into(),
                )),
            })
            .await
            .expect("check channel")
            .into_inner();
        // The node does not know the image it runs yet (nothing committed): full payload.
        assert!(
            r.available && r.version == "2.0" && r.url.ends_with("/2.0.full.uap"),
            "{r:?}"
        );
        // A channel document edited after signing is refused, naming the channel.
        let doc = n.payloads.join("channels/stable.json");
        let good = fs::read(&doc).expect("doc");
        let text_doc = String::from_utf8(good.clone()).expect("utf8");
        let v: serde_json::Value = serde_json::from_str(&text_doc).expect("json");
        let signed = v["signed"].as_str().expect("signed").to_owned();
        let mut flipped = signed.clone().into_bytes();
        flipped[10] = if flipped[10] == b'A' { b'B' } else { b'A' };
        let bad = text_doc.replace(&signed, &String::from_utf8(flipped).expect("ascii"));
        fs::write(&doc, bad).expect("tamper");
        let e = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Channel(
                    "stable".into(),
                )),
            })
            .await
            .expect_err("tampered");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(e.message().contains("channel stable"), "{}", e.message());
        fs::write(&doc, &good).expect("restore");
        let e = c
            .start_update(start_req(S::Path(n.path("nope.uap").display().to_string())))
            .await
            .expect_err("path");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner()
            .operation
            .is_none());

        // Check: a delta newer than 1.0 is there; the version resolves to the full payload.
        let r = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Url(
                    n.server.url(&delta),
                )),
            })
            .await
            .expect("check")
            .into_inner();
        assert!(r.available && r.delta && r.version == "2.0", "{r:?}");
        let r = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Version("2.0".into())),
            })
            .await
            .expect("check version")
            .into_inner();
        assert!(
            r.available && !r.delta && r.url.ends_with("2.0.full.uap"),
            "{r:?}"
        );

        // A slow server keeps the update running while two more clients ask.
        n.server.set(Faults {
            delay_ms: 15,
            ..Faults::default()
        });
        let served_before = n.server.served.load(Ordering::SeqCst);
        let op = c
            .start_update(start_req(S::Url(n.server.url(&delta))))
            .await
            .expect("start")
            .into_inner();
        assert!(!op.already_running);
        let again = c
            .start_update(start_req(S::Url(n.server.url(&delta))))
            .await
            .expect("again")
            .into_inner();
        assert!(
            again.already_running && again.operation_id == op.operation_id,
            "{again:?}"
        );
        let mut c2 = client::unix(&d.socket).await.expect("second client");
        let e = c2
            .start_update(start_req(S::Version("2.0".into())))
            .await
            .expect_err("busy");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert_eq!(reason(&e), "BUSY");
        let info = e
            .get_error_details()
            .error_info()
            .cloned()
            .expect("error info");
        assert_eq!(info.metadata.get("operation_id"), Some(&op.operation_id));
        // A watcher that goes away after its first event disturbs nothing.
        {
            let mut w = c2
                .watch_update(pb::WatchUpdateRequest {
                    operation_id: op.operation_id.clone(),
                })
                .await
                .expect("watch")
                .into_inner();
            let first = w.next().await.expect("one event").expect("ok");
            assert!(
                matches!(first.kind, Some(pb::update_event::Kind::Snapshot(_))),
                "{first:?}"
            );
        }
        drop(c2);
        let events = collect(&mut c, &op.operation_id).await;
        assert!(
            matches!(events[0], pb::update_event::Kind::Snapshot(_)),
            "{:?}",
            events[0]
        );
        let phases: Vec<i32> = events
            .iter()
            .filter_map(|k| match k {
                pb::update_event::Kind::Phase(p) => Some(*p),
                _ => None,
            })
            .collect();
        for p in [pb::Phase::Verifying, pb::Phase::Armed, pb::Phase::Done] {
            assert!(
                phases.contains(&(p as i32)),
                "{p:?} missing from {phases:?}"
            );
        }
        let progress: Vec<&pb::Progress> = events
            .iter()
            .filter_map(|k| match k {
                pb::update_event::Kind::Progress(p) => Some(p),
                _ => None,
            })
            .collect();
        assert!(progress.len() >= 2, "{progress:?}");
        assert!(progress
            .windows(2)
            .all(|w| w[0].bytes_done <= w[1].bytes_done));
        let last = progress.last().expect("progress");
        assert_eq!(last.ops_done, last.ops_total);
        assert_eq!(last.bytes_done, last.bytes_total);
        let r = result_of(&events);
        assert_eq!(r.outcome, pb::Outcome::Armed as i32, "{r:?}");
        assert_eq!(r.version, "2.0");
        n.server.set(Faults::default());
        n.assert_armed_v2();
        // The head StartUpdate's check fetched is the one staging uses: no byte of the
        // payload is served twice.
        let served = n.server.served.load(Ordering::SeqCst) - served_before;
        let size = fs::metadata(n.payloads.join(&delta))
            .expect("payload")
            .len();
        assert!(
            served <= size,
            "{served} bytes served for a {size}-byte payload"
        );

        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(s.state, "armed");
        let other = s.other.expect("other slot");
        assert_eq!(
            (other.state, other.version.as_str()),
            (pb::SlotState::Armed as i32, "2.0")
        );
        assert_eq!(s.operation.map(|o| o.phase), Some(pb::Phase::Armed as i32));
        assert_eq!(
            s.bootloader.map(|b| (b.trial_slot, b.tries_left)),
            Some(("b".into(), 3))
        );

        // Reboot: allowed now that a release is armed (the command leaves a mark here).
        let r = c
            .reboot(pb::RebootRequest {
                force: false,
                method: pb::RebootMethod::Unspecified as i32,
            })
            .await
            .expect("reboot")
            .into_inner();
        // agent.toml says nothing: through the firmware, nothing refused.
        assert_eq!(
            (r.method, r.fallback.as_str()),
            (pb::RebootMethod::Firmware as i32, "")
        );
        assert!(n.path("rebooted").exists());
    });

    // The reboot: GRUB tries b, the boot-check unit commits, the daemon starts again.
    drop(d);
    n.boot_into("b");
    fs::write(n.path("os-release"), "VERSION_ID=2.0\n").expect("os-release");
    let o = n.agent(&["boot-check"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let d = Daemon::start(&n);
    rt.block_on(async {
        let mut c = client::unix(&d.socket).await.expect("connect");
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(s.state, "committed");
        assert_eq!(s.running_version, "2.0");
        let other = s.other.expect("other");
        assert_eq!(
            (other.state, other.version.as_str()),
            (pb::SlotState::KnownGood as i32, "1.0")
        );
        let last = s.last_result.expect("last result");
        assert_eq!(
            (last.outcome, last.version.as_str()),
            (pb::Outcome::Committed as i32, "2.0")
        );

        let e = c
            .mark_good(pb::MarkGoodRequest {})
            .await
            .expect_err("not on trial");
        assert_eq!(e.code(), Code::FailedPrecondition);
        let e = c
            .cancel(pb::CancelRequest {})
            .await
            .expect_err("nothing to cancel");
        assert_eq!(e.code(), Code::FailedPrecondition);
        // Now that the agent knows the image it runs, a version resolves to its delta.
        let r = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Version("2.0".into())),
            })
            .await
            .expect("check")
            .into_inner();
        assert!(!r.available && r.reason.contains("not newer"), "{r:?}");
        let r = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Channel(
                    "stable".into(),
                )),
            })
            .await
            .expect("check channel")
            .into_inner();
        assert!(!r.available && r.version == "2.0", "{r:?}");

        let h = c
            .list_history(pb::ListHistoryRequest {
                page_size: 1,
                page_token: String::new(),
            })
            .await
            .expect("history")
            .into_inner();
        assert_eq!(h.entries.len(), 1);
        assert_eq!(h.entries[0].outcome, pb::Outcome::Committed as i32);
        assert!(h.next_page_token.is_empty());
        let e = c
            .list_history(pb::ListHistoryRequest {
                page_size: 1,
                page_token: "x".into(),
            })
            .await
            .expect_err("token");
        assert_eq!(e.code(), Code::InvalidArgument);

        let r = c
            .rollback(pb::RollbackRequest {})
            .await
            .expect("rollback")
            .into_inner();
        assert_eq!((r.slot.as_str(), r.version.as_str()), ("a", "1.0"));
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert_eq!(s.state, "rolling_back");
        assert_eq!(s.bootloader.map(|b| b.default_slot), Some("a".into()));
    });

    // updatectl against the same daemon: status in both forms, history.
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_updatectl"))
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .output()
            .expect("updatectl")
    };
    let o = ctl(&["status"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(out.contains("Running   2.0 on slot b"), "{out}");
    assert!(out.contains("reboot to finish the rollback"), "{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 80), "{out}");
    let o = ctl(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(v["schema"], "updatectl.status.v1");
    assert_eq!(v["state"], "rolling_back");
    let o = ctl(&["history", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("history json");
    assert_eq!(v["entries"][0]["outcome"], "committed");
    let o = ctl(&["mark-good"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("no trial boot to mark good"),
        "{}",
        text(&o)
    );
}
