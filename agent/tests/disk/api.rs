//! The gRPC API end to end: the real `update-agent serve` on a loop-device node, the
//! real Unix socket, our client and `updatectl`, peers with other credentials, and
//! a Python grpcio client generated from the .proto (not our code).

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Stdio};

use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_types::StatusExt as _;
use update_agent::api::client;
use update_agent::api::pb;

use super::*;

/// A running daemon; killed when dropped.
pub(super) struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    pub(super) fn start(n: &Node) -> Self {
        Self::start_with(n, &[])
    }

    pub(super) fn start_with(n: &Node, env: &[(&str, &str)]) -> Self {
        Self::spawn(n, env, Command::new(env!("CARGO_BIN_EXE_update-agent")))
    }

    /// Started with at most `nofile` descriptors (as a unit's `LimitNOFILE=` gives).
    pub(super) fn start_limited(n: &Node, nofile: u32) -> Self {
        let mut c = Command::new("prlimit");
        c.arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_update-agent"));
        Self::spawn(n, &[], c)
    }

    pub(super) fn socket(&self) -> &Path {
        &self.socket
    }

    fn spawn(n: &Node, env: &[(&str, &str)], mut cmd: Command) -> Self {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.path("daemon.log"))
            .expect("daemon log");
        let child = cmd
            .arg("--config")
            .arg(&n.config)
            .arg("serve")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn update-agent serve");
        let d = Self {
            child: Some(child),
            socket: n.path("run/agent.sock"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                fs::read_to_string(n.path("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Context switches of all the daemon's threads so far (its wake-ups).
    pub(super) fn switches(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
                    .flat_map(|st| {
                        st.lines()
                            .filter(|l| l.contains("ctxt_switches"))
                            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                            .collect::<Vec<_>>()
                    })
                    .sum()
            })
            .unwrap_or_default()
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// API settings for a node: socket under DIR/run (reachable by other users), group
/// 4242 may read, group 4243 may change things, reboots only leave a mark.
pub(super) fn api_node() -> Node {
    let n = Node::new();
    fs::set_permissions(n.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg = fs::read_to_string(&n.config).expect("config");
    let api = format!(
        "[api]\nsocket = \"{}\"\nsocket_group = \"4242\"\nadmin_groups = [\"4243\"]\n\
         [releases]\nurl = \"{}\"\n",
        n.path("run/agent.sock").display(),
        n.server.url("").trim_end_matches('/'),
    );
    let cfg = cfg.replace("[health]\n", &format!("{api}[health]\n"));
    fs::write(&n.config, cfg).expect("config");
    n.health_config(&format!(
        "reboot_command = [\"touch\", \"{}\"]",
        n.path("rebooted").display()
    ));
    n
}

/// `updatectl bundle publish --channel stable --version VERSION` over the node's
/// payload directory, signed with the node's publisher key, plus `extra` arguments.
pub(super) fn publish_channel(n: &Node, version: &str, extra: &[&str]) -> Output {
    let pem = {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        ed25519_dalek::SigningKey::from_bytes(&[3u8; 32])
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("pem")
    };
    fs::write(n.path("publisher.key"), pem.as_bytes()).expect("key");
    Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args([
            "bundle",
            "publish",
            "--channel",
            "stable",
            "--version",
            version,
        ])
        .args(extra)
        .arg("--dir")
        .arg(&n.payloads)
        .arg("--key")
        .arg(n.path("publisher.key"))
        .output()
        .expect("publish")
}

pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub(super) fn reason(s: &tonic::Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn start_req(source: pb::start_update_request::Source) -> pb::StartUpdateRequest {
    pb::StartUpdateRequest {
        source: Some(source),
        reboot: pb::RebootPolicy::Never as i32,
        allow_downgrade: false,
    }
}

/// Every event of an operation, to its result.
async fn collect(c: &mut client::Client, id: &str) -> Vec<pb::update_event::Kind> {
    let mut s = c
        .watch_update(pb::WatchUpdateRequest {
            operation_id: id.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        let kind = ev.expect("event").kind.expect("kind");
        let end = matches!(kind, pb::update_event::Kind::Result(_));
        out.push(kind);
        if end {
            break;
        }
    }
    out
}

fn result_of(events: &[pb::update_event::Kind]) -> pb::Result {
    match events.last() {
        Some(pb::update_event::Kind::Result(r)) => r.clone(),
        other => panic!("no result at the end: {other:?}"),
    }
}

/// Polls status until `ok` holds (at most a minute); `what` names the wait.
pub(super) async fn status_until(
    c: &mut client::Client,
    what: &str,
    ok: impl Fn(&pb::Status) -> bool,
) -> pb::Status {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_phase(c: &mut client::Client, phase: pb::Phase) {
    status_until(c, &format!("{phase:?}"), |s| {
        s.operation
            .as_ref()
            .is_some_and(|o| o.phase == phase as i32)
    })
    .await;
}

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
        c.reboot(pb::RebootRequest { force: false })
            .await
            .expect("reboot");
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

/// Runs `updatectl` as another user: uid, primary gid, supplementary groups.
pub(super) fn ctl_as(socket: &Path, uid: u32, groups: &[u32], args: &[&str]) -> Output {
    let list = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={list}"));
    }
    c.arg(env!("CARGO_BIN_EXE_updatectl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("setpriv updatectl")
}

#[test]
fn api_access_cancel_and_restart_mid_update() {
    use pb::start_update_request::Source as S;
    let n = api_node();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let mut d = Daemon::start(&n);
    let mode = fs::metadata(&d.socket)
        .expect("socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o660, "socket mode {mode:o}");

    // Group 4242 may read but not change; 4243 may change; nobody else gets in.
    let o = ctl_as(&d.socket, 4242, &[4242], &["status"]);
    assert!(o.status.success(), "{}", text(&o));
    let url = n.server.url(&delta);
    let o = ctl_as(&d.socket, 4242, &[4242], &["update", "--url", &url]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("may read but not change"), "{}", text(&o));
    let o = ctl_as(&d.socket, 4243, &[4242, 4243], &["cancel"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("nothing to cancel"),
        "admin passes the access check: {}",
        text(&o)
    );
    let o = ctl_as(&d.socket, 4244, &[], &["status"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));

    let rt = rt();
    let op = rt.block_on(async {
        let mut c = client::unix(&d.socket).await.expect("connect");
        // Cancel mid-write: the call returns once the operation has stopped.
        n.server.set(Faults {
            delay_ms: 30,
            ..Faults::default()
        });
        let op = c
            .start_update(start_req(S::Url(url.clone())))
            .await
            .expect("start")
            .into_inner();
        wait_phase(&mut c, pb::Phase::Writing).await;
        let r = c
            .cancel(pb::CancelRequest {})
            .await
            .expect("cancel")
            .into_inner();
        assert_eq!(r.slot, "b");
        let events = collect(&mut c, &op.operation_id).await;
        assert_eq!(result_of(&events).outcome, pb::Outcome::Cancelled as i32);
        assert_eq!(n.state()["state"], "cancelled");
        assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
        let h = c
            .list_history(pb::ListHistoryRequest::default())
            .await
            .expect("history")
            .into_inner();
        assert_eq!(h.entries[0].outcome, pb::Outcome::Cancelled as i32);

        // Started again, then the daemon is killed mid-write.
        let op = c
            .start_update(start_req(S::Url(url.clone())))
            .await
            .expect("start")
            .into_inner();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = c
                .get_status(pb::GetStatusRequest {})
                .await
                .expect("status")
                .into_inner();
            if s.operation.as_ref().is_some_and(|o| o.ops_done >= 4) {
                break;
            }
            assert!(Instant::now() < deadline, "no progress: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        op
    });
    d.signal(nix::sys::signal::Signal::SIGKILL);
    n.server.set(Faults::default());
    // The next start resumes the same operation by itself and arms the release.
    let d = Daemon::start(&n);
    rt.block_on(async {
        let mut c = client::unix(&d.socket).await.expect("connect");
        // Same operation id: it is the staging attempt's, kept in state.json.
        let events = collect(&mut c, &op.operation_id).await;
        let r = result_of(&events);
        assert_eq!(r.outcome, pb::Outcome::Armed as i32, "{r:?}");
    });
    n.assert_armed_v2();
    let log = fs::read_to_string(n.path("daemon.log")).unwrap_or_default();
    assert!(log.contains("resuming the interrupted update"), "{log}");
}

#[test]
fn api_python_grpcio_client() {
    let python = std::env::var("UPDATE_AGENT_PYTHON")
        .unwrap_or_else(|_| "/var/tmp/update-agent-py/bin/python".into());
    assert!(
        Path::new(&python).exists(),
        "{python} is missing: integration/setup.sh installs the Python gRPC client"
    );
    let n = api_node();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let d = Daemon::start(&n);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/grpc/client.py");
    let o = Command::new(&python)
        .arg(script)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--url")
        .arg(n.server.url(&delta))
        .output()
        .expect("run the Python client");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    for want in [
        "reflection lists updateagent.v1.UpdateAgent",
        "health: SERVING",
        "update ends ARMED",
        "history records the cancel",
        "all checks passed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert_eq!(n.state()["state"], "cancelled");
}

/// A CA, and certificates it signs, made with the openssl command line.
pub(super) struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub(super) fn new(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).expect("pki dir");
        Self { dir }
    }

    fn openssl(&self, args: &[&str]) {
        let o = Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
    }

    pub(super) fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
        ]);
    }

    /// A certificate for `cn` with `san` (e.g. "DNS:node1,IP:127.0.0.1"; "" for none),
    /// signed by `ca`.
    pub(super) fn cert(&self, ca: &str, name: &str, cn: &str, san: &str, usage: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        fs::write(
            self.dir.join(format!("{name}.ext")),
            if san.is_empty() {
                format!("extendedKeyUsage={usage}\n")
            } else {
                format!("subjectAltName={san}\nextendedKeyUsage={usage}\n")
            },
        )
        .expect("ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    pub(super) fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

/// A node with the TCP listener on: a fleet CA and a rogue one, the server's
/// certificate, clients `controller` (URI SAN spiffe://fleet/controller), `intruder`
/// (DNS SAN intruder) and `rogue` (the controller's names, the rogue CA); `allowed`
/// is `tls_allowed_clients`. Returns the PKI and the address to connect to.
pub(super) fn tls_node(n: &Node, allowed: &[&str]) -> (Pki, String) {
    let pki = Pki::new(n.path("pki"));
    pki.ca("fleet-ca");
    pki.ca("rogue-ca");
    pki.cert(
        "fleet-ca",
        "server",
        "node1",
        "DNS:node1,IP:127.0.0.1",
        "serverAuth",
    );
    pki.cert(
        "fleet-ca",
        "controller",
        "fleet-controller",
        "URI:spiffe://fleet/controller",
        "clientAuth",
    );
    pki.cert(
        "fleet-ca",
        "intruder",
        "intruder",
        "DNS:intruder",
        "clientAuth",
    );
    pki.cert(
        "rogue-ca",
        "rogue",
        "fleet-controller",
        "URI:spiffe://fleet/controller",
        "clientAuth",
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let cfg = fs::read_to_string(&n.config).expect("config");
    let list = allowed
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let tls = format!(
        "tcp_listen = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n\
         tls_allowed_clients = [{list}]\n[releases]\n",
        pki.path("server.crt").display(),
        pki.path("server.key").display(),
        pki.path("fleet-ca.crt").display(),
    );
    fs::write(&n.config, cfg.replacen("[releases]\n", &tls, 1)).expect("config");
    (pki, format!("https://127.0.0.1:{port}"))
}

#[test]
fn api_tcp_mutual_tls() {
    let n = api_node();
    let (pki, address) = tls_node(&n, &["spiffe://fleet/controller"]);
    let _d = Daemon::start(&n);

    let files = |name: &str, ca: &str| client::TlsFiles {
        ca: pki.path(&format!("{ca}.crt")),
        cert: pki.path(&format!("{name}.crt")),
        key: pki.path(&format!("{name}.key")),
        server_name: None,
    };
    let rt = rt();
    rt.block_on(async {
        // On the list: reads and changes (cancel gets past access, to "nothing to cancel").
        let mut c = client::tls(
            &address,
            &files("controller", "fleet-ca"),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status over TLS")
            .into_inner();
        assert_eq!(s.state, "idle");
        let e = c
            .cancel(pb::CancelRequest {})
            .await
            .expect_err("nothing to cancel");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

        // A good certificate whose identity is not on the list: refused every call.
        let mut c = client::tls(
            &address,
            &files("intruder", "fleet-ca"),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let e = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect_err("intruder");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("intruder"), "{}", e.message());

        // Same identity, signed by an unknown CA; and no certificate at all.
        let rogue = match client::tls(
            &address,
            &files("rogue", "fleet-ca"),
            Duration::from_secs(10),
        )
        .await
        {
            Ok(mut c) => c
                .get_status(pb::GetStatusRequest {})
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert!(rogue.is_err(), "a certificate from an unknown CA got in");

        // A listener that completes TCP's handshake (the kernel's backlog) and never
        // speaks TLS, as QEMU's user network does for a guest not up yet: the client
        // gives up when asked to, and says so.
        let silent = TcpListener::bind("127.0.0.1:0").expect("silent listener");
        let silent_at = format!("https://{}", silent.local_addr().expect("addr"));
        match client::tls(
            &silent_at,
            &files("controller", "fleet-ca"),
            Duration::from_millis(300),
        )
        .await
        {
            Err(e @ client::ConnectError::Timeout { .. }) => {
                assert!(e.to_string().contains(&silent_at), "{e}")
            }
            other => panic!("{:?}", other.map(drop)),
        }
        drop(silent);
        let plain = async {
            let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
                tonic::transport::Certificate::from_pem(
                    fs::read(pki.path("fleet-ca.crt")).expect("ca"),
                ),
            );
            let ch = tonic::transport::Endpoint::from_shared(address.clone())
                .expect("uri")
                .tls_config(tls)
                .expect("tls")
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            pb::update_agent_client::UpdateAgentClient::new(ch)
                .get_status(pb::GetStatusRequest {})
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert!(
            plain.await.is_err(),
            "a client without a certificate got in"
        );
    });
    // updatectl over TCP, as a fleet operator would run it.
    let o = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["--address", &address])
        .arg("--tls-ca")
        .arg(pki.path("fleet-ca.crt"))
        .arg("--tls-cert")
        .arg(pki.path("controller.crt"))
        .arg("--tls-key")
        .arg(pki.path("controller.key"))
        .args(["status", "--json"])
        .output()
        .expect("updatectl");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["running_version"], "1.0");
}

/// The daemon speaks systemd's notify protocol: READY once the socket serves, the
/// watchdog fed at half its interval, STOPPING on SIGTERM (what `Type=notify` and
/// `WatchdogSec=` in update-agent.service rely on), read from a real notify socket.
#[test]
fn daemon_notifies_systemd_and_feeds_the_watchdog() {
    let n = api_node();
    let notify = n.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // systemd names the watched process in WATCHDOG_PID: `exec` keeps the shell's pid.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\" serve")
        .arg(env!("CARGO_BIN_EXE_update-agent"))
        .arg(&n.config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let len = sock.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..len]).into_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1"), "{first:?}");
    assert!(first.contains("STATUS=serving on"), "{first:?}");
    // By READY the socket answers.
    assert!(std::os::unix::net::UnixStream::connect(n.path("run/agent.sock")).is_ok());
    let started = Instant::now();
    let mut fed = 0;
    while fed < 3 {
        if recv().contains("WATCHDOG=1") {
            fed += 1;
        }
    }
    // Three feeds at a 100 ms period: well inside the 200 ms watchdog, and not spinning.
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let mut stopping = false;
    for _ in 0..20 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(
        !n.path("run/agent.sock").exists(),
        "socket removed on a clean stop"
    );
}
