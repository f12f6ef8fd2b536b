//! Status and history as the API shows them, built from what the daemon read
//! (`crate::daemon::status`): the state, the bootloader, history and the running
//! operation.

use super::{convert, pb};
use crate::boot::BootStatus;
use crate::history::{Entry, Outcome};
use crate::slots::{Slot, SlotLayout};
use crate::state::State;

pub use super::convert::ts;

pub fn now() -> prost_types::Timestamp {
    convert::at(crate::timefmt::now_system())
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
        boot: e.boot.as_ref().map(super::convert::boot_record),
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
    /// What the node trusts.
    pub trust: pb::Trust,
}

/// The status message for what the daemon read.
pub fn from_daemon(
    compatible: &str,
    layout: &SlotLayout,
    s: crate::daemon::status::Status,
) -> pb::Status {
    build(&Inputs {
        compatible,
        layout,
        backend: s.backend,
        state: s.state,
        boot: s.boot,
        last: s.last,
        running_version: s.running_version,
        operation: s.operation.as_ref().map(convert::operation),
        images: s.images,
        auto: s.auto.map(convert::auto),
        trust: trust(s.root, crate::timefmt::now()),
    })
}

/// The trust as the API shows it at `now` (seconds since the epoch).
pub fn trust(root: Option<crate::trust::node::RootFacts>, now: u64) -> pb::Trust {
    match root {
        None => pb::Trust::default(),
        Some(r) => pb::Trust {
            root_version: r.version,
            root_expires: Some(ts(r.expires)),
            // Whole days, rounded towards the past: "0 days" is the last day.
            root_days_left: i64::try_from(
                (i128::from(r.expires) - i128::from(now)).div_euclid(86_400),
            )
            .unwrap_or(i64::MIN),
        },
    }
}

/// Builds the status. Pure: the golden tests call it with fixed inputs.
pub fn build(i: &Inputs<'_>) -> pb::Status {
    let running = i.running_version.clone().unwrap_or_default();
    let (booted_slot, other_slot) = slots(i, &running);
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
        operation: operation(i),
        last_result: last_result(i),
        running_version: running,
        auto: i.auto.clone(),
        trust: Some(i.trust),
    }
}

/// The booted slot (running `running`) and the other one: each one's state and
/// release, as the agent's state and the bootloader say.
fn slots(i: &Inputs<'_>, running: &str) -> (pb::Slot, pb::Slot) {
    let booted = i.layout.booted;
    let other = booted.other();
    let mut booted_slot = slot(i.layout, booted, &i.boot);
    booted_slot.version = running.to_owned();
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
    booted_slot.verity = i.layout.root_verity();
    for (s, ps) in [(booted, &mut booted_slot), (other, &mut other_slot)] {
        // The tree the agent built for the release the slot holds now.
        if let Some(img) = i.images[s.index()]
            .as_ref()
            .filter(|img| ps.version.is_empty() || img.version == ps.version)
        {
            ps.verity_root_hash = img
                .verity
                .as_ref()
                .map(|v| v.root_hash.clone())
                .unwrap_or_default();
        }
    }
    if other_slot.version.is_empty() && other_state != pb::SlotState::Empty {
        // What the agent itself wrote there (e.g. the release an operator rolled back from).
        if let Some(img) = &i.images[other.index()] {
            other_slot.version.clone_from(&img.version);
        }
    }

    (booted_slot, other_slot)
}

/// The operation in flight: this process's (an armed one only while the state still
/// says so), else one the state keeps across processes.
fn operation(i: &Inputs<'_>) -> Option<pb::Operation> {
    i.operation
        .clone()
        .filter(|o| {
            o.phase != pb::Phase::Armed as i32
                || matches!(&i.state, State::Armed { staged, .. } if staged.attempt == o.id)
        })
        .or_else(|| persisted_operation(&i.state))
}

/// How the last attempt ended: a rollback in progress, else history's newest entry.
fn last_result(i: &Inputs<'_>) -> Option<pb::Result> {
    match &i.state {
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
            boot: None,
        }),
        _ => i.last.as_ref().map(|e| pb::Result {
            outcome: outcome(&e.outcome) as i32,
            version: e.version.clone(),
            from_version: e.from_version.clone().unwrap_or_default(),
            reason: e.reason.clone(),
            at: Some(ts(e.at)),
            bytes_fetched: e.bytes_fetched,
            boot: e.boot.as_ref().map(super::convert::boot_record),
        }),
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
        verity_root_hash: String::new(),
        verity: false,
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
