//! The kernel's last words from boots that never reached the agent.
//!
//! A trial slot whose kernel panics, or a default slot that restarts on a dm-verity
//! error at every boot, ends before anything of ours runs; the bootloader falls back
//! and the agent only sees that the slot did not boot. The kernel can leave the tail
//! of its log behind: pstore keeps a record of it across the restart (UEFI variables,
//! ramoops, ACPI ERST), shown at the next boot as `dmesg-<backend>-<id>` files in the
//! pstore file system, which `systemd-pstore.service` moves early in boot to
//! `/var/lib/systemd/pstore/<id>/` (the parts joined in `dmesg.txt`). This reads both
//! and picks the lines that say why: a dm-verity corruption, a panic and the error
//! logged just before it. The kernel writes a record on a panic or an oops; on a
//! plain restart (dm-verity's `restart-on-corruption`) only with
//! `printk.always_kmsg_dump=1` (docs/security.md weighs that).
//!
//! What is read is bounded (files, bytes, line length) and cleaned of control
//! characters: `/dev/kmsg` takes lines from any root process, and the text ends up in
//! the status and the history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// At most this many files per directory are looked at.
const MAX_FILES: usize = 256;
/// At most this much of each file is read (a record is a few KiB).
const MAX_BYTES: u64 = 256 * 1024;
/// A reported line is cut to this many characters.
const MAX_LINE: usize = 240;

/// What the newest telling record says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastWords {
    /// When the kernel wrote the record (its file's time).
    pub at: SystemTime,
    /// The telling lines, oldest first, without their level and timestamp.
    pub lines: Vec<String>,
    /// Where the record was read.
    pub file: PathBuf,
}

impl LastWords {
    /// For a rollback's reason.
    pub fn describe(&self) -> String {
        let at = self
            .at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or_else(|_| "?".to_owned(), |d| crate::timefmt::rfc3339(d.as_secs()));
        let quoted: Vec<String> = self.lines.iter().map(|l| format!("\"{l}\"")).collect();
        format!(
            "the kernel's last words (pstore record of {at}, {}): {}",
            self.file.display(),
            quoted.join(" then ")
        )
    }
}

/// The newest record written at or after `since` that says why a boot ended: the
/// records still in the pstore file system `kernel`, and those systemd-pstore moved
/// into folders of `archive` during this boot (`boot_start`; what it moved at an
/// earlier boot was seen then). A record's time is the kernel's: pstore gives its
/// files the record's time and systemd-pstore keeps it on the parts it moves.
pub fn last_words(
    kernel: &Path,
    archive: &Path,
    since: SystemTime,
    boot_start: SystemTime,
) -> Option<LastWords> {
    let mut records = dumps(kernel);
    for (folder, moved) in entries(archive)
        .filter(|(_, m)| m.is_dir())
        .filter_map(|(p, m)| Some((p, m.modified().ok()?)))
    {
        if moved >= boot_start {
            records.extend(dumps(&folder));
        }
    }
    records.retain(|r| r.at >= since);
    records.sort_by_key(|r| std::cmp::Reverse(r.at));
    records.into_iter().find_map(|r| {
        let lines = telling_lines(&r.text);
        (!lines.is_empty()).then_some(LastWords {
            at: r.at,
            lines,
            file: r.file,
        })
    })
}

/// One dump: its parts joined, oldest text first.
struct Record {
    at: SystemTime,
    text: String,
    file: PathBuf,
}

/// At most `MAX_FILES` entries of `dir`, links left out (never followed: the archive
/// is a directory root writes, not an input to trust).
fn entries(dir: &Path) -> impl Iterator<Item = (PathBuf, std::fs::Metadata)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .take(MAX_FILES)
        .filter_map(|e| {
            let m = std::fs::symlink_metadata(e.path()).ok()?;
            (!m.file_type().is_symlink()).then_some((e.path(), m))
        })
}

