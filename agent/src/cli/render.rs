//! How `updatectl status` and `history` look: a summary for people that fits 80
//! columns, and a versioned JSON document for programs (schema `updatectl.status.v1`,
//! documented in docs/api.md; fields are only ever added).

use crate::api::pb;

#[path = "render_json.rs"]
mod json;
use json::snake;
pub use json::{history_json, status_json};

pub const STATUS_SCHEMA: &str = "updatectl.status.v1";
pub const HISTORY_SCHEMA: &str = "updatectl.history.v1";

/// Bytes for people, decimal units as download sizes are quoted, one decimal.
pub fn bytes(n: u64) -> String {
    si_bytes(n, 1)
}

/// Bytes in SI units (kB, MB, ...) with `decimals` digits after the point.
pub fn si_bytes(n: u64, decimals: usize) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.decimals$} {}", UNITS[u])
    }
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    match t {
        Some(t) if t.seconds > 0 => {
            let s = crate::timefmt::rfc3339(u64::try_from(t.seconds).unwrap_or(0));
            // "2026-11-26 04:12 UTC": minutes are enough for people.
            format!("{} {} UTC", &s[..10], &s[11..16])
        }
        _ => "(unknown time)".into(),
    }
}

pub fn slot_state(s: i32) -> &'static str {
    match pb::SlotState::try_from(s).unwrap_or_default() {
        pb::SlotState::Unspecified => "unknown",
        pb::SlotState::Empty => "empty",
        pb::SlotState::Staging => "staging",
        pb::SlotState::Staged => "staged",
        pb::SlotState::Armed => "armed",
        pb::SlotState::KnownGood => "known good",
        pb::SlotState::KnownBad => "known bad",
        pb::SlotState::Trial => "trial",
    }
}

pub fn phase(p: i32) -> &'static str {
    match pb::Phase::try_from(p).unwrap_or_default() {
        pb::Phase::Unspecified => "unknown",
        pb::Phase::Opening => "opening",
        pb::Phase::Writing => "writing",
        pb::Phase::Verifying => "verifying",
        pb::Phase::Armed => "armed",
        pb::Phase::Rebooting => "rebooting",
        pb::Phase::Done => "done",
    }
}

pub fn outcome(o: i32) -> &'static str {
    match pb::Outcome::try_from(o).unwrap_or_default() {
        pb::Outcome::Unspecified => "unknown",
        pb::Outcome::Armed => "armed",
        pb::Outcome::Committed => "committed",
        pb::Outcome::RolledBack => "rolled back",
        pb::Outcome::Failed => "failed",
        pb::Outcome::Cancelled => "cancelled",
        pb::Outcome::RollingBack => "rolling back",
    }
}

fn reboot(r: i32) -> &'static str {
    match pb::RebootPolicy::try_from(r).unwrap_or_default() {
        pb::RebootPolicy::Unspecified | pb::RebootPolicy::Never => "never",
        pb::RebootPolicy::Immediate => "now",
        pb::RebootPolicy::InWindow => "window",
    }
}

/// Cuts `s` to `max` characters with an ellipsis, so a long reason keeps the layout.
fn fit(s: &str, max: usize) -> String {
    let one_line = s.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

pub fn reboot_method(m: i32) -> &'static str {
    match pb::RebootMethod::try_from(m).unwrap_or_default() {
        pb::RebootMethod::Kexec => "kexec",
        pb::RebootMethod::Firmware => "firmware",
        pb::RebootMethod::Unspecified => "unknown",
    }
}

/// "kexec · down 8.4 s": how a committed update booted and for how long the node
/// was away (reboot requested → gate committed).
pub fn boot_line(b: &pb::BootRecord) -> String {
    let down = b
        .downtime_ms
        .map_or("down for an unknown time".to_owned(), |ms| {
            format!("down {:.1} s", ms as f64 / 1000.0)
        });
    let kexec_not_used = if b.fallback.is_empty() {
        ""
    } else {
        " (kexec not used)"
    };
    format!("{}{kexec_not_used} · {down}", reboot_method(b.method))
}

/// `updatectl reboot`'s answer.
pub fn rebooting(r: &pb::RebootResponse) -> String {
    match (reboot_method(r.method), r.fallback.as_str()) {
        ("kexec", _) => "rebooting by kexec into the armed release".into(),
        (_, "") => "rebooting through the firmware".into(),
        (_, why) => format!("rebooting through the firmware; kexec not used: {why}"),
    }
}

/// One line about how an attempt ended, e.g. "rolled back from 1.4.0: unit ...".
pub fn result_line(r: &pb::Result) -> String {
    let o = pb::Outcome::try_from(r.outcome).unwrap_or_default();
    let from = if r.from_version.is_empty() {
        String::new()
    } else {
        format!(" (from {})", r.from_version)
    };
    match o {
        pb::Outcome::Committed => format!("{} committed{from}", r.version),
        pb::Outcome::Armed => format!("{} staged and armed{from}", r.version),
        pb::Outcome::RolledBack | pb::Outcome::RollingBack => {
            format!("{} from {}: {}", outcome(r.outcome), r.version, r.reason)
        }
        _ if r.reason.is_empty() => format!("{} {}", r.version, outcome(r.outcome)),
        _ => format!("{} {}: {}", r.version, outcome(r.outcome), r.reason),
    }
}

