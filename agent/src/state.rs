//! The agent's persistent state machine.
//!
//! One JSON document in the state directory (`state.json`), replaced crash-safely:
//! write a temporary file, fsync it, rename it over the old one, fsync the directory.
//! A power cut leaves the old document or the new one, never a mix. JSON rather than
//! an embedded database: the document is small, written a few times a second at most,
//! and an operator can read it with `cat` when everything else is broken.
//!
//! Every change is a named transition that checks the current state and returns
//! [`StateError::Illegal`] for a move that is not allowed; nothing asserts.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cause::RollbackCause;
use crate::slots::Slot;

/// Schema of `state.json`; bumped only with a migration.
pub const SCHEMA: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot {event} while {state}")]
    Illegal {
        event: &'static str,
        state: &'static str,
    },
    #[error("reading state {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state {path} has schema {found}; this agent reads schema {SCHEMA}")]
    Schema { path: PathBuf, found: u32 },
    #[error("writing state {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another update-agent holds {path}")]
    Locked {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An update being written into the inactive slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    /// Identifies this attempt in logs and history.
    pub attempt: String,
    pub version: String,
    pub url: String,
    /// sha256 of the manifest bytes: a resumed attempt must be the same payload.
    pub manifest_sha256: String,
    pub slot: Slot,
    pub ops_total: usize,
    /// Operations `0..ops_done` are written, verified and durable.
    pub ops_done: usize,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub bytes_fetched: u64,
    pub started: u64,
    /// The release running when the attempt started, when known.
    #[serde(default)]
    pub from_version: Option<String>,
    /// How far the read-back of the written slot got (only once every operation is
    /// written), so a restart continues it instead of hashing the slot from byte zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_back: Option<ReadBack>,
}

/// Where the read-back of a written slot stands: the sha256 of its first `offset`
/// bytes, as the state words of an unfinished hash (see [`crate::midstate::Mark`]);
/// for a release with a dm-verity tree, whose root proves the bytes, `offset` alone
/// (`sha256_state` empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadBack {
    pub offset: u64,
    pub sha256_state: String,
}

/// A release fully written and verified in `slot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub attempt: String,
    pub version: String,
    pub slot: Slot,
    pub target_sha256: String,
    pub bytes_fetched: u64,
    #[serde(default)]
    pub from_version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Idle,
    Staging(Staging),
    Staged(Staged),
    /// The bootloader will try `slot` on the next boot.
    Armed {
        staged: Staged,
        tries: u8,
    },
    /// The last attempt failed; `reason` is the full error chain for people.
    Failed {
        attempt: String,
        version: String,
        reason: String,
        at: u64,
    },
    Cancelled {
        attempt: String,
        version: String,
        at: u64,
    },
    /// The trial slot passed its health checks and is the default now. `previous` is
    /// the slot that ran before, a known-good release until something overwrites it.
    Committed {
        version: String,
        slot: Slot,
        previous: Option<(Slot, String)>,
        at: u64,
        /// What the attempt downloaded, for its history entry (see `postboot`).
        #[serde(default)]
        bytes_fetched: u64,
        /// How the trial booted and its downtime, once the gate recorded it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot: Option<crate::reboot_method::BootRecord>,
    },
    /// The old slot is the default again; the node still runs `from` and must reboot.
    RollingBack {
        version: String,
        from: Slot,
        to: Slot,
        reason: String,
        /// An operator asked for it (the release itself was fine).
        #[serde(default)]
        manual: bool,
        at: u64,
    },
    /// Back on `slot` after `version` was rolled back.
    RolledBack {
        version: String,
        slot: Slot,
        reason: String,
        at: u64,
        /// Why, for its history entry (states written before it existed have none).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cause: Option<RollbackCause>,
    },
}

