//! History: every attempt's outcome, kept across reboots and agent upgrades.
//!
//! `STATE_DIR/history.json`, a JSON array of the newest `MAX_ENTRIES` records,
//! rewritten crash-safely (temp, fsync, rename, fsync dir) on each new record. Records
//! only ever gain fields (unknown fields are ignored when read), so newer and older
//! agents read each other's history.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::cause::RollbackCause;
use crate::slots::Slot;
use crate::state::StateError;

pub const MAX_ENTRIES: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Committed,
    RolledBack,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub version: String,
    /// The release that ran when the attempt started, when known.
    #[serde(default)]
    pub from_version: Option<String>,
    pub slot: Slot,
    pub outcome: Outcome,
    /// Why, for anything but a commit (the failing check and its output, the error).
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub bytes_fetched: u64,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Set on rollbacks (records written before it existed have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<RollbackCause>,
    /// A commit's boot: kexec or firmware, and its downtime (records written before it
    /// existed, and manual commits, have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<crate::reboot_method::BootRecord>,
}

#[derive(Debug)]
pub struct History {
    path: PathBuf,
}

impl History {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            path: state_dir.join("history.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Oldest first. A missing file is an empty history.
    pub fn load(&self) -> Result<Vec<Entry>, StateError> {
        match fs::read(&self.path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(StateError::Read {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// Records `entry` unless the history already has it (the same outcome, release,
    /// slot and time); whether it was recorded. Earlier builds timed a commit's
    /// entry a moment after its state: up to 2 s later is the same commit.
    pub fn record_once(&self, entry: Entry) -> Result<bool, StateError> {
        let late = if entry.outcome == Outcome::Committed {
            2
        } else {
            0
        };
        // A corrupt history is set aside by `record`; one that cannot be read (I/O,
        // permissions) is an error, not a reason to start a new one.
        let all = match self.load() {
            Ok(all) => all,
            Err(StateError::Corrupt { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let seen = all.iter().any(|e| {
            e.outcome == entry.outcome
                && e.version == entry.version
                && e.slot == entry.slot
                && (entry.at..=entry.at + late).contains(&e.at)
        });
        if seen {
            return Ok(false);
        }
        self.record(entry)?;
        Ok(true)
    }

    pub fn record(&self, entry: Entry) -> Result<(), StateError> {
        // A corrupt history must not block updates: start a new one (the old file is
        // kept beside it for a person to look at).
        let mut all = self.load().unwrap_or_else(|_| {
            let _ = fs::rename(&self.path, self.path.with_extension("json.corrupt"));
            Vec::new()
        });
        all.push(entry);
        let drop = all.len().saturating_sub(MAX_ENTRIES);
        all.drain(..drop);
        let bytes = serde_json::to_vec_pretty(&all).map_err(|e| StateError::Write {
            path: self.path.clone(),
            source: std::io::Error::other(e),
        })?;
        crate::durable::replace(&self.path, &bytes)
            .map_err(|(path, source)| StateError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_once_finds_the_same_end_again() {
        let d = tempfile::tempdir().expect("tempdir");
        let h = History::new(d.path());
        let commit = Entry {
            version: "2.0".into(),
            from_version: Some("1.0".into()),
            slot: Slot::B,
            outcome: Outcome::Committed,
            reason: String::new(),
            bytes_fetched: 7,
            at: 1000,
            cause: None,
            boot: None,
        };
        assert!(h.record_once(commit.clone()).expect("first"));
        assert!(!h.record_once(commit.clone()).expect("again"));
        // An older agent's entry for the same commit, timed a second after the state.
        let older = History::new(&d.path().join("x"));
        fs::create_dir_all(d.path().join("x")).expect("dir");
        older
            .record(Entry {
                at: 1001,
                ..commit.clone()
            })
            .expect("older");
        assert!(!older.record_once(commit.clone()).expect("same commit"));
        // Another end: a rollback of the same release at the same time is recorded.
        let rollback = Entry {
            outcome: Outcome::RolledBack,
            cause: Some(RollbackCause::HealthCheck),
            ..commit.clone()
        };
        assert!(h.record_once(rollback.clone()).expect("rollback"));
        assert!(!h.record_once(rollback).expect("rollback again"));
        // The same release committed on the same slot later is another commit.
        assert!(h.record_once(Entry { at: 5000, ..commit }).expect("later"));
        assert_eq!(h.load().expect("load").len(), 3);
    }

    #[test]
    fn bounded_and_survives_corruption() {
        let d = tempfile::tempdir().expect("tempdir");
        let h = History::new(d.path());
        assert!(h.load().expect("empty").is_empty());
        for i in 0..MAX_ENTRIES + 5 {
            h.record(Entry {
                version: format!("1.{i}"),
                from_version: None,
                slot: Slot::B,
                outcome: Outcome::Committed,
                reason: String::new(),
                bytes_fetched: 0,
                at: i as u64,
                cause: None,
                boot: None,
            })
            .expect("record");
        }
        let all = h.load().expect("load");
        assert_eq!(all.len(), MAX_ENTRIES);
        assert_eq!(all[0].version, "1.5");
        fs::write(d.path().join("history.json"), b"[{garbage").expect("write");
        h.record(Entry {
            version: "9".into(),
            from_version: Some("8".into()),
            slot: Slot::A,
            outcome: Outcome::RolledBack,
            reason: "unit x failed".into(),
            bytes_fetched: 1,
            at: 1,
            cause: Some(RollbackCause::HealthCheck),
            boot: None,
        })
        .expect("record after corruption");
        assert_eq!(h.load().expect("load").len(), 1);
        assert!(d.path().join("history.json.corrupt").exists());
    }
}
