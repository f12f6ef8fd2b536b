//! Rollout waves: a release reaches a fleet gradually. The channel document lists the
//! schedule as points `(after_secs, percent)`: by `published + after_secs`, `percent`
//! of the fleet may have started. Between points the share grows linearly, so nodes
//! start evenly spread across each wave rather than all at its first second.
//!
//! Each node has a fixed place in the fleet, `position` in [0, 100), derived from
//! `/etc/machine-id`. It is stable across releases and reboots: the same nodes go
//! first every time, which is what makes the first wave a canary.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One point of a channel's wave schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    /// Seconds after the release's publication.
    pub after_secs: u64,
    /// Share of the fleet (0 < percent <= 100, cumulative) allowed to start by then.
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WaveError {
    #[error("wave {index}: percent {percent} is not in (0, 100]")]
    Percent { index: usize, percent: f64 },
    #[error("wave {index}: after_secs and percent must both grow from one wave to the next")]
    NotIncreasing { index: usize },
    #[error("the last wave must reach 100 percent (it reaches {percent}), or some nodes would never update")]
    Incomplete { percent: f64 },
}

/// Checks a schedule (publishing refuses a bad one; nodes refuse it too).
pub fn validate(waves: &[Wave]) -> Result<(), WaveError> {
    for (index, w) in waves.iter().enumerate() {
        if !(w.percent > 0.0 && w.percent <= 100.0) {
            return Err(WaveError::Percent {
                index,
                percent: w.percent,
            });
        }
        if let Some(prev) = index.checked_sub(1).and_then(|i| waves.get(i)) {
            if w.after_secs <= prev.after_secs || w.percent <= prev.percent {
                return Err(WaveError::NotIncreasing { index });
            }
        }
    }
    match waves.last() {
        Some(last) if last.percent < 100.0 => Err(WaveError::Incomplete {
            percent: last.percent,
        }),
        _ => Ok(()),
    }
}

/// This node's place in the fleet, in [0, 100): a hash of the machine id in a domain
/// of its own (the machine id itself is never sent anywhere).
pub fn position(machine_id: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(b"update-agent rollout position\0");
    h.update(machine_id.trim().as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    // 53 bits are exactly representable in an f64.
    (u64::from_be_bytes(first) >> 11) as f64 / (1u64 << 53) as f64 * 100.0
}

/// Seconds after publication at which a node at `position` may start. No waves: at
/// once.
pub fn start_offset(waves: &[Wave], position: f64) -> u64 {
    let mut prev: Option<&Wave> = None;
    for w in waves {
        if position < w.percent {
            return match prev {
                None => w.after_secs,
                Some(p) => {
                    let frac = (position - p.percent) / (w.percent - p.percent);
                    let span = (w.after_secs - p.after_secs) as f64;
                    p.after_secs + (frac * span) as u64
                }
            };
        }
        prev = Some(w);
    }
    // Only reachable with an incomplete schedule: the last point is the latest start.
    prev.map_or(0, |w| w.after_secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(after_secs: u64, percent: f64) -> Wave {
        Wave {
            after_secs,
            percent,
        }
    }

    #[test]
    fn offsets_follow_the_schedule() {
        let s = [w(0, 1.0), w(3600, 10.0), w(86_400, 100.0)];
        validate(&s).expect("valid");
        assert_eq!(start_offset(&s, 0.5), 0);
        assert_eq!(start_offset(&s, 1.0), 0);
        assert_eq!(start_offset(&s, 5.5), 1800);
        assert_eq!(start_offset(&s, 10.0), 3600);
        assert_eq!(start_offset(&s, 55.0), 3600 + (86_400 - 3600) / 2);
        assert_eq!(start_offset(&s, 99.999_999), 86_399);
        assert_eq!(start_offset(&[], 73.0), 0);
        // A first wave that starts later holds everyone below it until then.
        assert_eq!(start_offset(&[w(600, 100.0)], 3.0), 600);
    }

    #[test]
    fn bad_schedules_are_named() {
        assert_eq!(
            validate(&[w(0, 0.0)]),
            Err(WaveError::Percent {
                index: 0,
                percent: 0.0
            })
        );
        assert_eq!(
            validate(&[w(0, 5.0), w(0, 100.0)]),
            Err(WaveError::NotIncreasing { index: 1 })
        );
        assert_eq!(
            validate(&[w(0, 50.0), w(10, 40.0)]),
            Err(WaveError::NotIncreasing { index: 1 })
        );
        assert_eq!(
            validate(&[w(0, 5.0), w(10, 50.0)]),
            Err(WaveError::Incomplete { percent: 50.0 })
        );
        assert!(validate(&[w(0, f64::NAN)]).is_err());
        assert!(validate(&[]).is_ok());
    }

    #[test]
    fn positions_are_stable_and_spread() {
        let p = position("0123456789abcdef0123456789abcdef\n");
        assert_eq!(p, position("0123456789abcdef0123456789abcdef"));
        assert!((0.0..100.0).contains(&p));
        // 4,000 machine ids: every tenth of the fleet gets roughly its share.
        let mut buckets = [0u32; 10];
        for i in 0..4000 {
            let p = position(&format!("{i:032x}"));
            buckets[(p / 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|&n| (320..480).contains(&n)),
            "{buckets:?}"
        );
    }
}
