//! The resume logic of [`super::HttpSource`] against a real server on 127.0.0.1 that
//! drops, stalls or trickles: what arrived is never requested again.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{FetchError, HttpSource};
use crate::config::FetchConfig;
use crate::payload::RangeSource;

/// How the server misbehaves on each response body.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// Close the connection after this many body bytes of every response.
    CutAfter(usize),
    /// The first range response (not the head) sends this many bytes, then holds the
    /// connection silent for `ms`; later responses are whole.
    StallOnce(usize, u64),
    /// Every range response after the head sends one byte per `ms`, forever.
    Trickle(u64),
    /// The first range response after the head trickles, later ones are whole.
    TrickleOnce(u64),
}

#[derive(Debug, Default)]
struct Log {
    /// (first byte, last byte) of every request.
    ranges: Vec<(u64, u64)>,
    body_bytes: u64,
}

fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn server(data: Vec<u8>, mode: Mode) -> (String, Arc<Mutex<Log>>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/p.uap", l.local_addr().expect("addr"));
    let log = Arc::new(Mutex::new(Log::default()));
    let log2 = Arc::clone(&log);
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let (data, log) = (data.clone(), Arc::clone(&log2));
            std::thread::spawn(move || {
                let _ = serve(c, &data, mode, &log);
            });
        }
    });
    (url, log)
}

fn serve(mut c: TcpStream, data: &[u8], mode: Mode, log: &Mutex<Log>) -> std::io::Result<()> {
    loop {
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            if c.read(&mut b)? == 0 {
                return Ok(());
            }
            req.push(b[0]);
        }
        let text = String::from_utf8_lossy(&req).to_ascii_lowercase();
        let (a, z) = text
            .lines()
            .find_map(|l| l.strip_prefix("range: bytes="))
            .and_then(|r| r.trim().split_once('-'))
            .and_then(|(a, z)| Some((a.parse::<u64>().ok()?, z.parse::<u64>().ok()?)))
            .expect("a range request");
        let z = z.min(data.len() as u64 - 1);
        let nth = {
            let mut l = log.lock().expect("log");
            l.ranges.push((a, z));
            l.ranges.len()
        };
        let body = &data[a as usize..=z as usize];
        write!(
            c,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{z}/{}\r\n\r\n",
            body.len(),
            data.len()
        )?;
        let sent = |n: usize| log.lock().expect("log").body_bytes += n as u64;
        let head = nth == 1;
        match mode {
            Mode::CutAfter(n) if body.len() > n => {
                sent(n);
                c.write_all(&body[..n])?;
                return Ok(());
            }
            Mode::StallOnce(n, ms) if nth == 2 => {
                sent(n);
                c.write_all(&body[..n])?;
                std::thread::sleep(Duration::from_millis(ms));
                return Ok(());
            }
            Mode::Trickle(ms) if !head => loop {
                for b in body {
                    c.write_all(std::slice::from_ref(b))?;
                    sent(1);
                    std::thread::sleep(Duration::from_millis(ms));
                }
            },
            Mode::TrickleOnce(ms) if nth == 2 => {
                for b in &body[..20] {
                    c.write_all(std::slice::from_ref(b))?;
                    sent(1);
                    std::thread::sleep(Duration::from_millis(ms));
                }
                return Ok(());
            }
            _ => {
                // Counted before it is written: the client may have it all before
                // this thread runs again.
                sent(body.len());
                c.write_all(body)?;
            }
        }
    }
}

fn cfg() -> FetchConfig {
    FetchConfig {
        retries: 1,
        backoff_ms: 10,
        max_backoff_secs: 1,
        stall_timeout_secs: Some(1),
        ..FetchConfig::default()
    }
}

/// The requests for the range `start..=end` must each start past the last one.
fn assert_never_twice(log: &Log, start: u64, end: u64) {
    let mut next = start;
    for &(a, _) in log.ranges.iter().filter(|r| r.1 == end) {
        assert!(a >= next, "byte {a} requested again: {:?}", log.ranges);
        next = a + 1;
    }
    assert_eq!(
        log.ranges.iter().find(|r| r.1 == end).map(|r| r.0),
        Some(start)
    );
}

#[test]
fn a_connection_cut_every_50_kb_resumes_at_the_next_byte() {
    let data = content(500_000);
    let (url, log) = server(data.clone(), Mode::CutAfter(50_000));
    // One retry allowed, yet seven cuts: every attempt that brings bytes counts as
    // progress, not as a failure.
    let src = HttpSource::open(&url, &cfg()).expect("open");
    let mut buf = vec![0u8; 350_000];
    let mut arrived = Vec::new();
    src.read_range_streaming(100_000, &mut buf, &mut |p| arrived.extend_from_slice(p))
        .expect("range");
    assert!(buf == data[100_000..450_000]);
    assert!(arrived == buf, "pieces handed over in order, each once");
    {
        let log = log.lock().expect("log");
        assert_never_twice(&log, 100_000, 449_999);
        // The head (cut too, and resumed) plus exactly the range: nothing twice.
        assert_eq!(log.body_bytes, 65_536 + 350_000, "{:?}", log.ranges);
        assert_eq!(src.fetched(), log.body_bytes);
    }
    // A range that starts inside the head takes that part from it.
    let mut buf = vec![0u8; 100_000];
    src.read_range(30_000, &mut buf).expect("range");
    assert!(buf == data[30_000..130_000]);
    let log = log.lock().expect("log");
    assert_never_twice(&log, 65_536, 129_999);
    assert_eq!(log.body_bytes, 65_536 + 350_000 + 64_464);
}

