//! Status as the daemon knows it, read from what the agent persists (`state.json`,
//! `history.json`), the bootloader's state and the running operation. Reading never
//! takes the update lock, so status answers while an update runs.

use std::sync::Mutex;

use super::auto::AutoStatus;
use super::ops::Operation;
use crate::boot::{BootControl, BootStatus};
use crate::config::Config;
use crate::history::{Entry, History};
use crate::slots::SlotLayout;
use crate::state::{SlotImage, State, StateStore};
use crate::update::UpdateError;

/// Everything a status is made of, gathered once.
#[derive(Debug, Clone)]
pub struct Status {
    pub state: State,
    pub boot: BootStatus,
    /// The bootloader backend's name.
    pub backend: &'static str,
    /// The newest history record.
    pub last: Option<Entry>,
    pub running_version: Option<String>,
    /// The operation the daemon runs now (or the one armed for the next boot).
    pub operation: Option<Operation>,
    /// What the agent wrote and verified into each slot (`[a, b]`), when it did.
    pub images: [Option<SlotImage>; 2],
    /// Unattended patching, when configured.
    pub auto: Option<AutoStatus>,
    /// The root of trust, when the node has one (filled in by the daemon, which
    /// holds the trust).
    pub root: Option<crate::trust::node::RootFacts>,
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
        operation: Option<Operation>,
        auto: Option<AutoStatus>,
    ) -> Result<Status, UpdateError> {
        let state = self.store.load()?;
        let (boot, backend) = {
            let b = self.boot.lock().unwrap_or_else(|p| p.into_inner());
            (b.status()?, b.name())
        };
        let last = self.last_entry()?;
        Ok(Status {
            state,
            boot,
            backend,
            last,
            running_version: crate::update::running_version(&self.cfg.os_release),
            operation,
            images: self.store.images(),
            auto,
            root: None,
        })
    }
}