impl State {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Staging(_) => "staging",
            Self::Staged(_) => "staged",
            Self::Armed { .. } => "armed",
            Self::Failed { .. } => "failed",
            Self::Cancelled { .. } => "cancelled",
            Self::Committed { .. } => "committed",
            Self::RollingBack { .. } => "rolling back",
            Self::RolledBack { .. } => "rolled back",
        }
    }

    fn illegal(&self, event: &'static str) -> StateError {
        StateError::Illegal {
            event,
            state: self.name(),
        }
    }

    /// Whether a new update may start from here.
    fn can_begin(&self) -> bool {
        matches!(
            self,
            Self::Idle
                | Self::Failed { .. }
                | Self::Cancelled { .. }
                | Self::Staged(_)
                | Self::Armed { .. }
                | Self::Committed { .. }
                | Self::RolledBack { .. }
        )
    }

    /// Starts writing a release. From `Staged` or `Armed` this replaces the staged
    /// release (the caller has made the slot unbootable first).
    pub fn begin(&mut self, s: Staging) -> Result<(), StateError> {
        if !self.can_begin() {
            return Err(self.illegal("start an update"));
        }
        *self = Self::Staging(s);
        Ok(())
    }

    /// Records operations `..ops_done` as durable.
    pub fn progress(
        &mut self,
        ops_done: usize,
        bytes_done: u64,
        bytes_fetched: u64,
    ) -> Result<(), StateError> {
        match self {
            Self::Staging(s) if ops_done <= s.ops_total => {
                if ops_done < s.ops_total {
                    s.read_back = None;
                }
                s.ops_done = ops_done;
                s.bytes_done = bytes_done;
                s.bytes_fetched = bytes_fetched;
                Ok(())
            }
            _ => Err(self.illegal("record progress")),
        }
    }

    /// Records how far the read-back of a fully written slot got.
    pub fn read_back(&mut self, mark: ReadBack) -> Result<(), StateError> {
        match self {
            Self::Staging(s) if s.ops_done == s.ops_total && mark.offset <= s.bytes_total => {
                s.read_back = Some(mark);
                Ok(())
            }
            _ => Err(self.illegal("record read-back progress")),
        }
    }

    /// Rewinds a resumed attempt to the first operation whose bytes no longer verify
    /// (`bytes_done`: the output bytes of the operations before it). Any read-back
    /// progress goes with it.
    pub fn rewind(&mut self, ops_done: usize, bytes_done: u64) -> Result<(), StateError> {
        match self {
            Self::Staging(s) if ops_done <= s.ops_done => {
                s.ops_done = ops_done;
                s.bytes_done = bytes_done.min(s.bytes_done);
                s.read_back = None;
                Ok(())
            }
            _ => Err(self.illegal("rewind progress")),
        }
    }

    pub fn staged(&mut self, target_sha256: String) -> Result<(), StateError> {
        match self {
            Self::Staging(s) if s.ops_done == s.ops_total => {
                *self = Self::Staged(Staged {
                    attempt: s.attempt.clone(),
                    version: s.version.clone(),
                    slot: s.slot,
                    target_sha256,
                    bytes_fetched: s.bytes_fetched,
                    from_version: s.from_version.clone(),
                });
                Ok(())
            }
            _ => Err(self.illegal("mark staged")),
        }
    }

    pub fn armed(&mut self, tries: u8) -> Result<(), StateError> {
        match self {
            Self::Staged(s) => {
                *self = Self::Armed {
                    staged: s.clone(),
                    tries,
                };
                Ok(())
            }
            _ => Err(self.illegal("arm the bootloader")),
        }
    }

    pub fn fail(&mut self, reason: String, at: u64) -> Result<(), StateError> {
        let (attempt, version) = match self {
            Self::Staging(s) => (s.attempt.clone(), s.version.clone()),
            Self::Staged(s) => (s.attempt.clone(), s.version.clone()),
            _ => return Err(self.illegal("record a failure")),
        };
        *self = Self::Failed {
            attempt,
            version,
            reason,
            at,
        };
        Ok(())
    }

    /// The armed release booted and passed its checks (or an operator said so).
    pub fn commit(&mut self, previous: Option<(Slot, String)>, at: u64) -> Result<(), StateError> {
        match self {
            Self::Armed { staged, .. } => {
                *self = Self::Committed {
                    version: staged.version.clone(),
                    slot: staged.slot,
                    previous,
                    at,
                    bytes_fetched: staged.bytes_fetched,
                    boot: None,
                };
                Ok(())
            }
            _ => Err(self.illegal("commit")),
        }
    }

    /// Records how the committed release booted (the gate's commit, not a manual one).
    pub fn booted_by(
        &mut self,
        record: crate::reboot_method::BootRecord,
    ) -> Result<(), StateError> {
        match self {
            Self::Committed { boot, .. } => {
                *boot = Some(record);
                Ok(())
            }
            _ => Err(self.illegal("record the boot")),
        }
    }

    /// Starts going back to `to`: from a failed trial (Armed) or, by an operator's
    /// wish, from a committed release (Committed).
    pub fn rolling_back(&mut self, to: Slot, reason: String, at: u64) -> Result<(), StateError> {
        let (version, from, manual) = match self {
            Self::Armed { staged, .. } => (staged.version.clone(), staged.slot, false),
            Self::Committed { version, slot, .. } => (version.clone(), *slot, true),
            _ => return Err(self.illegal("roll back")),
        };
        if from == to {
            return Err(self.illegal("roll back to the slot it runs"));
        }
        *self = Self::RollingBack {
            version,
            from,
            to,
            reason,
            manual,
            at,
        };
        Ok(())
    }

    /// Running on the old slot again: after RollingBack and its reboot, or straight
    /// from Armed (or Committed, once the committed slot stopped booting) when the
    /// bootloader fell back by itself.
    pub fn rolled_back(
        &mut self,
        slot: Slot,
        reason: Option<String>,
        cause: RollbackCause,
        at: u64,
    ) -> Result<(), StateError> {
        let (version, reason) = match self {
            Self::RollingBack {
                version, reason: r, ..
            } => (version.clone(), reason.unwrap_or_else(|| r.clone())),
            Self::Armed { staged, .. } => (
                staged.version.clone(),
                reason.unwrap_or_else(|| "the new slot did not boot".into()),
            ),
            Self::Committed {
                version, slot: s, ..
            } if *s != slot => (
                version.clone(),
                reason.unwrap_or_else(|| "the committed slot stopped booting".into()),
            ),
            _ => return Err(self.illegal("record a rollback")),
        };
        *self = Self::RolledBack {
            version,
            slot,
            reason,
            at,
            cause: Some(cause),
        };
        Ok(())
    }

    pub fn cancel(&mut self, at: u64) -> Result<(), StateError> {
        let (attempt, version) = match self {
            Self::Staging(s) => (s.attempt.clone(), s.version.clone()),
            Self::Staged(s) | Self::Armed { staged: s, .. } => {
                (s.attempt.clone(), s.version.clone())
            }
            _ => return Err(self.illegal("cancel")),
        };
        *self = Self::Cancelled {
            attempt,
            version,
            at,
        };
        Ok(())
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Document {
    schema: u32,
    #[serde(flatten)]
    state: State,
}

/// The state directory: `state.json` and the lock that makes one update at a time.
#[derive(Debug)]
pub struct StateStore {
    dir: PathBuf,
}

/// A verified release image in a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImage {
    pub version: String,
    pub sha256: String,
    /// The dm-verity tree built after the image, when the release has one: what its
    /// boot entry hands the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verity: Option<SlotVerity>,
}

