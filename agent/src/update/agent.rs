//! The agent: its handle on this node (configuration, slots, bootloader, state,
//! history, trusted keys) and what the caller sees while it stages.

use crate::boot::systemd_boot::{EntryConfig, SystemdBoot};
use crate::boot::{grub::Grub, BootControl, BootError};
use crate::config::Config;
use crate::fetch;
use crate::partial::Partials;
use crate::slots::SlotLayout;
use crate::state::{State, StateStore};
use crate::timefmt;
use crate::trust::node::NodeTrust;

use super::UpdateError;

/// What the caller sees while staging.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    Opened {
        version: String,
        delta: bool,
        ops: usize,
        bytes: u64,
        resumed_at: usize,
    },
    Op {
        done: usize,
        total: usize,
        bytes_done: u64,
        bytes_fetched: u64,
        /// Bytes of the frames in flight that have arrived (kept ones included): moves
        /// while a large frame downloads, before its operation is done.
        in_flight: u64,
    },
    Verifying,
    Armed {
        slot: crate::slots::Slot,
        version: String,
        tries: u8,
    },
}

/// The agent's handle on this node.
pub struct Agent {
    pub cfg: Config,
    pub layout: SlotLayout,
    pub(crate) boot: Box<dyn BootControl>,
    pub(crate) store: StateStore,
    pub(crate) history: crate::history::History,
    /// What the node trusts; replaced when a newer root is followed (a lock, not a
    /// `&mut`: checks share the agent). Shared with the daemon's second handle, so a
    /// root either one follows is the other's at once.
    pub(super) trust: std::sync::Arc<std::sync::RwLock<NodeTrust>>,
    /// Held while the chain of roots is followed: one follower at a time, so two
    /// (a check and a staging) never write `root.json` over each other or put an
    /// older root back. Shared like `trust`.
    follow: std::sync::Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Agent {
    pub fn new(cfg: Config) -> Result<Self, UpdateError> {
        let layout = SlotLayout::discover(&cfg.slots)?;
        let boot = open_boot(&cfg)?;
        let trust = NodeTrust::load(&cfg.trust, &cfg.state_dir, &cfg.keys_dir)?;
        let store = StateStore::new(&cfg.state_dir);
        let history = crate::history::History::new(&cfg.state_dir);
        Ok(Self {
            cfg,
            layout,
            boot,
            store,
            history,
            trust: std::sync::Arc::new(std::sync::RwLock::new(trust)),
            follow: std::sync::Arc::default(),
        })
    }

    /// This handle, trusting whatever `other` trusts from now on (one root, followed
    /// by either).
    pub fn sharing_trust_with(mut self, other: &Agent) -> Self {
        self.trust = std::sync::Arc::clone(&other.trust);
        self.follow = std::sync::Arc::clone(&other.follow);
        self
    }

    pub fn state(&self) -> Result<State, UpdateError> {
        Ok(self.store.load()?)
    }

    pub fn boot(&self) -> &dyn BootControl {
        self.boot.as_ref()
    }

    pub fn running_version(&self) -> Option<String> {
        running_version(&self.cfg.os_release)
    }

    pub fn history(&self) -> &crate::history::History {
        &self.history
    }

    /// What the node trusts now (a snapshot).
    pub fn trust(&self) -> NodeTrust {
        // A writer that panicked left a whole value behind: follow() assigns at once.
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The root of trust's version and expiry, without copying the trust.
    pub fn root_facts(&self) -> Option<crate::trust::node::RootFacts> {
        self.trust
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .root_facts()
    }

    /// Follows the root of trust on the release server (`[releases] url`) to its
    /// newest version, before anything new from that server is trusted. Without a
    /// release server or a root there is nothing to follow.
    pub fn follow_root(&self) -> Result<(), UpdateError> {
        let Some(base) = self.cfg.releases.url.as_deref() else {
            return Ok(());
        };
        // A follower that panicked left nothing half-done: each link is saved whole.
        let _one = self
            .follow
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut t = self.trust();
        if t.root().is_none() {
            return Ok(());
        }
        let followed = t.follow(base, &self.cfg.fetch, timefmt::now());
        // Keep what was verified and saved even when a later link failed.
        *self
            .trust
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = t;
        followed?;
        Ok(())
    }

    /// Fetches and checks the channel document `name` under the release directory
    /// `base` (signature, expiry, channel name, product line).
    pub fn open_channel(
        &self,
        base: &str,
        name: &str,
    ) -> Result<crate::channel::Channel, UpdateError> {
        use crate::channel::{self, ChannelError};
        self.follow_root()?;
        let url = channel::document_url(base, name);
        let ctx = |source| UpdateError::Channel {
            channel: name.to_owned(),
            url: url.clone(),
            source: Box::new(source),
        };
        let src =
            fetch::open(&url, &self.cfg.fetch).map_err(|source| UpdateError::ChannelFetch {
                channel: name.to_owned(),
                url: url.clone(),
                source: Box::new(source),
            })?;
        let len = src.size();
        if len > channel::MAX_LEN {
            return Err(ctx(ChannelError::TooLarge { len }));
        }
        let mut buf = vec![0u8; len as usize];
        src.read_range(0, &mut buf)
            .map_err(|source| UpdateError::ChannelRead {
                channel: name.to_owned(),
                url: url.clone(),
                source,
            })?;
        let trust = self.trust();
        let now = timefmt::now();
        trust.current(now)?;
        let c =
            crate::channel::Channel::open(&buf, trust.channels(), name, &self.cfg.compatible, now)
                .map_err(ctx)?;
        crate::trust::node::lifetime(
            || format!("channel {name}"),
            c.expires,
            now,
            self.cfg.trust.max_channel_days,
            "trust.max_channel_days",
        )?;
        // Only a document newer than any accepted before, and what it names is pinned.
        crate::trust::marks::Marks::load(&self.cfg.state_dir)?.accept(&c, base)?;
        Ok(c)
    }

    /// sha256 (hex) of the image the booted slot holds, when the agent knows it (it
    /// records the image of every release it commits).
    pub fn booted_image_sha256(&self) -> Option<String> {
        let running = self.running_version();
        self.store.images()[self.layout.booted.index()]
            .clone()
            .filter(|i| running.is_none() || running.as_deref() == Some(i.version.as_str()))
            .map(|i| i.sha256)
    }

    /// Hands the bootloader what it needs from the verified release in `slot` (for
    /// systemd-boot, its kernel): mounts the slot read-only for the call, always
    /// unmounts. Skipped when an earlier run already armed the slot (see
    /// [`crate::boot::needs_prepare`]).
    pub(super) fn prepare_boot(
        &mut self,
        slot: crate::slots::Slot,
        version: &str,
    ) -> Result<(), UpdateError> {
        tracing::info!(release = %version, slot = %slot, phase = "arming", "arming the bootloader: {version} on slot {slot}");
        // The root as the slot's record says: through its verified dm-verity tree, or
        // the partition itself.
        let verity = self.store.images()[slot.index()]
            .as_ref()
            .filter(|i| i.version == version)
            .and_then(|i| i.verity.as_ref())
            .map(|v| crate::boot::RootVerity::new(&v.root_hash, v.hash_offset))
            .transpose()?;
        self.boot.set_root(slot, verity.as_ref())?;
        if !crate::boot::needs_prepare(self.boot.as_ref(), slot)? {
            return Ok(());
        }
        let device = self.layout.partition(slot).device.clone();
        let mnt = self.cfg.state_dir.join("release-mnt");
        let mount = crate::slots::ReadOnlyMount::new(&device, &mnt)?;
        let r = self.boot.prepare(slot, version, mount.path());
        mount.close()?;
        Ok(r?)
    }

    /// Removes the kept frames of an attempt that ended; a leftover only costs space
    /// until the next staging opens the store, so a failure is logged, not returned.
    pub(super) fn drop_partials(&self) {
        if let Err(e) = Partials::remove_all(&self.cfg.state_dir) {
            tracing::warn!(error = %e, "cannot remove the kept partial downloads");
        }
    }
}

/// Opens the bootloader backend the configuration names.
pub fn open_boot(cfg: &Config) -> Result<Box<dyn BootControl>, BootError> {
    Ok(match cfg.boot.backend.as_str() {
        "systemd-boot" => Box::new(SystemdBoot::open(
            &cfg.boot.esp,
            EntryConfig {
                root_labels: [cfg.slots.label_a.clone(), cfg.slots.label_b.clone()],
                options: cfg.boot.options.clone(),
                ..EntryConfig::default()
            },
        )?),
        _ => Box::new(Grub::open(&cfg.boot.grubenv)?),
    })
}

/// VERSION_ID of an os-release file: the running release.
pub fn running_version(os_release: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(os_release).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_ID="))
        .map(|v| v.trim().trim_matches('"').to_owned())
        .filter(|v| !v.is_empty())
}