/// The summary: what runs, what is next, how the last update went and why.
pub fn status_text(s: &pb::Status) -> String {
    const W: usize = 80;
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        out.push_str(&fit(&format!("{label:<10}{text}"), W));
        out.push('\n');
    };
    let bl = s.bootloader.clone().unwrap_or_default();
    let b = s.booted.clone().unwrap_or_default();
    let o = s.other.clone().unwrap_or_default();
    line("Node", node_text(s, &bl));
    // Said only when it is so: a root without dm-verity is what every node had before.
    let verified = if b.verity { " · dm-verity root" } else { "" };
    line(
        "Running",
        format!(
            "{} on slot {} ({}) · {}{verified}",
            or_unknown(&b.version),
            b.name,
            b.device,
            slot_state(b.state)
        ),
    );
    line("Other", other_text(&s.state, &o));
    line("Next", next_text(s, &b, &o, &bl));
    if let Some(op) = &s.operation {
        match op.source.as_str() {
            "" => line("Operation", op.id.clone()),
            src => line("Operation", format!("{} · {}", op.id, fit(src, 50))),
        }
    }
    last_text(s.last_result.as_ref(), W, &mut line);
    if let Some(a) = &s.auto {
        auto_text(a, &mut line);
    }
    if let Some(t) = s.trust.as_ref().filter(|t| t.root_version > 0) {
        line("Trust", trust_text(t));
    }
    out
}

/// The root of trust, and what its expiry asks of people when it is near.
fn trust_text(t: &pb::Trust) -> String {
    let (v, at, days) = (
        t.root_version,
        when(t.root_expires.as_ref()),
        t.root_days_left,
    );
    let next = v + 1;
    match days {
        ..0 => format!("root {v} EXPIRED {at}: nothing accepted until root {next}"),
        0 => format!("root {v} · expires today ({at}): publish root {next}"),
        1 => format!("root {v} · expires in 1 day ({at}): publish root {next}"),
        2..30 => format!("root {v} · expires in {days} days ({at}): publish root {next}"),
        _ => format!("root {v} · expires {at}"),
    }
}

/// A release's version, or words saying it is not known.
fn or_unknown(v: &str) -> String {
    if v.is_empty() {
        "(unknown release)".to_owned()
    } else {
        v.to_owned()
    }
}

/// The node line: what it is, its bootloader, this agent.
fn node_text(s: &pb::Status, bl: &pb::Bootloader) -> String {
    format!(
        "{} · bootloader {} · agent {}",
        if s.compatible.is_empty() {
            "?"
        } else {
            &s.compatible
        },
        bl.backend,
        s.agent_version
    )
}

/// The slot not running: empty, or what it holds and its role (`state` is the
/// agent's state, which decides whether a known-good slot is a rollback target).
fn other_text(state: &str, o: &pb::Slot) -> String {
    match pb::SlotState::try_from(o.state).unwrap_or_default() {
        pb::SlotState::Empty => format!("slot {} ({}) · empty", o.name, o.device),
        pb::SlotState::KnownGood if o.version.is_empty() => {
            format!("slot {} ({}) · bootable, release unknown", o.name, o.device)
        }
        pb::SlotState::KnownGood => {
            let role = match state {
                "committed" => ", rollback target",
                "armed" => ", the fallback",
                _ => "",
            };
            format!(
                "{} on slot {} ({}) · known good{role}",
                o.version, o.name, o.device
            )
        }
        _ => format!(
            "{} on slot {} ({}) · {}",
            or_unknown(&o.version),
            o.name,
            o.device,
            slot_state(o.state)
        ),
    }
}

/// What happens next: the trial's verdict, the operation's progress, or nothing.
fn next_text(s: &pb::Status, b: &pb::Slot, o: &pb::Slot, bl: &pb::Bootloader) -> String {
    let on_trial = b.state == pb::SlotState::Trial as i32;
    match &s.operation {
        Some(op) if on_trial => format!(
            "{} on trial: health checks decide if it stays (mark-good commits now)",
            op.version
        ),
        Some(op) => operation_text(op, o, bl),
        None if s.state == "rolling_back" => "reboot to finish the rollback".into(),
        None => "nothing pending".into(),
    }
}

/// An operation not on trial: armed and waiting for the reboot, or its phase and
/// progress.
fn operation_text(op: &pb::Operation, o: &pb::Slot, bl: &pb::Bootloader) -> String {
    match pb::Phase::try_from(op.phase).unwrap_or_default() {
        pb::Phase::Armed => format!(
            "{} armed on slot {}: reboot to try it{}",
            op.version,
            o.name,
            if bl.tries_left > 0 {
                format!(" ({} tries)", bl.tries_left)
            } else {
                String::new()
            }
        ),
        pb::Phase::Writing | pb::Phase::Verifying if op.bytes_total > 0 => {
            let pct = op.bytes_done.saturating_mul(100) / op.bytes_total.max(1);
            format!(
                "{} {} {}% ({} of {}, {} fetched) · reboot {}",
                op.version,
                phase(op.phase),
                pct,
                bytes(op.bytes_done),
                bytes(op.bytes_total),
                bytes(op.bytes_fetched),
                reboot(op.reboot)
            )
        }
        _ => format!(
            "{} {} · reboot {}",
            or_unknown(&op.version),
            phase(op.phase),
            reboot(op.reboot)
        ),
    }
}