/// A verified dm-verity tree in a slot (root hash checked against the signed one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotVerity {
    /// Hex.
    pub root_hash: String,
    pub hash_offset: u64,
}

/// `images.json`: fields are only ever added.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Images {
    #[serde(default)]
    a: Option<SlotImage>,
    #[serde(default)]
    b: Option<SlotImage>,
}

/// Held for as long as a process may change the slots or the state. Dropping it
/// releases the lock (the kernel also releases it if the process dies).
#[derive(Debug)]
pub struct UpdateLock {
    _flock: nix::fcntl::Flock<File>,
}

impl StateStore {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn images_path(&self) -> PathBuf {
        self.dir.join("images.json")
    }

    /// What each slot holds, as far as the agent wrote and verified it: the release
    /// and the sha256 of its image (which deltas fit the slot once it runs). A missing
    /// or unreadable file is an empty record: the agent then asks for full payloads.
    pub fn images(&self) -> [Option<SlotImage>; 2] {
        std::fs::read(self.images_path())
            .ok()
            .and_then(|b| serde_json::from_slice::<Images>(&b).ok())
            .map(|i| [i.a, i.b])
            .unwrap_or_default()
    }

    /// Records (or with `None` forgets) the image in `slot`. Needs the lock.
    pub fn set_image(
        &self,
        _lock: &UpdateLock,
        slot: Slot,
        image: Option<SlotImage>,
    ) -> Result<(), StateError> {
        let mut all = self.images();
        all[slot.index()] = image;
        let [a, b] = all;
        let bytes = serde_json::to_vec_pretty(&Images { a, b }).map_err(|e| StateError::Write {
            path: self.images_path(),
            source: std::io::Error::other(e),
        })?;
        crate::durable::replace(&self.images_path(), &bytes)
            .map_err(|(path, source)| StateError::Write { path, source })
    }

    /// Takes the update lock without waiting.
    pub fn lock(&self) -> Result<UpdateLock, StateError> {
        let path = self.dir.join("lock");
        let werr = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&self.dir).map_err(werr)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(werr)?;
        let flock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| StateError::Locked {
                path: path.clone(),
                source: errno.into(),
            })?;
        Ok(UpdateLock { _flock: flock })
    }

    /// Current state; `Idle` when none was ever written.
    pub fn load(&self) -> Result<State, StateError> {
        let path = self.path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::Idle),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        let doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: path.clone(),
                source,
            })?;
        let schema = doc
            .get("schema")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0) as u32;
        if schema != SCHEMA {
            return Err(StateError::Schema {
                path,
                found: schema,
            });
        }
        let doc: Document =
            serde_json::from_value(doc).map_err(|source| StateError::Corrupt { path, source })?;
        Ok(doc.state)
    }

    /// Replaces the state durably. Needs the lock, so only its holder writes.
    pub fn save(&self, _lock: &UpdateLock, state: &State) -> Result<(), StateError> {
        let path = self.path();
        let doc = Document {
            schema: SCHEMA,
            state: state.clone(),
        };
        let mut bytes = serde_json::to_vec_pretty(&doc).map_err(|e| StateError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        bytes.push(b'\n');
        crate::durable::replace(&path, &bytes)
            .map_err(|(path, source)| StateError::Write { path, source })
    }
}

#[cfg(test)]
mod tests;
