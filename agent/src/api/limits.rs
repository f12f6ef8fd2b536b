//! Caps on what callers can hold open in the daemon: places counted per key (a uid, a
//! certificate identity) and in all, each given back when its holder ends. Used for
//! Unix socket connections (listen.rs) and WatchUpdate streams (each a task and a
//! buffered channel).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use super::error::ApiError;

#[derive(Debug)]
struct Counts<K> {
    by_key: HashMap<K, usize>,
    total: usize,
}

/// Places per key and in all.
#[derive(Debug)]
pub struct Places<K> {
    counts: Arc<Mutex<Counts<K>>>,
    total: usize,
    per_key: usize,
}

/// One held place; given back when dropped.
#[derive(Debug)]
pub struct Place<K: Hash + Eq> {
    key: K,
    counts: Arc<Mutex<Counts<K>>>,
}

impl<K: Hash + Eq> Drop for Place<K> {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_key.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.by_key.remove(&self.key);
            }
        }
    }
}

/// Which cap a refused place hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    PerKey,
    Total,
}

impl<K: Hash + Eq + Clone> Places<K> {
    pub fn new(total: usize, per_key: usize) -> Self {
        Self {
            counts: Arc::new(Mutex::new(Counts {
                by_key: HashMap::new(),
                total: 0,
            })),
            total,
            per_key,
        }
    }

    /// A place for one more holder under `key`, unless a cap is reached.
    pub fn admit(&self, key: &K) -> Result<Place<K>, Full> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if c.by_key.get(key).copied().unwrap_or(0) >= self.per_key {
            return Err(Full::PerKey);
        }
        if c.total >= self.total {
            return Err(Full::Total);
        }
        c.total += 1;
        *c.by_key.entry(key.clone()).or_insert(0) += 1;
        Ok(Place {
            key: key.clone(),
            counts: Arc::clone(&self.counts),
        })
    }
}

/// Open WatchUpdate streams, per peer (`Caller::peer_key`) and in all.
#[derive(Debug)]
pub struct Watchers(Places<String>);

impl Watchers {
    pub fn new(total: usize, per_peer: usize) -> Self {
        Self(Places::new(total, per_peer))
    }

    /// A place for one more stream of `peer`, or RESOURCE_EXHAUSTED naming the limit.
    pub fn admit(&self, peer: &str) -> Result<Place<String>, ApiError> {
        self.0.admit(&peer.to_owned()).map_err(|full| match full {
            Full::PerKey => ApiError::TooMany {
                what: "WatchUpdate streams from one peer",
                limit: self.0.per_key,
                key: "api.limits.max_watchers_per_peer",
            },
            Full::Total => ApiError::TooMany {
                what: "WatchUpdate streams",
                limit: self.0.total,
                key: "api.limits.max_watchers",
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_then_in_all_and_given_back() {
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
