//! `updatectl status --json` and `history --json`: the versioned documents for
//! programs (schemas `updatectl.status.v1` and `updatectl.history.v1`, documented in
//! docs/api.md; fields are only ever added).

use serde::Serialize;

use super::{outcome, phase, reboot, slot_state, HISTORY_SCHEMA, STATUS_SCHEMA};
use crate::api::pb;

#[derive(Debug, Serialize)]
struct SlotJson<'a> {
    name: &'a str,
    device: &'a str,
    partlabel: &'a str,
    size_bytes: u64,
    state: &'static str,
    version: &'a str,
    bootable: bool,
    /// Whether the root runs through dm-verity (booted slot only).
    verity: bool,
    /// The release's verified dm-verity root hash, "" when none.
    verity_root_hash: &'a str,
}

#[derive(Debug, Serialize)]
struct OperationJson<'a> {
    id: &'a str,
    phase: &'static str,
    version: &'a str,
    source: &'a str,
    delta: bool,
    reboot: &'static str,
    bytes_done: u64,
    bytes_total: u64,
    bytes_fetched: u64,
    ops_done: u32,
    ops_total: u32,
    started: Option<String>,
}

#[derive(Debug, Serialize)]
struct ResultJson<'a> {
    outcome: &'static str,
    version: &'a str,
    from_version: &'a str,
    reason: &'a str,
    at: Option<String>,
    bytes_fetched: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot: Option<BootJson<'a>>,
}

/// A committed update's boot (absent for anything else).
#[derive(Debug, Serialize)]
struct BootJson<'a> {
    method: &'static str,
    downtime_ms: Option<u64>,
    #[serde(skip_serializing_if = "str::is_empty")]
    fallback: &'a str,
}

fn boot_json(b: &pb::BootRecord) -> BootJson<'_> {
    BootJson {
        method: crate::cli::render::reboot_method(b.method),
        downtime_ms: b.downtime_ms,
        fallback: &b.fallback,
    }
}

#[derive(Debug, Serialize)]
struct BootloaderJson<'a> {
    backend: &'a str,
    default_slot: &'a str,
    trial_slot: &'a str,
    tries_left: u32,
    raw: &'a str,
}

#[derive(Debug, Serialize)]
struct StatusJson<'a> {
    schema: &'static str,
    agent_version: &'a str,
    compatible: &'a str,
    running_version: &'a str,
    state: &'a str,
    booted: Option<SlotJson<'a>>,
    other: Option<SlotJson<'a>>,
    bootloader: Option<BootloaderJson<'a>>,
    operation: Option<OperationJson<'a>>,
    last_result: Option<ResultJson<'a>>,
    /// Added in agent 0.1 with unattended patching; absent when not configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    auto: Option<AutoJson<'a>>,
    /// Added with the root of trust's expiry; absent from an agent too old to say.
    #[serde(skip_serializing_if = "Option::is_none")]
    trust: Option<TrustJson>,
}

/// What the node trusts: root_version 0 (and no expiry) on a node that trusts its
/// keys directory.
#[derive(Debug, Serialize)]
struct TrustJson {
    root_version: u64,
    root_expires: Option<String>,
    root_days_left: Option<i64>,
}

#[derive(Debug, Serialize)]
struct AutoJson<'a> {
    enabled: bool,
    channel: &'a str,
    reboot: &'a str,
    last_check: Option<String>,
    last_check_error: &'a str,
    next_check: Option<String>,
    next_step: &'a str,
    offered_version: &'a str,
    wave_start: Option<String>,
    held_version: &'a str,
    held_reason: &'a str,
    window_start: Option<String>,
    window_end: Option<String>,
    in_window: bool,
    time_zone: &'a str,
    fleetlock: &'a str,
    halted_by: &'a str,
    soak_end: Option<String>,
}

fn rfc(t: Option<&prost_types::Timestamp>) -> Option<String> {
    t.and_then(|t| u64::try_from(t.seconds).ok())
        .map(crate::timefmt::rfc3339)
}

