//! Halting on the fleet's alerts, end to end: the real daemon on a loop-device node
//! follows a channel whose release starts at once, with `[auto.halt]` pointing at a
//! stand-in for Prometheus's `/api/v1/alerts` that the test scripts answer by answer
//! (a matching alert, garbage, a huge body, a slow trickle, nothing firing). While
//! anything holds, nothing stages, no FleetLock slot is asked for and nothing
//! reboots; status, metrics and the journal event say why. After the commit the node
//! keeps its FleetLock slot for `auto.fleetlock.soak`.

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use super::api::{api_node, publish_channel, rt, status_until, Daemon};
use super::auto::{auto_of, connect, free_port, http_get, FleetLockServer};
use super::*;

/// How the stand-in answers one request.
#[derive(Clone, Debug)]
enum Answer {
    Alerts(&'static str),
    Garbage,
    Huge,
    Trickle,
}

/// Answers from a queue; the last one repeats.
#[derive(Clone)]
struct Prometheus {
    queue: Arc<Mutex<VecDeque<Answer>>>,
    url: String,
}

impl Prometheus {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let queue = Arc::new(Mutex::new(VecDeque::from([Answer::Alerts("")])));
        let q = Arc::clone(&queue);
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(s) = conn else { return };
                let answer = {
                    let mut q = q.lock().expect("queue");
                    if q.len() > 1 {
                        q.pop_front()
                    } else {
                        q.front().cloned()
                    }
                };
                std::thread::spawn(move || answer.map(|a| reply(s, &a)));
            }
        });
        Self { queue, url }
    }

    fn set(&self, answers: &[Answer]) {
        *self.queue.lock().expect("queue") = answers.iter().cloned().collect();
    }
}

fn reply(mut s: std::net::TcpStream, a: &Answer) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    while r.read_line(&mut line)? > 2 {
        line.clear();
    }
    let body = match a {
        Answer::Alerts(list) => {
            format!(r#"{{"status":"success","data":{{"alerts":[{list}]}}}}"#).into_bytes()
        }
        Answer::Garbage => b"<html>proxy error</html>".to_vec(),
        Answer::Huge => {
            write!(s, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")?;
            let chunk = vec![b'['; 1 << 20];
            for _ in 0..16 {
                s.write_all(&chunk)?;
            }
            return Ok(());
        }
        Answer::Trickle => {
            write!(s, "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")?;
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(100));
                s.write_all(b" ")?;
            }
            return Ok(());
        }
    };
    write!(
        s,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(&body)
}

const FIRING: &str = r#"{"labels":{"alertname":"UpdateAgentReleaseRolledBack","instance":"n7:9469","team":"a\nb"},"state":"firing"},{"labels":{"alertname":"DiskFull"},"state":"firing"}"#;
const OTHER: &str = r#"{"labels":{"alertname":"DiskFull"},"state":"firing"},{"labels":{"alertname":"UpdateAgentReleaseRolledBack"},"state":"pending"}"#;