#[test]
fn a_silent_connection_is_left_after_the_stall_timeout_and_resumed() {
    let data = content(300_000);
    let (url, log) = server(data.clone(), Mode::StallOnce(10_000, 4_000));
    let src = HttpSource::open(&url, &cfg()).expect("open");
    let mut buf = vec![0u8; 200_000];
    src.read_range(70_000, &mut buf).expect("range");
    assert!(buf == data[70_000..270_000]);
    let log = log.lock().expect("log");
    assert_eq!(
        log.ranges[1..],
        [(70_000, 269_999), (80_000, 269_999)],
        "resumed after the 10 kB that arrived"
    );
}

#[test]
fn a_trickle_is_a_stall_and_a_trickle_that_never_ends_fails_naming_the_keys() {
    let data = content(200_000);
    let slow = FetchConfig {
        min_throughput_bytes: 1_000,
        min_throughput_secs: 1,
        ..cfg()
    };
    // Once: the next connection brings the rest.
    let (url, log) = server(data.clone(), Mode::TrickleOnce(100));
    let src = HttpSource::open(&url, &slow).expect("open");
    let mut buf = vec![0u8; 100_000];
    src.read_range(90_000, &mut buf).expect("range");
    assert!(buf == data[90_000..190_000]);
    let log = log.lock().expect("log");
    assert_eq!(log.ranges.len(), 3, "{:?}", log.ranges);
    assert_never_twice(&log, 90_000, 189_999);

    // Always: a stall counts against the retries even though bytes arrive.
    let (url, _log) = server(data, Mode::Trickle(100));
    let src = HttpSource::open(&url, &slow).expect("open");
    let e = src.read_range(90_000, &mut buf).expect_err("too slow");
    let inner = e
        .get_ref()
        .and_then(|e| e.downcast_ref::<FetchError>())
        .expect("a fetch error");
    assert!(matches!(inner, FetchError::TooSlow { .. }), "{inner:?}");
    let msg = inner.to_string();
    assert!(msg.contains("fetch.min_throughput_bytes"), "{msg}");
}

#[test]
fn nothing_is_requested_after_the_staging_deadline() {
    let data = content(300_000);
    let (url, log) = server(data, Mode::Trickle(20));
    let c = FetchConfig {
        staging_deadline_secs: 1,
        min_throughput_bytes: 0,
        ..cfg()
    };
    let src = HttpSource::open(&url, &c).expect("open");
    let mut buf = vec![0u8; 100_000];
    let e = src.read_range(70_000, &mut buf).expect_err("deadline");
    let inner = e
        .get_ref()
        .and_then(|e| e.downcast_ref::<FetchError>())
        .expect("a fetch error");
    assert!(
        matches!(inner, FetchError::Deadline { secs: 1, .. }),
        "{inner:?}"
    );
    assert!(inner.to_string().contains("fetch.staging_deadline_secs"));
    assert_eq!(log.lock().expect("log").ranges.len(), 2);
}

#[test]
fn a_kept_head_is_not_fetched_again_and_a_payload_of_another_size_is_refused() {
    let data = content(300_000);
    let (url, log) = server(data.clone(), Mode::CutAfter(usize::MAX));
    let head = data[..1_000].to_vec();
    let src = HttpSource::with_head(&url, &cfg(), 300_000, head.clone()).expect("open");
    assert_eq!(src.size(), 300_000);
    let mut buf = vec![0u8; 2_000];
    src.read_range(0, &mut buf).expect("range");
    assert!(buf == data[..2_000]);
    {
        let log = log.lock().expect("log");
        assert_eq!(log.ranges, [(1_000, 1_999)], "only what the head lacks");
    }
    // What was kept says 400,000 bytes; the server's payload is another one now.
    let src = HttpSource::with_head(&url, &cfg(), 400_000, head).expect("open");
    let e = src.read_range(5_000, &mut buf).expect_err("changed");
    let e = e
        .into_inner()
        .and_then(|e| e.downcast::<FetchError>().ok())
        .expect("a FetchError");
    assert!(
        matches!(
            *e,
            FetchError::Changed {
                was: 400_000,
                now: 300_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("changed on the server"), "{e}");
}
