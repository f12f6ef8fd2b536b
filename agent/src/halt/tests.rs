//! The halt client against a real local HTTP server that answers well, badly,
//! slowly and at length.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::*;

/// How the test server answers.
#[derive(Clone)]
enum Reply {
    Body(&'static str, Vec<u8>),
    /// Headers at once, then the body a byte every 200 ms.
    Trickle(Vec<u8>),
    /// A body of this many bytes, no Content-Length.
    Endless(usize),
}

/// Serves `reply` to every connection; returns the base URL.
fn serve(reply: Reply) -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { return };
            let reply = reply.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().expect("clone"));
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                let _ = match reply {
                    Reply::Body(status, b) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            b.len()
                        );
                        s.write_all(&b)
                    }
                    Reply::Trickle(b) => {
                        let _ = write!(
                            s,
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            b.len()
                        );
                        b.iter().try_for_each(|c| {
                            std::thread::sleep(Duration::from_millis(200));
                            s.write_all(&[*c])
                        })
                    }
                    Reply::Endless(n) => {
                        let _ = write!(s, "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n{{\"status\":\"success\",\"data\":{{\"alerts\":[");
                        let chunk = vec![b' '; 64 << 10];
                        (0..n / chunk.len()).try_for_each(|_| s.write_all(&chunk))
                    }
                };
            });
        }
    });
    format!("http://{addr}")
}

fn alerts(list: &str) -> Vec<u8> {
    format!(r#"{{"status":"success","data":{{"alerts":[{list}]}}}}"#).into_bytes()
}

fn matcher(name: &str, labels: &[(&str, &str)]) -> Matcher {
    let l = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Matcher::new(name, &l).expect("valid patterns")
}

fn ask(base: &str, m: &Matcher) -> Result<Option<Holding>, HaltError> {
    Client::new(base, Duration::from_secs(2)).holding(m)
}

const FIRING: &str = r#"{"labels":{"alertname":"UpdateAgentRollback","severity":"page","instance":"n1:9469"},"state":"firing"},
{"labels":{"alertname":"UpdateAgentRollback","severity":"page","instance":"n2:9469"},"state":"firing"},
{"labels":{"alertname":"DiskFull"},"state":"firing"},
{"labels":{"alertname":"UpdateAgentRollbackSoon"},"state":"pending"}"#;

#[test]
fn a_matching_firing_alert_holds_and_names_itself() {
    let base = serve(Reply::Body("200 OK", alerts(FIRING)));
    let h = ask(&base, &matcher("UpdateAgent.*", &[]))
        .expect("answer")
        .expect("held");
    assert_eq!(h.count, 2);
    assert_eq!(
        h.alert,
        r#"UpdateAgentRollback{instance="n1:9469",severity="page"}"#
    );
    // Anchored: a prefix does not match; pending alerts never hold.
    assert_eq!(
        ask(&base, &matcher("UpdateAgent", &[])).expect("answer"),
        None
    );
    assert_eq!(
        ask(&base, &matcher("UpdateAgentRollbackSoon", &[])).expect("answer"),
        None
    );
    // Label matchers narrow it; a missing label matches as "".
    assert_eq!(
        ask(&base, &matcher(".*", &[("severity", "ticket")])).expect("answer"),
        None
    );
    let d = ask(&base, &matcher(".*", &[("severity", "")]))
        .expect("answer")
        .expect("held");
    assert_eq!(d.alert, "DiskFull");
    // Nothing firing: the rollout goes on.
    let quiet = serve(Reply::Body("200 OK", alerts("")));
    assert_eq!(ask(&quiet, &matcher(".*", &[])).expect("answer"), None);
}

#[test]
fn odd_alert_names_are_matched_as_they_are_and_shown_escaped() {
    let odd = r#"{"labels":{"alertname":"Roll\nback \"x\" \u001b[31m ünï","job":"a}b"},"state":"firing"}"#;
    let base = serve(Reply::Body("200 OK", alerts(odd)));
    let h = ask(&base, &matcher("Roll\\nback.*", &[]))
        .expect("answer")
        .expect("held");
    assert!(!h.alert.chars().any(char::is_control), "{:?}", h.alert);
    assert!(h.alert.contains(r"Roll\nback"), "{}", h.alert);
    assert!(h.alert.contains("ünï"), "{}", h.alert);
    // A name as long as a body: cut for people.
    let long = format!(
        r#"{{"labels":{{"alertname":"{}"}},"state":"firing"}}"#,
        "A".repeat(10_000)
    );
    let body: &'static str = Box::leak(long.into_boxed_str());
    let base = serve(Reply::Body("200 OK", alerts(body)));
    let h = ask(&base, &matcher("A+", &[]))
        .expect("answer")
        .expect("held");
    assert!(h.alert.chars().count() <= SHOWN + 1, "{}", h.alert.len());
}

#[test]
fn garbage_errors_and_refusals_are_errors_not_answers() {
    let m = matcher(".*", &[]);
    for body in [
        &b"<html>502 Bad Gateway</html>"[..],
        b"",
        b"{\"status\":\"success\"}",
        b"{\"status\":\"success\",\"data\":{\"alerts\":{}}}",
        b"\xff\xfe\x00garbage",
    ] {
        let base = serve(Reply::Body("200 OK", body.to_vec()));
        let e = ask(&base, &m).expect_err("garbage");
        assert!(
            matches!(e, HaltError::Garbage { .. } | HaltError::Failed { .. }),
            "{e}"
        );
    }
    let base = serve(Reply::Body(
        "200 OK",
        br#"{"status":"error","errorType":"bad_data","error":"nope\u0007"}"#.to_vec(),
    ));
    let e = ask(&base, &m).expect_err("error status");
    assert!(e.to_string().contains("nope\\u{7}"), "{e}");
    let base = serve(Reply::Body("503 Service Unavailable", alerts(FIRING)));
    assert!(matches!(
        ask(&base, &m),
        Err(HaltError::Status { status: 503, .. })
    ));
    // Nobody listening.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let gone = format!("http://{}", l.local_addr().expect("addr"));
    drop(l);
    assert!(matches!(ask(&gone, &m), Err(HaltError::Transport { .. })));
}

#[test]
fn a_slow_server_times_out_within_the_bound() {
    let base = serve(Reply::Trickle(alerts(FIRING)));
    let start = Instant::now();
    let e = Client::new(&base, Duration::from_millis(700))
        .holding(&matcher(".*", &[]))
        .expect_err("too slow");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(e, HaltError::Transport { .. } | HaltError::Read { .. }),
        "{e}"
    );
}

#[test]
fn a_huge_body_is_cut_at_the_cap() {
    let base = serve(Reply::Endless(64 << 20));
    let e = ask(&base, &matcher(".*", &[])).expect_err("too big");
    assert!(matches!(e, HaltError::TooBig { .. }), "{e}");
}

#[test]
fn bad_patterns_name_their_key() {
    let e = Matcher::new("(", &BTreeMap::new()).expect_err("bad");
    assert_eq!(e.what, "alerts");
    let l = [("severity".to_owned(), "[".to_owned())]
        .into_iter()
        .collect();
    let e = Matcher::new(".*", &l).expect_err("bad");
    assert_eq!(e.what, "labels.severity");
}
