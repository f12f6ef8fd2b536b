//! The kernel's last words in a rollback's reason: since when its pstore records can
//! be about the boots being judged, and the mark every boot check leaves for that.

use crate::state::State;
use crate::timefmt;
use crate::update::Agent;

impl Agent {
    /// Since when the kernel's crash records can be about the boots being judged: the
    /// latest of the state's last change (the arming, the commit), the last boot that
    /// reached this check, and the reboot into the armed attempt (a crash of the old
    /// system before it is another story).
    pub(super) fn records_since(&self, state: &State) -> std::time::SystemTime {
        use std::time::{Duration, SystemTime, UNIX_EPOCH};
        let changed = std::fs::metadata(self.store.path())
            .and_then(|m| m.modified())
            .unwrap_or(UNIX_EPOCH);
        let checked = std::fs::read_to_string(self.boot_checked_path())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map_or(UNIX_EPOCH, |secs| UNIX_EPOCH + Duration::from_secs(secs));
        let rebooted = match (state, crate::kexec::record::load(&self.cfg.state_dir)) {
            (State::Armed { staged, .. }, Some(r))
                if r.attempt.as_ref() == Some(&staged.attempt) =>
            {
                UNIX_EPOCH + Duration::from_millis(r.requested_ms)
            }
            _ => UNIX_EPOCH,
        };
        [changed, checked, rebooted]
            .into_iter()
            .max()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    fn boot_checked_path(&self) -> std::path::PathBuf {
        self.cfg.state_dir.join("boot-checked")
    }

    /// Records that this boot reached the check (the time, in seconds): the kernel's
    /// records written before it are not about the boots a later check judges.
    /// Bookkeeping: a failure is logged, and a later check reaches further back.
    pub(super) fn mark_boot_checked(&self) {
        let now = timefmt::now().to_string();
        if let Err((path, e)) = crate::durable::replace(&self.boot_checked_path(), now.as_bytes()) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record that this boot reached the boot check");
        }
    }

    /// `reason`, and what the kernel said when it stopped, if it left a record since
    /// `since` (`pstore.rs`: a panic, a dm-verity corruption).
    pub(super) fn with_last_words(&self, reason: String, since: std::time::SystemTime) -> String {
        let b = &self.cfg.boot;
        match crate::pstore::last_words(&b.pstore, &b.pstore_archive, since) {
            Some(w) => {
                tracing::info!(record = %w.file.display(), "a pstore record tells why the boots before this one ended");
                format!("{reason}; {}", w.describe())
            }
            None => reason,
        }
    }
}
