//! Caps on what callers can hold open in the daemon: WatchUpdate streams, in all and
//! per peer (each stream is a task and a buffered channel).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::ApiError;

#[derive(Debug, Default)]
struct Counts {
    by_peer: HashMap<String, usize>,
    total: usize,
}

/// Open WatchUpdate streams.
#[derive(Debug)]
pub struct Watchers {
    counts: Arc<Mutex<Counts>>,
    total: usize,
    per_peer: usize,
}

/// One open stream's place; gives it back when the stream ends.
#[derive(Debug)]
pub struct WatchSlot {
    peer: String,
    counts: Arc<Mutex<Counts>>,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                c.by_peer.remove(&self.peer);
            }
        }
    }
}

impl Watchers {
    pub fn new(total: usize, per_peer: usize) -> Self {
        Self {
            counts: Arc::default(),
            total,
            per_peer,
        }
    }

    /// A place for one more stream of `peer`, or RESOURCE_EXHAUSTED naming the limit.
    pub fn admit(&self, peer: &str) -> Result<WatchSlot, ApiError> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mine = c.by_peer.get(peer).copied().unwrap_or(0);
        if mine >= self.per_peer {
            return Err(ApiError::TooMany {
                what: "WatchUpdate streams from one peer",
                limit: self.per_peer,
                key: "api.limits.max_watchers_per_peer",
            });
        }
        if c.total >= self.total {
            return Err(ApiError::TooMany {
                what: "WatchUpdate streams",
                limit: self.total,
                key: "api.limits.max_watchers",
            });
        }
        c.total += 1;
        *c.by_peer.entry(peer.to_owned()).or_insert(0) += 1;
        Ok(WatchSlot {
            peer: peer.to_owned(),
            counts: Arc::clone(&self.counts),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_peer_then_in_all_and_given_back() {
        let w = Watchers::new(3, 2);
        let a1 = w.admit("uid 1000").expect("1");
        let _a2 = w.admit("uid 1000").expect("2");
        let e = w.admit("uid 1000").expect_err("per peer");
        assert!(e.to_string().contains("max_watchers_per_peer"), "{e}");
        let _b = w.admit("uid 1001").expect("other peer");
        let e = w.admit("uid 1002").expect_err("in all");
        assert!(e.to_string().contains("api.limits.max_watchers)"), "{e}");
        drop(a1);
        w.admit("uid 1002").expect("a place came free");
    }
}
