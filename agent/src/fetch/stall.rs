//! The minimum-throughput half of the stall guard (the other half, no byte at all for
//! `fetch.stall_timeout_secs`, is the transport's per-read timeout).
//!
//! A server that trickles (a byte every few seconds keeps any inactivity timeout
//! happy) would otherwise hold a staging for as long as it likes: fewer than
//! `min_bytes` in a window of `window` is a stall, and the download is resumed on a
//! fresh connection from the next byte not yet received.

use std::time::{Duration, Instant};

/// Throughput of one response body, judged window by window.
#[derive(Debug, Clone)]
pub(crate) struct Throughput {
    min_bytes: u64,
    window: Duration,
    started: Instant,
    bytes: u64,
}

/// What a window that fell short measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shortfall {
    pub bytes: u64,
    pub elapsed: Duration,
}

impl Throughput {
    /// `min_bytes == 0` turns the rule off.
    pub(crate) fn new(min_bytes: u64, window: Duration, now: Instant) -> Self {
        Self {
            min_bytes,
            window,
            started: now,
            bytes: 0,
        }
    }

    /// Counts `n` bytes that arrived at `now`. Fails when a whole window has passed
    /// with fewer than the minimum; otherwise a full window starts the next one.
    pub(crate) fn record(&mut self, n: u64, now: Instant) -> Result<(), Shortfall> {
        self.bytes += n;
        let elapsed = now.saturating_duration_since(self.started);
        if self.min_bytes == 0 || elapsed < self.window {
            return Ok(());
        }
        if self.bytes < self.min_bytes {
            return Err(Shortfall {
                bytes: self.bytes,
                elapsed,
            });
        }
        self.started = now;
        self.bytes = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn enough_bytes_in_every_window_pass() {
        let t0 = Instant::now();
        let mut t = Throughput::new(100, 10 * S, t0);
        for i in 1..=100u32 {
            // 12 bytes a second: 120 per 10 s window.
            assert_eq!(t.record(12, t0 + i * S), Ok(()), "second {i}");
        }
    }

    #[test]
    fn a_trickle_is_caught_once_its_window_ends() {
        let t0 = Instant::now();
        let mut t = Throughput::new(100, 10 * S, t0);
        for i in 1..10u32 {
            assert_eq!(t.record(5, t0 + i * S), Ok(()));
        }
        assert_eq!(
            t.record(5, t0 + 10 * S),
            Err(Shortfall {
                bytes: 50,
                elapsed: 10 * S
            })
        );
    }

    #[test]
    fn a_fast_window_does_not_excuse_a_slow_one() {
        let t0 = Instant::now();
        let mut t = Throughput::new(100, 10 * S, t0);
        assert_eq!(t.record(10_000, t0 + 10 * S), Ok(()));
        assert_eq!(t.record(99, t0 + 19 * S), Ok(()));
        assert!(t.record(0, t0 + 20 * S).is_err());
    }

    #[test]
    fn zero_minimum_is_off() {
        let t0 = Instant::now();
        let mut t = Throughput::new(0, S, t0);
        assert_eq!(t.record(0, t0 + 1000 * S), Ok(()));
    }
}
