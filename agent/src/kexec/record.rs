//! `STATE_DIR/reboot.json`: when the reboot into an attempt was asked for and how it
//! went down, for the gate that commits it to measure the downtime.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::reboot_method::{BootRecord, RebootMethod};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The armed attempt the reboot was for (none: a rollback or a forced reboot).
    pub attempt: Option<String>,
    /// How the node went down.
    pub method: RebootMethod,
    /// Milliseconds since the epoch when the reboot was asked for.
    pub requested_ms: u64,
    /// Why kexec was asked for and not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("reboot.json")
}

/// Written crash-safely before the node goes down.
pub fn save(state_dir: &Path, r: &Record) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(r).map_err(std::io::Error::other)?;
    crate::durable::replace(&path(state_dir), &bytes).map_err(|(_, e)| e)
}

/// The record, when there is a readable one.
pub fn load(state_dir: &Path) -> Option<Record> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Gone once the commit has taken what it needs from it.
pub fn remove(state_dir: &Path) {
    if let Err(e) = std::fs::remove_file(path(state_dir)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(error = %e, "cannot remove the reboot record");
        }
    }
}

/// How the running trial of `attempt` booted, for the gate's commit at `now_ms`: the
/// command line says whether by kexec; the record (when it is this attempt's) when the
/// reboot was asked for and why kexec was not used.
pub fn boot_record(state_dir: &Path, cmdline: &str, attempt: &str, now_ms: u64) -> BootRecord {
    let method = if crate::reboot_method::booted_by_kexec(cmdline) {
        RebootMethod::Kexec
    } else {
        RebootMethod::Firmware
    };
    let rec = load(state_dir).filter(|r| r.attempt.as_deref() == Some(attempt));
    let fallback = match &rec {
        Some(r) if r.method == RebootMethod::Kexec && method == RebootMethod::Firmware => Some(
            "the kexec'd kernel did not reach the health gate (a panic or a hang); the firmware \
             booted the release"
                .to_owned(),
        ),
        Some(r) => r.fallback.clone(),
        None => None,
    };
    BootRecord {
        method,
        downtime_ms: rec.map(|r| now_ms.saturating_sub(r.requested_ms)),
        fallback,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_boot_of_an_attempt() {
        let d = tempfile::tempdir().expect("tmp");
        let kexec_line =
            "root=PARTLABEL=root-b updateagent.slot=b ro panic=10 updateagent.boot=kexec";
        let fw_line = "root=PARTLABEL=root-b updateagent.slot=b ro";
        // No record: the method from the command line, the downtime unknown.
        let b = boot_record(d.path(), fw_line, "a1", 5_000);
        assert_eq!((b.method, b.downtime_ms), (RebootMethod::Firmware, None));
        let rec = Record {
            attempt: Some("a1".into()),
            method: RebootMethod::Kexec,
            requested_ms: 1_000,
            fallback: None,
        };
        save(d.path(), &rec).expect("save");
        let b = boot_record(d.path(), kexec_line, "a1", 9_500);
        assert_eq!(
            b,
            BootRecord {
                method: RebootMethod::Kexec,
                downtime_ms: Some(8_500),
                fallback: None
            }
        );
        // Kexec asked, the firmware booted it (the kexec'd kernel panicked): said so.
        let b = boot_record(d.path(), fw_line, "a1", 30_000);
        assert_eq!(b.method, RebootMethod::Firmware);
        assert!(b.fallback.expect("why").contains("panic"));
        // Another attempt's record measures nothing.
        let b = boot_record(d.path(), kexec_line, "a2", 30_000);
        assert_eq!((b.method, b.downtime_ms), (RebootMethod::Kexec, None));
        remove(d.path());
        assert!(load(d.path()).is_none());
    }
}
