//! Unattended patching end to end: the real daemon on a loop-device node follows a
//! signed channel, waits for its rollout wave, stages, waits for its maintenance
//! window, competes for a FleetLock slot against another node on a FleetLock server
//! that follows the protocol (integration/fleetlock-server.py), reboots, and releases
//! the slot after the commit. Metrics come from the HTTP endpoint and the textfile.
//!
//! The daemon's clock is shifted with UPDATE_AGENT_TEST_CLOCK_OFFSET_SECS (test builds
//! only) to stand before the wave, outside the window and inside it; each phase is a
//! fresh start of the daemon, which is also how the restart-while-holding-the-lock
//! case is covered.

use std::io::{BufRead as _, Read as _};
use std::process::Stdio;

use update_agent::api::{client, pb};
use update_agent::fleetlock::{self, FleetLockError};

use super::api::{api_node, publish_channel, rt, status_until, Daemon};
use super::*;

/// integration/fleetlock-server.py on a free port; killed when dropped.
pub(super) struct FleetLockServer {
    child: std::process::Child,
    pub(super) url: String,
    log: PathBuf,
}

impl FleetLockServer {
    pub(super) fn start(dir: &Path, slots: u32) -> Self {
        let log = dir.join("fleetlock.log");
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../integration/fleetlock-server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["0", &slots.to_string()])
            .env("FLEETLOCK_LOG", &log)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fleetlock-server.py");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("fleetlock server's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("address")
            .to_owned();
        Self {
            child,
            url: format!("http://{addr}"),
            log,
        }
    }

    /// Every request so far: (op, id, ok, holders).
    pub(super) fn requests(&self) -> Vec<(String, String, bool, Vec<String>)> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("log line");
                let holders = v["holders"]
                    .as_array()
                    .expect("holders")
                    .iter()
                    .map(|h| h.as_str().unwrap_or_default().to_owned())
                    .collect();
                (
                    v["op"].as_str().unwrap_or_default().to_owned(),
                    v["id"].as_str().unwrap_or_default().to_owned(),
                    v["ok"].as_bool().unwrap_or(false),
                    holders,
                )
            })
            .collect()
    }
}

impl Drop for FleetLockServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn fleetlock_clients_compete_for_one_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = FleetLockServer::start(dir.path(), 1);
    let node = |n: &str| {
        fleetlock::Client::new(
            &server.url,
            "workers",
            fleetlock::node_id(n),
            Duration::from_secs(5),
        )
    };
    let (a, b, c) = (node("machine-a"), node("machine-b"), node("machine-c"));
    a.pre_reboot().expect("a takes the only slot");
    a.pre_reboot().expect("taking it again is fine (recursive)");
    for other in [&b, &c] {
        match other.pre_reboot() {
            Err(FleetLockError::Refused {
                kind,
                value,
                status,
                ..
            }) => {
                assert_eq!((kind.as_str(), status), ("failed_lock", 409));
                assert!(value.contains(a.id()), "{value}");
            }
            r => panic!("a second node got past a held slot: {r:?}"),
        }
    }
    // Releasing what one does not hold is fine; it frees nothing.
    b.steady_state().expect("idempotent release");
    assert!(c.pre_reboot().is_err());
    a.steady_state().expect("a releases");
    c.pre_reboot().expect("c gets the slot once a released it");
    assert!(b.pre_reboot().is_err());
    // Another group has slots of its own.
    let other_group =
        fleetlock::Client::new(&server.url, "db", b.id().to_owned(), Duration::from_secs(5));
    other_group.pre_reboot().expect("a slot in another group");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 10, "{reqs:?}");
    assert!(reqs.iter().all(|(_, id, _, _)| id.len() == 32));
    // Nothing listening: the error names the server.
    let gone = fleetlock::Client::new(
        "http://127.0.0.1:9",
        "g",
        "x".into(),
        Duration::from_secs(2),
    );
    let e = gone.steady_state().expect_err("nothing listens");
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
}

