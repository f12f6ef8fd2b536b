//! What the starter of an update asked to happen once it is staged (its reboot
//! strategy), kept beside `state.json` so a daemon restarted mid-staging or while
//! armed still reboots the release as asked: an operator's NEVER stays never, an
//! unattended update still waits for its window. One small JSON file for the current
//! attempt, replaced crash-safely; an attempt it does not name has no known intent.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::policy::RebootStrategy;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Intent {
    attempt: String,
    reboot: RebootStrategy,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("intent.json")
}

/// Records `reboot` for `attempt`.
pub fn save(
    state_dir: &Path,
    attempt: &str,
    reboot: RebootStrategy,
) -> Result<(), (PathBuf, std::io::Error)> {
    let bytes = serde_json::to_vec(&Intent {
        attempt: attempt.to_owned(),
        reboot,
    })
    .map_err(|e| (path(state_dir), std::io::Error::other(e)))?;
    crate::durable::replace(&path(state_dir), &bytes)
}

/// The strategy recorded for `attempt`, if this is the attempt the file names.
pub fn load(state_dir: &Path, attempt: &str) -> Option<RebootStrategy> {
    let i: Intent = serde_json::from_slice(&std::fs::read(path(state_dir)).ok()?).ok()?;
    (i.attempt == attempt).then_some(i.reboot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_per_attempt() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(load(d.path(), "a1"), None);
        save(d.path(), "a1", RebootStrategy::FleetLock).expect("save");
        assert_eq!(load(d.path(), "a1"), Some(RebootStrategy::FleetLock));
        assert_eq!(load(d.path(), "a2"), None);
        save(d.path(), "a2", RebootStrategy::Never).expect("save");
        assert_eq!(load(d.path(), "a1"), None);
        std::fs::write(d.path().join("intent.json"), b"{garbage").expect("write");
        assert_eq!(load(d.path(), "a2"), None);
    }
}