#[test]
fn alerts_hold_stagings_and_reboots_and_bad_answers_hold_too() {
    let n = api_node();
    n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let o = publish_channel(&n, "2.0", &[]);
    assert!(o.status.success(), "{}", text(&o));
    let lock = FleetLockServer::start(n.dir.path(), 1);
    let prom = Prometheus::start();
    prom.set(&[Answer::Alerts(FIRING)]);
    fs::write(n.path("machine-id"), "5f1c0ffee0dd4e5b9c3b2a1d0e9f8a7b\n").expect("machine-id");
    let metrics_port = free_port();
    let base = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        format!(
            "{base}[auto]\nenabled = true\ncheck_interval = \"1h\"\ncheck_jitter = \"0s\"\n\
             reboot = \"fleetlock\"\nmachine_id = \"{}\"\n\
             [auto.fleetlock]\nurl = \"{}\"\nbackoff = \"200ms\"\nmax_backoff = \"1s\"\n\
             [auto.halt]\nprometheus = \"{}\"\nalerts = \"UpdateAgent.*\"\n\
             timeout = \"800ms\"\nrecheck = \"1s\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            n.path("machine-id").display(),
            lock.url,
            prom.url,
        ),
    )
    .expect("config");
    let pre_reboots = || {
        lock.requests()
            .iter()
            .filter(|r| r.0 == "pre-reboot")
            .count()
    };
    let _d = Daemon::start_with(&n, &[]);
    rt().block_on(async {
        let mut c = connect(&n).await;
        // A matching alert: nothing stages; status names the alert, escaped.
        let s = status_until(&mut c, "halted by the alert", |s| {
            !auto_of(s).halted_by.is_empty()
        })
        .await;
        let a = auto_of(&s);
        assert!(
            a.halted_by
                .contains(r#"UpdateAgentReleaseRolledBack{instance="n7:9469",team="a\nb"}"#),
            "{}",
            a.halted_by
        );
        assert!(
            a.next_step.contains("halted before staging 2.0"),
            "{}",
            a.next_step
        );
        assert_eq!(s.state, "idle");
        let m = http_get(metrics_port, "/metrics");
        assert!(m.contains("update_agent_rollout_halted 1"), "{m}");
        // Each bad answer holds (on_error = "hold") with its own reason.
        for (answer, says) in [
            (Answer::Garbage, "not an alerts list"),
            (Answer::Huge, "more than 4194304 bytes"),
            (Answer::Trickle, "too slow"),
        ] {
            prom.set(std::slice::from_ref(&answer));
            let s = status_until(&mut c, says, |s| auto_of(s).halted_by.contains(says)).await;
            assert_eq!(s.state, "idle", "{answer:?}");
        }
        assert_eq!(pre_reboots(), 0);
        // Nothing matching fires for the staging's question, then the alert fires
        // before the reboot: staged and armed, but no slot taken and no reboot.
        prom.set(&[Answer::Alerts(OTHER), Answer::Alerts(FIRING)]);
        let s = status_until(&mut c, "halted before the reboot", |s| {
            s.state == "armed" && auto_of(s).next_step.contains("halted before rebooting")
        })
        .await;
        assert!(auto_of(&s)
            .halted_by
            .contains("UpdateAgentReleaseRolledBack"));
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(pre_reboots(), 0, "asked for a slot while halted");
        assert!(!n.path("rebooted").exists(), "rebooted while halted");
        // The alert clears: the slot is taken and the node reboots.
        prom.set(&[Answer::Alerts(OTHER)]);
        status_until(&mut c, "took the slot", |s| auto_of(s).fleetlock == "held").await;
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !n.path("rebooted").exists() {
        assert!(Instant::now() < deadline, "never rebooted");
        std::thread::sleep(Duration::from_millis(50));
    }
    n.assert_armed_v2();
    drop(_d);
    soak_keeps_the_slot_after_the_commit(&n, &lock);
}

/// After the reboot and the commit, the slot stays taken for `auto.fleetlock.soak`
/// (status shows its end), then goes back.
fn soak_keeps_the_slot_after_the_commit(n: &Node, lock: &FleetLockServer) {
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        cfg.replace(
            "max_backoff = \"1s\"\n",
            "max_backoff = \"1s\"\nsoak = \"4s\"\n",
        ),
    )
    .expect("config");
    n.boot_into("b");
    fs::write(n.path("os-release"), "NAME=Test\nVERSION_ID=2.0\n").expect("os-release");
    let o = n.agent(&["boot-check"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let committed = n.state()["at"].as_u64().expect("commit time");
    let released = || {
        lock.requests()
            .iter()
            .filter(|r| r.0 == "steady-state" && r.2)
            .count()
    };
    let before = released();
    let _d = Daemon::start_with(n, &[]);
    rt().block_on(async {
        let mut c = connect(n).await;
        let s = status_until(&mut c, "soaking", |s| auto_of(s).soak_end.is_some()).await;
        let a = auto_of(&s);
        assert_eq!(a.soak_end.map(|t| t.seconds), Some(committed as i64 + 4));
        assert!(a.next_step.contains("soaking"), "{}", a.next_step);
        assert_ne!(a.fleetlock, "released");
        assert_eq!(released(), before, "released during the soak");
        let s = status_until(&mut c, "released after the soak", |s| {
            auto_of(s).fleetlock == "released"
        })
        .await;
        assert!(auto_of(&s).soak_end.is_none());
    });
    assert!(
        update_agent::timefmt::now() >= committed + 4,
        "released early"
    );
    assert_eq!(released(), before + 1);
}