/// How the last attempt ended; a reason gets lines of its own (`w` is the width).
fn last_text(r: Option<&pb::Result>, w: usize, line: &mut impl FnMut(&str, String)) {
    match r {
        Some(r) if r.reason.is_empty() => line(
            "Last",
            format!("{} · {}", result_line(r), when(r.at.as_ref())),
        ),
        Some(r) => {
            let head = format!("{} {}", r.version, outcome(r.outcome));
            line("Last", format!("{head} · {}", when(r.at.as_ref())));
            // The why gets room of its own: up to three wrapped lines.
            for (i, l) in wrap(&r.reason, w - 10, 3).into_iter().enumerate() {
                line(if i == 0 { "Why" } else { "" }, l);
            }
        }
        None => line("Last", "no update yet".into()),
    }
    if let Some(b) = r.and_then(|r| r.boot.as_ref()) {
        line("Boot", boot_line(b));
        for (i, l) in wrap(&b.fallback, w - 10, 2).into_iter().enumerate() {
            line(if i == 0 { "Kexec" } else { "" }, l);
        }
    }
}

/// The unattended-patching lines of `updatectl status`.
fn auto_text(a: &pb::Auto, line: &mut impl FnMut(&str, String)) {
    let mut head = format!(
        "{} · channel {} · reboot {}",
        if a.enabled {
            "on"
        } else {
            "off (windows and FleetLock for IN_WINDOW updates)"
        },
        a.channel,
        a.reboot
    );
    if !a.fleetlock.is_empty() {
        head.push_str(&format!(" · FleetLock {}", a.fleetlock));
    }
    line("Auto", head);
    for l in wrap(&a.next_step, 70, 2) {
        line("", l);
    }
    if !a.last_check_error.is_empty() {
        let w = wrap(
            &format!("{}: {}", when(a.last_check.as_ref()), a.last_check_error),
            70,
            2,
        );
        for (i, l) in w.into_iter().enumerate() {
            line(if i == 0 { "Check" } else { "" }, l);
        }
    }
    if !a.halted_by.is_empty() {
        for (i, l) in wrap(&a.halted_by, 70, 3).into_iter().enumerate() {
            line(if i == 0 { "Halted" } else { "" }, l);
        }
    }
    if let Some(end) = &a.soak_end {
        line(
            "Soak",
            format!("FleetLock slot kept until {}", when(Some(end))),
        );
    }
    if !a.held_version.is_empty() {
        let text = format!(
            "{} not retried by itself: {} (start it by hand to retry)",
            a.held_version, a.held_reason
        );
        for (i, l) in wrap(&text, 70, 2).into_iter().enumerate() {
            line(if i == 0 { "Held" } else { "" }, l);
        }
    }
    if let (Some(start), Some(end)) = (&a.window_start, &a.window_end) {
        let mins = (end.seconds - start.seconds).max(0) / 60;
        let text = if a.in_window {
            format!("open until {} · zone {}", when(Some(end)), a.time_zone)
        } else {
            format!(
                "next {} for {}h{:02}m · zone {}",
                when(Some(start)),
                mins / 60,
                mins % 60,
                a.time_zone
            )
        };
        line("Window", text);
    }
}

/// Word-wraps `text` into at most `lines` lines of `width` characters (the last one
/// cut with an ellipsis when there is more).
fn wrap(text: &str, width: usize, lines: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for word in text.split_whitespace() {
        let len = cur.chars().count();
        if len > 0 && len + 1 + word.chars().count() > width {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    if out.len() > lines {
        let rest = out[lines - 1..].join(" ");
        out.truncate(lines - 1);
        out.push(fit(&rest, width));
    }
    out.into_iter().map(|l| fit(&l, width)).collect()
}

/// `updatectl history`: one line per attempt, newest first.
pub fn history_text(entries: &[pb::HistoryEntry]) -> String {
    if entries.is_empty() {
        return "no updates recorded\n".into();
    }
    let mut out = String::new();
    for e in entries {
        let head = format!(
            "{}  {:<12} {:<12} slot {}  {:>9}",
            when(e.at.as_ref()),
            fit(&e.version, 12),
            snake(outcome(e.outcome)),
            e.slot,
            bytes(e.bytes_fetched)
        );
        out.push_str(&fit(&head, 80));
        out.push('\n');
        if !e.reason.is_empty() {
            out.push_str(&fit(&format!("    {}", e.reason), 80));
            out.push('\n');
        }
        if let Some(b) = &e.boot {
            out.push_str(&fit(&format!("    boot: {}", boot_line(b)), 80));
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
#[path = "render_golden.rs"]
mod golden;