/// The dumps in `dir`: its `dmesg-*` files grouped by time (one dump's parts share
/// it) and joined, highest part first (pstore numbers the newest text Part1). A
/// folder of systemd-pstore's with `dmesg.txt` (its join of the parts, oldest first)
/// is that one dump, at its parts' time.
fn dumps(dir: &Path) -> Vec<Record> {
    let mut parts: BTreeMap<SystemTime, Vec<(u32, String, PathBuf)>> = BTreeMap::new();
    let mut joined = None;
    for (path, meta) in entries(dir).filter(|(_, m)| m.is_file()) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !(name.starts_with("dmesg-") || name == "dmesg.txt") {
            continue;
        }
        let (Ok(at), Some(text)) = (meta.modified(), read_bounded(&path)) else {
            continue;
        };
        if name == "dmesg.txt" {
            joined = Some((at, text, path));
        } else {
            parts
                .entry(at)
                .or_default()
                .push((part_of(&text), text, path));
        }
    }
    if let Some((at, text, file)) = joined {
        let at = parts.keys().next_back().copied().unwrap_or(at);
        return vec![Record { at, text, file }];
    }
    parts
        .into_iter()
        .map(|(at, mut parts)| {
            parts.sort_by_key(|p| std::cmp::Reverse(p.0));
            let file = parts.last().map(|p| p.2.clone()).unwrap_or_default();
            let text = parts
                .into_iter()
                .map(|p| p.1)
                .collect::<Vec<_>>()
                .join("\n");
            Record { at, text, file }
        })
        .collect()
}

/// When this boot began, from the time since it (`/proc/uptime`, which counts suspend);
/// the epoch when that cannot be read, so nothing archived is left out.
pub fn boot_start() -> SystemTime {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .and_then(|up| std::time::Duration::try_from_secs_f64(up).ok())
        .and_then(|up| SystemTime::now().checked_sub(up))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn read_bounded(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut buf = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_BYTES)
        .read_to_end(&mut buf)
        .ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// The part number of a dump's header line (`Panic#1 Part2`, `Oops#1 Part1`); 0 without.
fn part_of(text: &str) -> u32 {
    text.lines()
        .next()
        .and_then(|l| l.rsplit_once(" Part"))
        .and_then(|(_, n)| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The message of a kmsg line: without its `<level>` and `[ seconds]`, cleaned, cut.
fn message(line: &str) -> (Option<u8>, String) {
    let mut rest = line.trim_end();
    let mut level = None;
    if let Some(r) = rest.strip_prefix('<') {
        if let Some((n, r)) = r.split_once('>') {
            if let Ok(n) = n.parse::<u32>() {
                level = Some((n & 7) as u8);
                rest = r;
            }
        }
    }
    if let Some(r) = rest.trim_start().strip_prefix('[') {
        if let Some((ts, r)) = r.split_once(']') {
            if ts.trim().parse::<f64>().is_ok() {
                rest = r;
            }
        }
    }
    let clean: String = rest
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_LINE)
        .collect();
    (level, clean)
}

/// Why the dump was written, in the kernel's words: the first dm-verity corruption and
/// the panic after it, or a panic with the last error logged before it (a panic's
/// own line is often generic: "Attempted to kill init!", "sysrq triggered crash"), or
/// an oops. Empty when the dump is a plain shutdown's log.
fn telling_lines(text: &str) -> Vec<String> {
    let msgs: Vec<(Option<u8>, String)> = text.lines().map(message).collect();
    let verity = msgs
        .iter()
        .position(|(_, m)| m.starts_with("device-mapper: verity:") && m.contains("corrupted"));
    let panic = msgs
        .iter()
        .rposition(|(_, m)| m.starts_with("Kernel panic - not syncing:"));
    let oops = msgs
        .iter()
        .position(|(_, m)| m.starts_with("BUG:") || m.starts_with("Oops:"));
    let restart = msgs
        .iter()
        .rposition(|(_, m)| m.starts_with("reboot: Restarting system with command"));
    match (verity, panic, oops) {
        (Some(v), p, _) => {
            let mut out = vec![msgs[v].1.clone()];
            if let Some(end) = p.or(restart).filter(|&e| e > v) {
                out.push(msgs[end].1.clone());
            }
            out
        }
        (None, Some(p), _) => {
            // The last error (level 0–3) before the panic, skipping the panic machinery.
            let cause = msgs[..p].iter().rev().take(40).find(|(level, m)| {
                level.is_some_and(|l| l <= 3) && !m.is_empty() && !m.starts_with("sysrq:")
            });
            cause
                .map(|c| c.1.clone())
                .into_iter()
                .chain([msgs[p].1.clone()])
                .collect()
        }
        (None, None, Some(o)) => vec![msgs[o].1.clone()],
        (None, None, None) => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
