//! Always making progress: a staging over connections that drop, a slow link, and a
//! process killed again and again while a frame downloads. What arrived is never
//! fetched again, within a process (range requests from the next byte) or across
//! processes (the partial file in the state directory).

use std::fs;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{sha, text, Faults, Node, MIB};

/// `base` with `len` bytes of incompressible data at `at`: a frame that cannot shrink.
fn with_random(base: &[u8], at: usize, len: usize, seed: u64) -> Vec<u8> {
    let mut v = base.to_vec();
    let mut x = seed | 1;
    for chunk in v[at..at + len].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// Publishes `image` as version `version` (a delta from v1, frames of up to `chunk`
/// bytes of output); returns its URL and its size.
fn publish(n: &Node, version: &str, image: &[u8], chunk: u64) -> (String, u64) {
    let path = n.path(&format!("{version}.img"));
    fs::write(&path, image).expect("image");
    let name = n.publish(version, "test-board", &path, chunk);
    let size = fs::metadata(n.payloads.join(&name)).expect("meta").len();
    (n.server.url(&name), size)
}

/// Replaces the node's `[fetch]` stall guard line with `lines`.
fn fetch_config(n: &Node, lines: &str) {
    let cfg = fs::read_to_string(&n.config).expect("config");
    assert!(cfg.contains("request_timeout_secs = 2\n"), "{cfg}");
    fs::write(&n.config, cfg.replace("request_timeout_secs = 2\n", lines)).expect("config");
}

fn assert_armed(n: &Node, image: &[u8]) {
    assert_eq!(n.state()["state"], "armed", "{}", n.state());
    let b = super::read_dev(&n.disk.part(3), image.len() as u64);
    assert_eq!(sha(&b), sha(image), "slot b does not hold the release");
    n.assert_booted_untouched();
    assert!(
        !n.path("state/partial").exists(),
        "the kept frames outlive the attempt"
    );
}

#[test]
fn resume_connections_cut_every_100_kib_fetch_each_byte_once() {
    let n = Node::new();
    // A 2 MiB frame of new content beside the test image's ordinary changes.
    let image = with_random(&n.v2, 8 * MIB as usize, 2 * MIB as usize, 5);
    let (url, size) = publish(&n, "2.0", &image, 4 * MIB);
    n.server.set(Faults {
        cut_after: 100 << 10,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_armed(&n, &image);
    let served = n.server.served.load(Ordering::Relaxed);
    eprintln!(
        "cut every 100 KiB: served {served} bytes for a {size}-byte payload ({:.3}x)",
        served as f64 / size as f64
    );
    assert!(
        served * 10 < size * 11,
        "served {served} bytes for a {size}-byte payload"
    );
}

#[test]
fn resume_a_128_kbit_link_brings_a_frame_many_stall_timeouts_long() {
    let n = Node::new();
    // 256 KiB that cannot be compressed at 16,000 bytes a second: 16 s for one frame,
    // eight times the 2 s the node allows without a byte (the scale of a 16 MiB frame
    // against the old 120 s whole-request timeout at 1.1 Mbit/s).
    let image = with_random(&n.v1, 4 * MIB as usize, 256 << 10, 7);
    let (url, size) = publish(&n, "2.0", &image, MIB);
    fetch_config(&n, "stall_timeout_secs = 2\n");
    n.server.set(Faults {
        rate: 16_000,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &url], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_armed(&n, &image);
    let served = n.server.served.load(Ordering::Relaxed);
    assert!(served <= size, "served {served} of {size}");
    // The slow frame shows as it arrives, not only when its operation is done.
    let moving = text(&o)
        .lines()
        .filter_map(|l| l.split("(+").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .filter(|&b| b > 0)
        .count();
    assert!(moving >= 2, "no progress inside the frame: {}", text(&o));
}

#[test]
fn resume_sigkill_every_50_ms_to_2_5_s_while_a_large_frame_downloads() {
    let n = Node::new();
    // A 4 MiB frame at 512 KiB/s: eight seconds, never between two kills.
    let image = with_random(&n.v1, 4 * MIB as usize, 4 * MIB as usize, 11);
    let (url, size) = publish(&n, "2.0", &image, 4 * MIB);
    n.server.set(Faults {
        rate: MIB / 2,
        ..Faults::default()
    });
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("kill schedule seed {seed:#x}");
    let started = Instant::now();
    let (runs, kills) = super::stage_under_kills(&n, &url, 100, &mut || {
        Duration::from_millis(50 + super::xorshift(&mut seed) % 2450)
    });
    assert_armed(&n, &image);
    let served = n.server.served.load(Ordering::Relaxed);
    eprintln!(
        "{kills} kills in {runs} runs, {:.1} s: served {served} bytes for a {size}-byte payload ({:.3}x)",
        started.elapsed().as_secs_f64(),
        served as f64 / size as f64
    );
    assert!(
        kills >= 3,
        "the frame arrived between few kills: nothing was tested"
    );
    assert!(
        served * 2 < size * 3,
        "served {served} bytes for a {size}-byte payload"
    );
}

/// The read-back of a fully written slot keeps its place across restarts, a restart
/// fetches nothing it has (not even the payload's head), and written bytes changed
/// under the checkpoint are caught by the read-back and rewritten, never armed.
#[test]
fn resume_the_read_back_keeps_its_place_and_a_changed_slot_is_rewritten() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let url = n.server.url(&delta);
    // A mark written down at every chance, so the fail point after one fires early.
    n.checkpoint_at_every_chance();
    let stop = [("UPDATE_AGENT_FAILPOINT", "after-read-back-mark")];
    let mark = |n: &Node| {
        let st = n.state();
        assert_eq!(st["state"], "staging", "{st}");
        st["read_back"]["offset"]
            .as_u64()
            .unwrap_or_else(|| panic!("{st}"))
    };
    let o = n.agent(&["stage", &url], &stop);
    assert!(
        text(&o).contains("failpoint after-read-back-mark"),
        "{}",
        text(&o)
    );
    let first = mark(&n);
    assert!(first > 0, "{first}");
    let served = n.server.served.load(Ordering::Relaxed);

    let o = n.agent(&["resume"], &stop);
    assert!(
        text(&o).contains("failpoint after-read-back-mark"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains(&format!("reading the slot back from byte {first}")),
        "{}",
        text(&o)
    );
    let second = mark(&n);
    assert!(
        second > first,
        "the read-back went back: {first} -> {second}"
    );
    assert_eq!(
        n.server.served.load(Ordering::Relaxed),
        served,
        "a restart with every operation written fetched bytes (the head?)"
    );

    // Written bytes the read-back has not reached yet change while the agent is down
    // (what it has hashed it does not read again: see docs/security.md).
    assert!(second + 4096 <= n.v2.len() as u64);
    fs::OpenOptions::new()
        .write(true)
        .open(n.disk.part(3))
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[0xa5; 4096], second))
        .expect("scribble slot b");
    let o = n.agent(&["resume"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("did not read back as the checkpoint said"),
        "{}",
        text(&o)
    );
    n.assert_armed_v2();
}
