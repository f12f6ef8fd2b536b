//! Status and history as the API shows them, built from what the agent persists
//! (`state.json`, `history.json`), the bootloader's state and the running operation.
//! Reading never takes the update lock, so status answers while an update runs.

use std::sync::Mutex;

use super::pb;
use crate::boot::{BootControl, BootStatus};
use crate::config::Config;
use crate::history::{Entry, History, Outcome};
use crate::slots::{Slot, SlotLayout};
use crate::state::{State, StateStore};
use crate::update::UpdateError;

/// Seconds since the epoch as a protobuf timestamp.
pub fn ts(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

pub fn now() -> prost_types::Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub fn outcome(o: &Outcome) -> pb::Outcome {
    match o {
        Outcome::Committed => pb::Outcome::Committed,
        Outcome::RolledBack => pb::Outcome::RolledBack,
        Outcome::Failed => pb::Outcome::Failed,
        Outcome::Cancelled => pb::Outcome::Cancelled,
    }
}

pub fn history_entry(e: &Entry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        version: e.version.clone(),
        from_version: e.from_version.clone().unwrap_or_default(),
        slot: e.slot.letter().to_owned(),
        outcome: outcome(&e.outcome) as i32,
        reason: e.reason.clone(),
        bytes_fetched: e.bytes_fetched,
        at: Some(ts(e.at)),
    }
}

/// Everything a status is made of, gathered once.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub compatible: &'a str,
    pub layout: &'a SlotLayout,
    pub backend: &'a str,
    pub state: State,
    pub boot: BootStatus,
    pub last: Option<Entry>,
    pub running_version: Option<String>,
    /// The operation the daemon runs now, if any.
    pub operation: Option<pb::Operation>,
    /// What the agent wrote and verified into each slot (`[a, b]`), when it did.
    pub images: [Option<crate::state::SlotImage>; 2],
    /// Unattended patching, when configured.
    pub auto: Option<pb::Auto>,
}

/// Builds the status. Pure: the golden tests call it with fixed inputs.
pub fn build(i: &Inputs<'_>) -> pb::Status {
    let booted = i.layout.booted;
    let other = booted.other();
    let running = i.running_version.clone().unwrap_or_default();
    let mut booted_slot = slot(i.layout, booted, &i.boot);
    booted_slot.version = running.clone();
    booted_slot.state = pb::SlotState::KnownGood as i32;
    let mut other_slot = slot(i.layout, other, &i.boot);
    let (other_state, other_version) = match &i.state {
        State::Staging(s) if s.slot == other => (pb::SlotState::Staging, s.version.clone()),
        State::Staged(s) if s.slot == other => (pb::SlotState::Staged, s.version.clone()),
        State::Armed { staged, .. } if staged.slot == other => {
            (pb::SlotState::Armed, staged.version.clone())
        }
        State::Armed { staged, .. } => {
            // Booted into the trial, not yet committed: the other slot is the fallback.
            booted_slot.state = pb::SlotState::Trial as i32;
            let prev = staged.from_version.clone().unwrap_or_default();
            (pb::SlotState::KnownGood, prev)
        }
        State::Committed {
            previous: Some((s, v)),
            ..
        } if *s == other && i.boot.is_bootable(other) => (pb::SlotState::KnownGood, v.clone()),
        State::RollingBack {
            version, from, to, ..
        } if *from == booted => {
            // The running release is being abandoned; the other slot is where we go.
            booted_slot.state = pb::SlotState::KnownBad as i32;
            let _ = (version, to);
            (pb::SlotState::KnownGood, String::new())
        }
        State::RolledBack { version, .. } if !i.boot.is_bootable(other) => {
            (pb::SlotState::KnownBad, version.clone())
        }
        _ if i.boot.is_bootable(other) => (pb::SlotState::KnownGood, String::new()),
        _ => (pb::SlotState::Empty, String::new()),
    };
    other_slot.state = other_state as i32;
    other_slot.version = other_version;
    if other_slot.version.is_empty() && other_state != pb::SlotState::Empty {
        // What the agent itself wrote there (e.g. the release an operator rolled back from).
        if let Some(img) = &i.images[other.index()] {
            other_slot.version.clone_from(&img.version);
        }
    }

    // An armed operation of this process counts only while the state still says so.
    let operation = i
        .operation
        .clone()
        .filter(|o| {
            o.phase != pb::Phase::Armed as i32
                || matches!(&i.state, State::Armed { staged, .. } if staged.attempt == o.id)
        })
        .or_else(|| persisted_operation(&i.state));
    let last_result = match &i.state {
        State::RollingBack {
            version,
            reason,
            at,
            ..
        } => Some(pb::Result {
            outcome: pb::Outcome::RollingBack as i32,
            version: version.clone(),
            from_version: String::new(),
            reason: reason.clone(),
            at: Some(ts(*at)),
            bytes_fetched: 0,
        }),
        _ => i.last.as_ref().map(|e| pb::Result {
            outcome: outcome(&e.outcome) as i32,
            version: e.version.clone(),
            from_version: e.from_version.clone().unwrap_or_default(),
            reason: e.reason.clone(),
            at: Some(ts(e.at)),
            bytes_fetched: e.bytes_fetched,
        }),
    };
    pb::Status {
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        compatible: i.compatible.to_owned(),
        booted: Some(booted_slot),
        other: Some(other_slot),
        bootloader: Some(pb::Bootloader {
            backend: i.backend.to_owned(),
            default_slot: i.boot.default.letter().to_owned(),
            trial_slot: i
                .boot
                .trial
                .map(|(s, _)| s.letter().to_owned())
                .unwrap_or_default(),
            tries_left: i.boot.trial.map(|(_, n)| u32::from(n)).unwrap_or(0),
            raw: i.boot.raw.clone(),
        }),
        state: i.state.name().replace(' ', "_"),
        operation,
        last_result,
        running_version: running,
        auto: i.auto.clone(),
    }
}