pub(super) fn snake(s: &'static str) -> &'static str {
    match s {
        "known good" => "known_good",
        "known bad" => "known_bad",
        "rolled back" => "rolled_back",
        "rolling back" => "rolling_back",
        other => other,
    }
}

fn slot_json(s: &pb::Slot) -> SlotJson<'_> {
    SlotJson {
        name: &s.name,
        device: &s.device,
        partlabel: &s.partlabel,
        size_bytes: s.size_bytes,
        state: snake(slot_state(s.state)),
        version: &s.version,
        bootable: s.bootable,
        verity: s.verity,
        verity_root_hash: &s.verity_root_hash,
    }
}

fn result_json(r: &pb::Result) -> ResultJson<'_> {
    ResultJson {
        outcome: snake(outcome(r.outcome)),
        version: &r.version,
        from_version: &r.from_version,
        reason: &r.reason,
        at: rfc(r.at.as_ref()),
        bytes_fetched: r.bytes_fetched,
        boot: r.boot.as_ref().map(boot_json),
    }
}

/// `updatectl status --json`.
pub fn status_json(s: &pb::Status) -> String {
    let doc = StatusJson {
        schema: STATUS_SCHEMA,
        agent_version: &s.agent_version,
        compatible: &s.compatible,
        running_version: &s.running_version,
        state: &s.state,
        booted: s.booted.as_ref().map(slot_json),
        other: s.other.as_ref().map(slot_json),
        bootloader: s.bootloader.as_ref().map(|b| BootloaderJson {
            backend: &b.backend,
            default_slot: &b.default_slot,
            trial_slot: &b.trial_slot,
            tries_left: b.tries_left,
            raw: &b.raw,
        }),
        operation: s.operation.as_ref().map(|o| OperationJson {
            id: &o.id,
            phase: phase(o.phase),
            version: &o.version,
            source: &o.source,
            delta: o.delta,
            reboot: reboot(o.reboot),
            bytes_done: o.bytes_done,
            bytes_total: o.bytes_total,
            bytes_fetched: o.bytes_fetched,
            ops_done: o.ops_done,
            ops_total: o.ops_total,
            started: rfc(o.started.as_ref()),
        }),
        last_result: s.last_result.as_ref().map(result_json),
        auto: s.auto.as_ref().map(|a| AutoJson {
            enabled: a.enabled,
            channel: &a.channel,
            reboot: &a.reboot,
            last_check: rfc(a.last_check.as_ref()),
            last_check_error: &a.last_check_error,
            next_check: rfc(a.next_check.as_ref()),
            next_step: &a.next_step,
            offered_version: &a.offered_version,
            wave_start: rfc(a.wave_start.as_ref()),
            held_version: &a.held_version,
            held_reason: &a.held_reason,
            window_start: rfc(a.window_start.as_ref()),
            window_end: rfc(a.window_end.as_ref()),
            in_window: a.in_window,
            time_zone: &a.time_zone,
            fleetlock: &a.fleetlock,
            halted_by: &a.halted_by,
            soak_end: rfc(a.soak_end.as_ref()),
        }),
        trust: s.trust.as_ref().map(|t| TrustJson {
            root_version: t.root_version,
            root_expires: rfc(t.root_expires.as_ref()),
            root_days_left: t.root_expires.as_ref().map(|_| t.root_days_left),
        }),
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

#[derive(Debug, Serialize)]
struct HistoryJson<'a> {
    schema: &'static str,
    entries: Vec<HistoryEntryJson<'a>>,
}

#[derive(Debug, Serialize)]
struct HistoryEntryJson<'a> {
    version: &'a str,
    from_version: &'a str,
    slot: &'a str,
    outcome: &'static str,
    reason: &'a str,
    bytes_fetched: u64,
    at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    boot: Option<BootJson<'a>>,
}

/// `updatectl history --json`, newest first.
pub fn history_json(entries: &[pb::HistoryEntry]) -> String {
    let doc = HistoryJson {
        schema: HISTORY_SCHEMA,
        entries: entries
            .iter()
            .map(|e| HistoryEntryJson {
                version: &e.version,
                from_version: &e.from_version,
                slot: &e.slot,
                outcome: snake(outcome(e.outcome)),
                reason: &e.reason,
                bytes_fetched: e.bytes_fetched,
                at: rfc(e.at.as_ref()),
                boot: e.boot.as_ref().map(boot_json),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}
