//! The daemon's domain types as protobuf messages, and back.

use std::time::SystemTime;

use super::pb;
use crate::daemon::auto::{AutoStatus, Lock};
use crate::daemon::Source;
use crate::daemon::{OpEvent, OpEventKind, OpOutcome, OpProgress, OpResult, Operation, Phase};
use crate::policy::RebootStrategy;
use crate::reboot_method::{BootRecord, RebootMethod};

/// Seconds since the epoch as a protobuf timestamp.
pub fn ts(secs: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(secs).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

/// A point in time as a protobuf timestamp.
pub fn at(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn jiff_ts(t: jiff::Timestamp) -> prost_types::Timestamp {
    ts(u64::try_from(t.as_second()).unwrap_or(0))
}

/// How the API shows a strategy (windows and FleetLock are both "in window").
pub fn reboot_method(m: RebootMethod) -> pb::RebootMethod {
    match m {
        RebootMethod::Firmware => pb::RebootMethod::Firmware,
        RebootMethod::Kexec => pb::RebootMethod::Kexec,
    }
}

/// `None` for UNSPECIFIED.
pub fn reboot_method_from(m: pb::RebootMethod) -> Option<RebootMethod> {
    match m {
        pb::RebootMethod::Unspecified => None,
        pb::RebootMethod::Firmware => Some(RebootMethod::Firmware),
        pb::RebootMethod::Kexec => Some(RebootMethod::Kexec),
    }
}

/// A boot's record as the API shows it.
pub fn boot_record(b: &BootRecord) -> pb::BootRecord {
    pb::BootRecord {
        method: reboot_method(b.method) as i32,
        downtime_ms: b.downtime_ms,
        fallback: b.fallback.clone().unwrap_or_default(),
    }
}

pub fn reboot_policy(s: RebootStrategy) -> pb::RebootPolicy {
    use pb::RebootPolicy as P;
    match s {
        RebootStrategy::Immediate => P::Immediate,
        RebootStrategy::Window | RebootStrategy::FleetLock => P::InWindow,
        RebootStrategy::Never => P::Never,
    }
}

pub fn phase(p: Phase) -> pb::Phase {
    match p {
        Phase::Opening => pb::Phase::Opening,
        Phase::Writing => pb::Phase::Writing,
        Phase::Verifying => pb::Phase::Verifying,
        Phase::Armed => pb::Phase::Armed,
        Phase::Rebooting => pb::Phase::Rebooting,
        Phase::Done => pb::Phase::Done,
    }
}

pub fn operation(o: &Operation) -> pb::Operation {
    pb::Operation {
        id: o.id.clone(),
        phase: phase(o.phase) as i32,
        version: o.version.clone(),
        source: o.source.clone(),
        delta: o.delta,
        reboot: reboot_policy(o.reboot) as i32,
        bytes_done: o.bytes_done,
        bytes_total: o.bytes_total,
        bytes_fetched: o.bytes_fetched,
        ops_done: o.ops_done,
        ops_total: o.ops_total,
        started: o.started.map(at),
    }
}

pub fn result(r: &OpResult) -> pb::Result {
    pb::Result {
        outcome: match r.outcome {
            OpOutcome::Armed => pb::Outcome::Armed,
            OpOutcome::Failed => pb::Outcome::Failed,
            OpOutcome::Cancelled => pb::Outcome::Cancelled,
        } as i32,
        version: r.version.clone(),
        from_version: r.from_version.clone(),
        reason: r.reason.clone(),
        at: Some(at(r.at)),
        bytes_fetched: r.bytes_fetched,
        boot: None,
    }
}

fn progress(p: &OpProgress) -> pb::Progress {
    pb::Progress {
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        bytes_fetched: p.bytes_fetched,
        ops_done: p.ops_done,
        ops_total: p.ops_total,
        in_flight_bytes: p.in_flight_bytes,
    }
}

pub fn kind(k: &OpEventKind) -> pb::update_event::Kind {
    use pb::update_event::Kind;
    match k {
        OpEventKind::Snapshot(o) => Kind::Snapshot(operation(o)),
        OpEventKind::Phase(p) => Kind::Phase(phase(*p) as i32),
        OpEventKind::Progress(p) => Kind::Progress(progress(p)),
        OpEventKind::Result(r) => Kind::Result(result(r)),
    }
}

pub fn event(e: &OpEvent) -> pb::UpdateEvent {
    pb::UpdateEvent {
        operation_id: e.operation_id.clone(),
        at: Some(at(e.at)),
        kind: Some(kind(&e.kind)),
    }
}

/// The unattended loop's part of the status.
pub fn auto(a: AutoStatus) -> pb::Auto {
    pb::Auto {
        enabled: a.enabled,
        channel: a.channel,
        reboot: a.reboot.name().to_owned(),
        last_check: a.last_check.map(ts),
        last_check_error: a.last_check_error,
        next_check: a.next_check.map(jiff_ts),
        next_step: a.next_step,
        offered_version: a.offered_version.unwrap_or_default(),
        wave_start: a.wave_start.map(jiff_ts),
        held_version: a
            .held
            .as_ref()
            .map(|h| h.version.clone())
            .unwrap_or_default(),
        held_reason: a.held.map(|h| h.reason).unwrap_or_default(),
        window_start: a.window.map(|s| jiff_ts(s.start)),
        window_end: a.window.map(|s| jiff_ts(s.end)),
        in_window: a.in_window,
        time_zone: a.time_zone,
        fleetlock: match a.lock {
            None => "",
            Some(Lock::Unknown) => "unknown",
            Some(Lock::Held) => "held",
            Some(Lock::Released) => "released",
        }
        .to_owned(),
        halted_by: a.halted_by,
        soak_end: a.soak_until.map(jiff_ts),
    }
}

pub fn start_source(s: Option<pb::start_update_request::Source>) -> Source {
    use pb::start_update_request::Source as S;
    match s {
        None => Source::None,
        Some(S::Channel(c)) => Source::Channel(c),
        Some(S::Version(v)) => Source::Version(v),
        Some(S::Url(u)) => Source::Url(u),
        Some(S::Path(p)) => Source::Path(p),
    }
}

pub fn check_source(s: Option<pb::check_for_update_request::Source>) -> Source {
    use pb::check_for_update_request::Source as S;
    match s {
        None => Source::None,
        Some(S::Channel(c)) => Source::Channel(c),
        Some(S::Version(v)) => Source::Version(v),
        Some(S::Url(u)) => Source::Url(u),
    }
}
