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
//! What is read is bounded (entries listed and looked at per directory, bytes per
//! file and in all, line length) and cleaned of control characters: `/dev/kmsg` takes
//! lines from any root process, and the text ends up in the status and the history.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// At most this many entries of a directory are listed,
const MAX_LISTED: usize = 4096;
/// and of those the newest this many are looked at.
const MAX_FILES: usize = 256;
/// At most the last this much of each file is read (a part is a few KiB),
const MAX_BYTES: u64 = 64 * 1024;
/// and this much in all.
const MAX_TOTAL: u64 = 4 * 1024 * 1024;
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
/// into folders of `archive`. A record's time is the kernel's (pstore gives each file
/// its record's time, systemd-pstore keeps it on the parts it moves), in whole seconds
/// (EFI's), so `since` counts from its second.
pub fn last_words(kernel: &Path, archive: &Path, since: SystemTime) -> Option<LastWords> {
    let since = whole_seconds(since);
    let mut budget = MAX_TOTAL;
    let mut records = dumps(kernel, since, &mut budget);
    // A folder's time is when it was moved, never before its records were written.
    for (folder, _) in newest(archive, since, |m| m.is_dir()) {
        records.extend(dumps(&folder, since, &mut budget));
    }
    records.sort_by_key(|r| std::cmp::Reverse((r.at, r.seq)));
    records.into_iter().find_map(|r| {
        let lines = telling_lines(&r.text);
        (!lines.is_empty()).then_some(LastWords {
            at: r.at,
            lines,
            file: r.file,
        })
    })
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// One dump: its parts joined, oldest text first.
struct Record {
    at: SystemTime,
    /// The dump's count in its boot (`Panic#2`): of two in one second, the later.
    seq: u32,
    text: String,
    file: PathBuf,
}

/// The newest `MAX_FILES` entries of `dir` of at least `since` that `keep` accepts,
/// links left out (the archive is a directory root writes, not an input to trust).
/// The listing is bounded too, and filtered before it is cut, so an archive of old
/// folders (systemd keeps them 14 days) cannot hide this boot's.
fn newest(
    dir: &Path,
    since: SystemTime,
    keep: impl Fn(&std::fs::Metadata) -> bool,
) -> Vec<(PathBuf, SystemTime)> {
    let mut found: Vec<(PathBuf, SystemTime)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .take(MAX_LISTED)
        .filter_map(|e| {
            let m = std::fs::symlink_metadata(e.path()).ok()?;
            let at = m.modified().ok()?;
            (!m.file_type().is_symlink() && keep(&m) && at >= since).then_some((e.path(), at))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.1));
    found.truncate(MAX_FILES);
    found
}

/// The dumps in `dir` written since `since`. A folder of systemd-pstore's with
/// `dmesg.txt` (its join of one dump's parts, oldest first) is that dump, at its
/// parts' time. Otherwise the `dmesg-*` files are the parts, each headed
/// `<Reason>#<n> Part<m>`: pstore writes a dump's Part1 (its newest text) first and
/// times each part on its own, so a dump is a run of one header with rising part
/// numbers within a few seconds, joined highest part first.
fn dumps(dir: &Path, since: SystemTime, budget: &mut u64) -> Vec<Record> {
    let files = newest(dir, SystemTime::UNIX_EPOCH, std::fs::Metadata::is_file);
    let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    let is_part = |p: &Path| name(p).is_some_and(|n| n.starts_with("dmesg-"));
    if let Some((joined, moved)) = files
        .iter()
        .find(|(p, _)| name(p).as_deref() == Some("dmesg.txt"))
    {
        // The dump's time is its parts' (the move's without them), read off the listing.
        let at = files
            .iter()
            .filter(|(p, _)| is_part(p))
            .map(|f| f.1)
            .min()
            .unwrap_or(*moved);
        return (at >= since)
            .then(|| read_tail(joined, budget))
            .flatten()
            .map(|text| Record {
                at,
                seq: 0,
                text,
                file: joined.clone(),
            })
            .into_iter()
            .collect();
    }
    // Parts older than `since` cannot start a dump that counts.
    let mut parts: Vec<Part> = files
        .into_iter()
        .filter(|(p, at)| is_part(p) && *at >= since)
        .filter_map(|(path, at)| {
            let text = read_tail(&path, budget)?;
            let (reason, n) = header(&text);
            Some(Part {
                at,
                reason,
                n,
                text,
                path,
            })
        })
        .collect();
    parts.sort_by(|a, b| a.at.cmp(&b.at).then(a.n.cmp(&b.n)));
    let mut runs: Vec<Vec<Part>> = Vec::new();
    for part in parts {
        match runs.last_mut() {
            Some(run)
                if run[0].reason == part.reason
                    && run.last().is_some_and(|l| part.n > l.n)
                    && part
                        .at
                        .duration_since(run[0].at)
                        .is_ok_and(|d| d.as_secs() <= 10) =>
            {
                run.push(part)
            }
            _ => runs.push(vec![part]),
        }
    }
    runs.into_iter()
        .map(|mut run| {
            let at = run[0].at;
            let file = run[0].path.clone();
            let seq = run[0]
                .reason
                .rsplit_once('#')
                .and_then(|(_, n)| n.parse().ok())
                .unwrap_or(0);
            run.sort_by_key(|p| std::cmp::Reverse(p.n));
            let text = run
                .into_iter()
                .map(|p| p.text)
                .collect::<Vec<_>>()
                .join("\n");
            Record {
                at,
                seq,
                text,
                file,
            }
        })
        .collect()
}

/// One `dmesg-*` file of a dump.
struct Part {
    at: SystemTime,
    /// `Panic#1`, `Oops#2`, …
    reason: String,
    n: u32,
    text: String,
    path: PathBuf,
}

/// The last `MAX_BYTES` of a regular file (a dump's newest text is at its end), within
/// what is left of `budget`. Opened without following a link and without waiting on a
/// FIFO put there between the listing and the open.
fn read_tail(path: &Path, budget: &mut u64) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let mut f = std::fs::File::options()
        .read(true)
        .custom_flags(flags.bits())
        .open(path)
        .ok()?;
    let meta = f.metadata().ok()?;
    if !meta.is_file() || *budget == 0 {
        return None;
    }
    let want = MAX_BYTES.min(*budget).min(meta.len());
    f.seek(SeekFrom::Start(meta.len() - want)).ok()?;
    let mut buf = Vec::new();
    f.take(want).read_to_end(&mut buf).ok()?;
    *budget -= buf.len() as u64;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

/// A part's header (`Panic#1 Part2`, `Oops#1 Part1`): the reason with its count, and
/// the part number (0 without a header).
fn header(text: &str) -> (String, u32) {
    let first = text.lines().next().unwrap_or_default();
    match first.rsplit_once(" Part") {
        Some((reason, n)) => (reason.to_owned(), n.trim().parse().unwrap_or(0)),
        None => (String::new(), 0),
    }
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
    // CONFIG_PRINTK_CALLER adds the caller: `[    T1]` (a task) or `[    C0]` (a CPU).
    if let Some(r) = rest.trim_start().strip_prefix('[') {
        if let Some((who, r)) = r.split_once(']') {
            let who = who.trim();
            let id = who.strip_prefix('T').or_else(|| who.strip_prefix('C'));
            if id.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
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
        // An oops before the panic is its cause ("Fatal exception" says only that).
        (None, Some(p), Some(o)) if o < p => vec![msgs[o].1.clone(), msgs[p].1.clone()],
        (None, Some(p), _) => {
            // The last error (level 0–3) before the panic, skipping the panic machinery.
            let cause = msgs[..p].iter().rev().take(200).find(|(level, m)| {
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
