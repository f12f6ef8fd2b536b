//! Readers, admins and outsiders (`setpriv`), cancel mid-write, a daemon killed
//! mid-write and resumed at its next start; the Python grpcio client.

use super::*;

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