fn slot(layout: &SlotLayout, s: Slot, boot: &BootStatus) -> pb::Slot {
    let p = layout.partition(s);
    pb::Slot {
        name: s.letter().to_owned(),
        device: p.device.display().to_string(),
        partlabel: p.label.clone(),
        size_bytes: p.size,
        state: pb::SlotState::Unspecified as i32,
        version: String::new(),
        bootable: boot.is_bootable(s),
    }
}

/// An operation that outlives the process: an interrupted staging (resumable) or an
/// armed release waiting for its reboot.
fn persisted_operation(state: &State) -> Option<pb::Operation> {
    match state {
        State::Staging(s) => Some(pb::Operation {
            id: s.attempt.clone(),
            phase: pb::Phase::Writing as i32,
            version: s.version.clone(),
            source: s.url.clone(),
            delta: false,
            reboot: pb::RebootPolicy::Never as i32,
            bytes_done: s.bytes_done,
            bytes_total: s.bytes_total,
            bytes_fetched: s.bytes_fetched,
            ops_done: u32::try_from(s.ops_done).unwrap_or(u32::MAX),
            ops_total: u32::try_from(s.ops_total).unwrap_or(u32::MAX),
            started: Some(ts(s.started)),
        }),
        State::Staged(s) | State::Armed { staged: s, .. } => Some(pb::Operation {
            id: s.attempt.clone(),
            phase: if matches!(state, State::Armed { .. }) {
                pb::Phase::Armed
            } else {
                pb::Phase::Verifying
            } as i32,
            version: s.version.clone(),
            bytes_fetched: s.bytes_fetched,
            reboot: pb::RebootPolicy::Never as i32,
            ..Default::default()
        }),
        _ => None,
    }
}

/// Reads status without the update lock.
pub struct Reader {
    cfg: Config,
    layout: SlotLayout,
    store: StateStore,
    history: History,
    boot: Mutex<Box<dyn BootControl>>,
    /// The newest history record, kept while `history.json` is the same file: the
    /// whole history (up to 200 records) need not be parsed for every status call.
    last: Mutex<Option<(FileKey, Option<Entry>)>>,
}

/// Identifies one version of a file: it is replaced by rename, so a new inode, size
/// or mtime means new content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileKey {
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

fn file_key(path: &std::path::Path) -> Option<FileKey> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(FileKey {
        ino: m.ino(),
        size: m.size(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    })
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Reader {
    pub fn new(cfg: Config, layout: SlotLayout) -> Result<Self, UpdateError> {
        Ok(Self {
            boot: Mutex::new(crate::update::open_boot(&cfg)?),
            store: StateStore::new(&cfg.state_dir),
            history: History::new(&cfg.state_dir),
            last: Mutex::new(None),
            cfg,
            layout,
        })
    }

    pub fn layout(&self) -> &SlotLayout {
        &self.layout
    }

    pub fn state(&self) -> Result<State, UpdateError> {
        Ok(self.store.load()?)
    }

    pub fn history(&self) -> Result<Vec<Entry>, UpdateError> {
        Ok(self.history.load()?)
    }

    fn last_entry(&self) -> Result<Option<Entry>, UpdateError> {
        let key = file_key(self.history.path());
        let mut cache = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(k), Some((cached, entry))) = (key, cache.as_ref()) {
            if k == *cached {
                return Ok(entry.clone());
            }
        }
        let entry = self.history.load()?.pop();
        *cache = key.map(|k| (k, entry.clone()));
        Ok(entry)
    }

    pub fn status(
        &self,
        operation: Option<pb::Operation>,
        auto: Option<pb::Auto>,
    ) -> Result<pb::Status, UpdateError> {
        let state = self.store.load()?;
        let (boot, backend) = {
            let b = self.boot.lock().unwrap_or_else(|p| p.into_inner());
            (b.status()?, b.name())
        };
        let last = self.last_entry()?;
        Ok(build(&Inputs {
            compatible: &self.cfg.compatible,
            layout: &self.layout,
            backend,
            state,
            boot,
            last,
            running_version: crate::update::running_version(&self.cfg.os_release),
            operation,
            images: self.store.images(),
            auto,
        }))
    }
}