pub(super) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub(super) fn http_get(port: u16, path: &str) -> String {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect metrics");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}

/// The metric families (name → type) the Prometheus project's own parser reads from
/// `text` (prometheus-client, pinned in integration/grpc/requirements.txt).
fn prometheus_parse(text: &str) -> HashMap<String, String> {
    let python = std::env::var("UPDATE_AGENT_PYTHON")
        .unwrap_or_else(|_| "/var/tmp/update-agent-py/bin/python".into());
    let mut child = Command::new(&python)
        .args([
            "-c",
            "import json, sys\n\
             from prometheus_client.parser import text_string_to_metric_families as p\n\
             print(json.dumps({f.name: f.type for f in p(sys.stdin.read())}))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{python}: {e} (integration/setup.sh installs it)"));
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write");
    }
    let o = child.wait_with_output().expect("parser");
    assert!(
        o.status.success(),
        "the Prometheus parser refused the text: {}{}\n{text}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("json")
}

pub(super) async fn connect(n: &Node) -> client::Client {
    client::unix(&n.path("run/agent.sock"))
        .await
        .expect("connect")
}

/// Asserts the daemon sleeps: at most 4 wake-ups in 2 s while nobody calls it.
fn assert_sleeps(d: &Daemon, what: &str) {
    std::thread::sleep(Duration::from_millis(300));
    let before = d.switches();
    std::thread::sleep(Duration::from_secs(2));
    let woke = d.switches() - before;
    assert!(woke <= 4, "the daemon woke {woke} times in 2 s {what}");
}

pub(super) fn auto_of(s: &pb::Status) -> pb::Auto {
    s.auto.clone().expect("status has the auto section")
}

#[test]
fn auto_follows_channel_wave_window_and_fleetlock() {
    const DAY: i64 = 86_400;
    let n = api_node();
    n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    // Everyone starts 30 days after publication.
    let o = publish_channel(&n, "2.0", &["--wave", "30d:100", "--expires-in-days", "90"]);
    assert!(o.status.success(), "{}", text(&o));
    let published = update_agent::timefmt::now() as i64;

    let lock = FleetLockServer::start(n.dir.path(), 1);
    fs::write(n.path("machine-id"), "5f1c0ffee0dd4e5b9c3b2a1d0e9f8a7b\n").expect("machine-id");
    let me = fleetlock::node_id("5f1c0ffee0dd4e5b9c3b2a1d0e9f8a7b");
    let metrics_port = free_port();
    // A daily one-hour window, three hours after the moment phase 2 stands at.
    let phase2 = published + 31 * DAY;
    let opens = phase2 + 3 * 3600;
    let hhmm = &update_agent::timefmt::rfc3339(opens as u64)[11..16];
    let window_start = opens - opens % 60;
    let base = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        format!(
            "{base}[auto]\nenabled = true\nchannel = \"stable\"\ncheck_interval = \"1h\"\n\
             check_jitter = \"0s\"\nreboot = \"fleetlock\"\ntime_zone = \"UTC\"\nmachine_id = \"{}\"\n\
             [[auto.windows]]\ndays = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\", \"sat\", \"sun\"]\n\
             start = \"{hhmm}\"\nlength = \"1h\"\n\
             [auto.fleetlock]\nurl = \"{}\"\ngroup = \"workers\"\nbackoff = \"200ms\"\nmax_backoff = \"1s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\ntextfile = \"{}\"\n",
            n.path("machine-id").display(),
            lock.url,
            n.path("metrics.prom").display(),
        ),
    )
    .expect("config");
    let start = |offset: i64| {
        Daemon::start_with(
            &n,
            &[("UPDATE_AGENT_TEST_CLOCK_OFFSET_SECS", &offset.to_string())],
        )
    };
    let rt = rt();

    // 1. Before the wave: the release is seen, not started; the slot is released at start.
    {
        let _d = start(0);
        rt.block_on(async {
            let mut c = connect(&n).await;
            let s = status_until(&mut c, "checked the channel", |s| {
                s.auto.as_ref().is_some_and(|a| a.wave_start.is_some())
            })
            .await;
            let a = auto_of(&s);
            assert_eq!(a.offered_version, "2.0");
            assert!(a.enabled && a.last_check_error.is_empty(), "{a:?}");
            let wave = a.wave_start.expect("wave").seconds;
            assert!(
                (wave - (published + 30 * DAY)).abs() <= 5,
                "{wave} vs {published}"
            );
            assert!(a.next_step.contains("wave starts at"), "{}", a.next_step);
            assert!(s.operation.is_none() && s.state == "idle", "{s:?}");
            status_until(&mut c, "released the FleetLock slot", |s| {
                auto_of(s).fleetlock == "released"
            })
            .await;
        });
        assert_eq!(
            lock.requests()
                .first()
                .map(|r| (r.0.as_str(), r.1.as_str(), r.2)),
            Some(("steady-state", me.as_str(), true))
        );
    }

    // 2. Four seconds before the wave, outside the window: the wave's start wakes the
    // loop (not the next regular check, an hour later), it stages, then it waits for
    // the window; nothing reboots.
    {
        let wave_in_4s = published + 30 * DAY - 4 - update_agent::timefmt::now() as i64;
        let d = start(wave_in_4s);
        rt.block_on(async {
            let mut c = connect(&n).await;
            let s = status_until(&mut c, "staged and waiting for the window", |s| {
                s.state == "armed" && auto_of(s).next_step.contains("window that opens")
            })
            .await;
            let a = auto_of(&s);
            assert!(!a.in_window);
            // Daily windows: the next one opens the same day, a day before `opens`.
            assert_eq!(a.window_start.map(|t| t.seconds), Some(window_start - DAY));
            assert_eq!(
                s.operation.as_ref().map(|o| o.reboot),
                Some(pb::RebootPolicy::InWindow as i32)
            );
        });
        n.assert_armed_v2();
        // Waiting for a window is sleeping: no wake-ups while nobody calls (a loop
        // that spun on a past deadline woke 20 times a second).
        assert_sleeps(&d, "while waiting");
        assert!(!n.path("rebooted").exists(), "rebooted outside the window");
        let m = http_get(metrics_port, "/metrics");
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(m.contains("text/plain; version=0.0.4"), "{m}");
        for want in [
            "update_agent_state{state=\"armed\"} 1",
            // Two checks: one before the wave, one when it came.
            "update_agent_checks_total{result=\"ok\"} 2",
            &format!(
                "update_agent_next_window_start_timestamp_seconds {}",
                window_start - DAY
            ),
            "update_agent_fleetlock_held 0",
        ] {
            assert!(m.contains(want), "metrics lack {want:?}:\n{m}");
        }
        assert!(http_get(metrics_port, "/other").starts_with("HTTP/1.1 404"));
        let file = fs::read_to_string(n.path("metrics.prom")).expect("textfile");
        assert!(
            file.contains("update_agent_state{state=\"armed\"} 1"),
            "{file}"
        );
        // What Prometheus itself makes of the text (its parser drops `_total` from
        // counter families).
        let families = prometheus_parse(&file);
        for (name, kind) in [
            ("update_agent_info", "gauge"),
            ("update_agent_state", "gauge"),
            ("update_agent_downloaded_bytes", "counter"),
            ("update_agent_updates", "counter"),
            ("update_agent_rollbacks", "counter"),
            ("update_agent_checks", "counter"),
            ("update_agent_reboot_wait_seconds", "gauge"),
            ("update_agent_next_window_start_timestamp_seconds", "gauge"),
            ("update_agent_fleetlock_held", "gauge"),
        ] {
            assert_eq!(
                families.get(name).map(String::as_str),
                Some(kind),
                "{families:?}"
            );
        }
    }

    // 3a. Inside the window with a reboot command that fails: the slot is taken, then
    // given back (the node is not going down), and the release stays staged.
    let cfg = fs::read_to_string(&n.config).expect("config");
    let touch = cfg
        .lines()
        .find(|l| l.starts_with("reboot_command"))
        .expect("reboot_command")
        .to_owned();
    fs::write(
        &n.config,
        cfg.replace(&touch, "reboot_command = [\"sh\", \"-c\", \"exit 3\"]"),
    )
    .expect("config");
    {
        let _d = start(opens + 600 - published);
        rt.block_on(async {
            let mut c = connect(&n).await;
            let s = status_until(&mut c, "a failed reboot", |s| {
                let a = auto_of(s);
                a.next_step.contains("the reboot failed") && a.fleetlock == "released"
            })
            .await;
            assert_eq!(s.state, "armed");
        });
    }
    let reqs = lock.requests();
    let took = reqs
        .iter()
        .rposition(|r| r.0 == "pre-reboot" && r.1 == me && r.2)
        .expect("took the slot");
    assert!(
        reqs[took..]
            .iter()
            .any(|r| r.0 == "steady-state" && r.1 == me && r.3.is_empty()),
        "the slot was not given back after the failed reboot: {reqs:?}"
    );
    let before_phase3 = reqs.len();
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        cfg.replace("reboot_command = [\"sh\", \"-c\", \"exit 3\"]", &touch),
    )
    .expect("config");

    // 3. Inside the window, another node holds the only slot: wait, then take it.
    let other = fleetlock::Client::new(
        &lock.url,
        "workers",
        fleetlock::node_id("other"),
        Duration::from_secs(5),
    );
    other.pre_reboot().expect("the other node takes the slot");
    {
        let _d = start(opens + 600 - published);
        rt.block_on(async {
            let mut c = connect(&n).await;
            let s = status_until(&mut c, "refused by FleetLock", |s| {
                auto_of(s).next_step.contains("reboot slots are held")
            })
            .await;
            assert!(auto_of(&s).in_window, "{s:?}");
            assert!(!n.path("rebooted").exists(), "rebooted without the slot");
            other.steady_state().expect("the other node is done");
            status_until(&mut c, "took the slot", |s| auto_of(s).fleetlock == "held").await;
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !n.path("rebooted").exists() {
            assert!(Instant::now() < deadline, "never rebooted");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let reqs: Vec<_> = lock.requests().split_off(before_phase3);
    assert!(
        reqs.iter()
            .any(|r| r.0 == "pre-reboot" && r.1 == me && !r.2),
        "{reqs:?}"
    );
    let granted = reqs
        .iter()
        .position(|r| r.0 == "pre-reboot" && r.1 == me && r.2);
    assert!(granted.is_some(), "{reqs:?}");
    // In the window with a reboot pending, the restarted daemon never released: it
    // asked until it got the slot, then rebooted.
    assert!(
        !reqs.iter().any(|r| r.0 == "steady-state" && r.1 == me),
        "{reqs:?}"
    );

    // 4. The reboot. Should the daemon start before the health gate has judged the
    // trial, it waits for the gate and never reboots again (that would spend tries).
    n.boot_into("b");
    fs::write(n.path("os-release"), "NAME=Test\nVERSION_ID=2.0\n").expect("os-release");
    fs::remove_file(n.path("rebooted")).expect("marker");
    {
        let _d = start(opens + 700 - published);
        rt.block_on(async {
            let mut c = connect(&n).await;
            status_until(&mut c, "waiting for the gate", |s| {
                auto_of(s).next_step.contains("waiting for the health gate")
            })
            .await;
        });
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !n.path("rebooted").exists(),
            "rebooted a trial not yet judged"
        );
    }
    // The gate commits; the daemon's next start releases the slot.
    let o = n.agent(&["boot-check"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(n.state()["state"], "committed");
    {
        let _d = start(opens + 900 - published);
        rt.block_on(async {
            let mut c = connect(&n).await;
            let s = status_until(&mut c, "released after the commit", |s| {
                let a = auto_of(s);
                a.fleetlock == "released" && a.next_step.contains("up to date")
            })
            .await;
            assert_eq!(s.running_version, "2.0");
        });
        // `updatectl check` without a source asks about the node's own channel.
        let o = Command::new(env!("CARGO_BIN_EXE_updatectl"))
            .arg("--socket")
            .arg(n.path("run/agent.sock"))
            .arg("check")
            .output()
            .expect("updatectl check");
        assert!(
            o.status.success() && text(&o).contains("2.0 is not newer than the running 2.0"),
            "{}",
            text(&o)
        );
    }
    // 5. Unattended updates off, windows kept (for IN_WINDOW updates): the loop runs
    // but sleeps (it once spun on a check deadline that never moved).
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(&n.config, cfg.replace("enabled = true", "enabled = false")).expect("config");
    {
        let d = start(opens + 900 - published);
        rt.block_on(async {
            let mut c = connect(&n).await;
            status_until(&mut c, "off", |s| {
                auto_of(s).next_step.contains("unattended updates are off")
            })
            .await;
        });
        assert_sleeps(&d, "with auto off");
    }

    let last = lock.requests().last().cloned().expect("requests");
    assert_eq!(
        (last.0.as_str(), last.1.as_str(), last.2),
        ("steady-state", me.as_str(), true)
    );
    assert!(last.3.is_empty(), "{last:?}");
}
