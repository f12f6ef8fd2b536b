//! Staging a release: the agent's write path from a payload URL to an armed slot.
//!
//! ```text
//! lock ─> open payload (head) ─> signature, expiry, compatible, version policy
//!      ─> delta for this booted slot? else the full payload beside it
//!      ─> size check ─> open inactive slot (O_EXCL) ─> bootloader: slot unbootable
//!      ─> state Staging ─> apply (checkpoint: fsync slot, then persist ops_done)
//!      ─> read-back hash ─> state Staged ─> bootloader: arm trial ─> state Armed
//! ```
//! Killed at any point, the next `resume` finds the state and carries on: operations
//! recorded as done are re-verified against the slot and rewritten from the first one
//! that no longer matches.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::apply::{self, ApplyError, Blob, Event, SourceSlot};
use crate::boot::systemd_boot::{EntryConfig, SystemdBoot};
use crate::boot::{grub::Grub, BootControl, BootError};
use crate::config::Config;
use crate::fetch::{self, FetchError};
use crate::partial::Partials;
use crate::payload::{
    codec, Manifest, Payload, PayloadError, RangeSource, Trust, TrustError, TrustedKeys,
};
use crate::slots::{SlotError, SlotLayout, SlotWriter};
use crate::state::{Staging, State, StateError, StateStore, UpdateLock};
use crate::timefmt;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error("bootloader")]
    Boot(#[from] BootError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("trusted keys")]
    Keys(#[source] TrustError),
    #[error("fetching the payload")]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("applying the payload")]
    Apply(#[from] ApplyError),
    #[error("payload is for {payload:?}, this node is {node:?}")]
    Incompatible { payload: String, node: String },
    #[error("payload {to} is older than the running release {from}; refused (allow downgrades to force)")]
    Downgrade { from: String, to: String },
    #[error("payload {to} needs at least release {minimum} running, this node runs {running}")]
    SourceTooOld {
        to: String,
        minimum: String,
        running: String,
    },
    #[error("cannot tell the running release: no VERSION_ID in {path}; allow downgrades to update anyway")]
    UnknownRunning { path: std::path::PathBuf },
    #[error("release {version} is {size} bytes but slot {slot} holds only {slot_size}")]
    TargetTooLarge {
        version: String,
        size: u64,
        slot: crate::slots::Slot,
        slot_size: u64,
    },
    #[error(
        "delta {url} was built from a different image than the booted slot \
         (it needs sha256 {expected}, the slot has {actual}), and no full payload was found beside it"
    )]
    NoMatchingPayload {
        url: String,
        expected: String,
        actual: String,
        #[source]
        full: Box<UpdateError>,
    },
    #[error("{url} is not a full payload")]
    NotFull { url: String },
    #[error("reading the booted slot")]
    BootedRead(#[source] std::io::Error),
    #[error("an update to {version} from {url} is in progress; cancel it first")]
    Busy { version: String, url: String },
    #[error(
        "the payload at {url} changed since this update started (manifest sha256 {now}, was {was})"
    )]
    PayloadChanged {
        url: String,
        was: String,
        now: String,
    },
    #[error("syncing slot")]
    Sync(#[source] std::io::Error),
    #[error(
        "staging stopped after operation {done} of {total}; the written part is kept \
         (`update-agent resume` or the same `stage` continues, `update-agent cancel` drops it)"
    )]
    Interrupted {
        done: usize,
        total: usize,
        #[source]
        source: ApplyError,
    },
    #[error("nothing to cancel: the agent is {0}")]
    NothingToCancel(&'static str),
    #[error(transparent)]
    PostBoot(#[from] crate::postboot::PostBootError),
    #[error("fetching channel {channel} from {url}")]
    ChannelFetch {
        channel: String,
        url: String,
        #[source]
        source: Box<FetchError>,
    },
    #[error("reading channel {channel} from {url}")]
    ChannelRead {
        channel: String,
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("channel {channel} from {url}")]
    Channel {
        channel: String,
        url: String,
        #[source]
        source: Box<crate::channel::ChannelError>,
    },
}

/// Fail points stop the process at a named step, like a power cut, for the kill tests.
/// Compiled in only with the `failpoints` feature.
pub(crate) fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("UPDATE_AGENT_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    let _ = name;
}

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

/// An opened, trusted payload: its byte source, the parsed payload, and the canonical
/// manifest bytes (whose sha256 identifies the attempt across restarts).
type Opened = (Box<dyn RangeSource>, Payload, Vec<u8>);

/// Where [`Agent::run`] starts: the first operation to write, and where an earlier
/// read-back stood when every operation was already written.
#[derive(Debug, Default, Clone, Copy)]
struct Start {
    op: usize,
    read_back: Option<crate::midstate::Mark>,
}

/// The agent's handle on this node.
pub struct Agent {
    pub cfg: Config,
    pub layout: SlotLayout,
    pub(crate) boot: Box<dyn BootControl>,
    pub(crate) store: StateStore,
    pub(crate) history: crate::history::History,
    keys: TrustedKeys,
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
        let keys = TrustedKeys::load_dir(&cfg.keys_dir).map_err(UpdateError::Keys)?;
        let store = StateStore::new(&cfg.state_dir);
        let history = crate::history::History::new(&cfg.state_dir);
        Ok(Self {
            cfg,
            layout,
            boot,
            store,
            history,
            keys,
        })
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

    /// Fetches and checks the channel document `name` under the release directory
    /// `base` (signature, expiry, channel name, product line).
    pub fn open_channel(
        &self,
        base: &str,
        name: &str,
    ) -> Result<crate::channel::Channel, UpdateError> {
        use crate::channel::{self, ChannelError};
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
        crate::channel::Channel::open(&buf, &self.keys, name, &self.cfg.compatible, timefmt::now())
            .map_err(ctx)
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

    /// Opens the payload at `url` and applies every policy check that does not need
    /// the slot (signature, expiry, compatible, version rules); writes nothing.
    pub fn check(&self, url: &str, allow_downgrade: bool) -> Result<Checked, UpdateError> {
        let (src, p, _) = self.open_checked(url, allow_downgrade)?;
        let m = &p.manifest;
        Ok(Checked {
            url: url.to_owned(),
            version: m.version.clone(),
            delta: m.is_delta(),
            download_bytes: src.size(),
        })
    }

    /// Opens a payload and applies every policy check that does not need the slot.
    fn open_checked(&self, url: &str, allow_downgrade: bool) -> Result<Opened, UpdateError> {
        self.check_opened(fetch::open(url, &self.cfg.fetch)?, allow_downgrade)
    }

    /// Reopens the payload of an interrupted staging, from its kept head when there is
    /// one (verified again like a fetched one) and from the network otherwise.
    fn reopen(&self, s: &Staging) -> Result<Opened, UpdateError> {
        if let Some(kept) = Partials::kept_head(&self.cfg.state_dir, &s.manifest_sha256) {
            let opened = fetch::open_kept(&s.url, &self.cfg.fetch, Some(kept))
                .map_err(UpdateError::from)
                .and_then(|src| self.check_opened(src, true));
            match opened {
                Ok(o) if hex::encode(Sha256::digest(&o.2)) == s.manifest_sha256 => return Ok(o),
                Ok(_) => tracing::warn!(
                    "the kept payload head is of another manifest; fetching it again"
                ),
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "the kept payload head did not open; fetching it again")
                }
            }
        }
        self.open_checked(&s.url, true)
    }

    fn check_opened(
        &self,
        src: Box<dyn RangeSource>,
        allow_downgrade: bool,
    ) -> Result<Opened, UpdateError> {
        let p = Payload::open(
            src.as_ref(),
            Trust::Keys {
                keys: &self.keys,
                now: timefmt::now(),
            },
        )?;
        let m = &p.manifest;
        if m.compatible != self.cfg.compatible {
            return Err(UpdateError::Incompatible {
                payload: m.compatible.clone(),
                node: self.cfg.compatible.clone(),
            });
        }
        match self.running_version() {
            Some(running) => {
                if !allow_downgrade && crate::version::compare(&m.version, &running).is_lt() {
                    return Err(UpdateError::Downgrade {
                        from: running,
                        to: m.version.clone(),
                    });
                }
                if let Some(min) = &m.min_source_version {
                    if crate::version::compare(&running, min).is_lt() {
                        return Err(UpdateError::SourceTooOld {
                            to: m.version.clone(),
                            minimum: min.clone(),
                            running,
                        });
                    }
                }
            }
            None if allow_downgrade => {}
            None => {
                return Err(UpdateError::UnknownRunning {
                    path: self.cfg.os_release.clone(),
                })
            }
        }
        let manifest_bytes = codec::encode(m);
        Ok((src, p, manifest_bytes))
    }

    /// Stages the release at `url` into the inactive slot and arms the bootloader.
    pub fn stage(
        &mut self,
        url: &str,
        allow_downgrade: bool,
        cancel: Option<&AtomicBool>,
        on: &mut dyn FnMut(Progress),
    ) -> Result<(), UpdateError> {
        self.stage_as(&attempt_id(), url, allow_downgrade, cancel, on)
    }

    /// [`Agent::stage`] under a caller-chosen attempt id (the API's operation id).
    pub fn stage_as(
        &mut self,
        attempt: &str,
        url: &str,
        allow_downgrade: bool,
        cancel: Option<&AtomicBool>,
        on: &mut dyn FnMut(Progress),
    ) -> Result<(), UpdateError> {
        let lock = self.store.lock()?;
        let state = self.store.load()?;
        if let State::Staging(s) = &state {
            if s.url == url {
                drop(lock);
                return self.resume(cancel, on);
            }
            return Err(UpdateError::Busy {
                version: s.version.clone(),
                url: s.url.clone(),
            });
        }
        let opened = self.open_checked(url, allow_downgrade)?;
        let booted = self.layout.open_booted()?;
        let source = opened.1.manifest.source.clone();
        let result = self.start(&lock, state, attempt, url, &opened, &booted, cancel, on);
        // The booted slot is not hashed up front (that would cost a full read of it on
        // every update): every operation's output is verified anyway. Only when a delta
        // fails on its content is the slot checked, and a delta built from another
        // image gives way to the full payload beside it.
        let (Err(UpdateError::Apply(e)), Some(source)) = (&result, source) else {
            return result;
        };
        if !e.is_content_error() {
            return result;
        }
        let actual = apply::hash_source(&booted, source.size).map_err(UpdateError::BootedRead)?;
        if actual == source.sha256 {
            return result;
        }
        let full_url = sibling_full(url, &opened.1.manifest.version);
        match self.open_checked(&full_url, allow_downgrade) {
            Ok(full) if !full.1.manifest.is_delta() => {
                let state = self.store.load()?;
                self.start(&lock, state, attempt, &full_url, &full, &booted, cancel, on)
            }
            other => Err(UpdateError::NoMatchingPayload {
                url: url.to_owned(),
                expected: hex::encode(source.sha256),
                actual: hex::encode(actual),
                full: Box::new(match other {
                    Err(e) => e,
                    Ok(_) => UpdateError::NotFull { url: full_url },
                }),
            }),
        }
    }

    /// Size check, exclusive open, slot unbootable, state Staging, then the write.
    #[allow(clippy::too_many_arguments)]
    fn start(
        &mut self,
        lock: &UpdateLock,
        mut state: State,
        attempt: &str,
        url: &str,
        (src, p, mbytes): &Opened,
        booted: &dyn SourceSlot,
        cancel: Option<&AtomicBool>,
        on: &mut dyn FnMut(Progress),
    ) -> Result<(), UpdateError> {
        let slot = self.layout.inactive();
        let slot_size = self.layout.partition(slot).size;
        if p.manifest.target_size > slot_size {
            return Err(UpdateError::TargetTooLarge {
                version: p.manifest.version.clone(),
                size: p.manifest.target_size,
                slot,
                slot_size,
            });
        }
        let writer = self.layout.open_inactive()?;
        // From here on a half-written slot can never be chosen by the bootloader.
        self.boot.mark_unbootable(slot)?;
        self.store.set_image(lock, slot, None)?;
        failpoint("after-mark-unbootable");
        state.begin(Staging {
            attempt: attempt.to_owned(),
            version: p.manifest.version.clone(),
            url: url.to_owned(),
            manifest_sha256: hex::encode(Sha256::digest(mbytes)),
            slot,
            ops_total: p.manifest.operations.len(),
            ops_done: 0,
            bytes_total: p.manifest.target_size,
            bytes_done: 0,
            bytes_fetched: p.head_len(),
            started: timefmt::now(),
            from_version: self.running_version(),
            read_back: None,
        })?;
        self.store.save(lock, &state)?;
        if let State::Staging(s) = &state {
            tracing::info!(release = %s.version, slot = %slot, phase = "staging", attempt = %s.attempt, url = %s.url, "staging started");
        }
        failpoint("after-begin");
        self.run(
            lock,
            state,
            src.as_ref(),
            p,
            booted,
            writer,
            Start::default(),
            cancel,
            on,
        )
    }

    /// Carries on with whatever an earlier process left: an interrupted staging, or a
    /// staged release whose bootloader arming did not complete. A no-op otherwise.
    pub fn resume(
        &mut self,
        cancel: Option<&AtomicBool>,
        on: &mut dyn FnMut(Progress),
    ) -> Result<(), UpdateError> {
        let lock = self.store.lock()?;
        let mut state = self.store.load()?;
        match state.clone() {
            State::Staging(s) => {
                let (src, p, mbytes) = self.reopen(&s)?;
                let now = hex::encode(Sha256::digest(&mbytes));
                if now != s.manifest_sha256 {
                    let e = UpdateError::PayloadChanged {
                        url: s.url.clone(),
                        was: s.manifest_sha256.clone(),
                        now,
                    };
                    state.fail(format!("{e}"), timefmt::now())?;
                    self.store.save(&lock, &state)?;
                    return Err(e);
                }
                let booted = self.layout.open_booted()?;
                let writer = self.layout.open_inactive()?;
                self.boot.mark_unbootable(s.slot)?;
                // The checkpoint is taken at its word here, and the read-back of the
                // whole slot at the end checks it: a slot changed under the checkpoint
                // fails that, and only then are the operations hashed one by one to
                // find where to rewrite from (`run`). Hashing them first at every start
                // would read the slot twice, and a node killed every few seconds might
                // never get through both.
                let read_back = s.read_back.as_ref().and_then(|r| {
                    crate::midstate::Mark::from_hex(r.offset, &r.sha256_state)
                        .inspect_err(|e| tracing::warn!(error = %e, "the read-back starts again from byte 0"))
                        .ok()
                });
                match &read_back {
                    Some(m) => {
                        tracing::info!(release = %s.version, slot = %s.slot, phase = "staging", attempt = %s.attempt, "resuming the staging of {}: every operation is written; reading the slot back from byte {}", s.version, m.len)
                    }
                    None => {
                        tracing::info!(release = %s.version, slot = %s.slot, phase = "staging", attempt = %s.attempt, "resuming the staging of {} at operation {} of {}", s.version, s.ops_done, s.ops_total)
                    }
                }
                self.run(
                    &lock,
                    state,
                    src.as_ref(),
                    &p,
                    &booted,
                    writer,
                    Start {
                        op: s.ops_done,
                        read_back,
                    },
                    cancel,
                    on,
                )
            }
            State::Staged(st) => {
                self.prepare_boot(st.slot, &st.version)?;
                self.boot.arm_trial(st.slot, self.cfg.boot.tries)?;
                failpoint("after-arm");
                state.armed(self.cfg.boot.tries)?;
                self.store.save(&lock, &state)?;
                on(Progress::Armed {
                    slot: st.slot,
                    version: st.version,
                    tries: self.cfg.boot.tries,
                });
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Hands the bootloader what it needs from the verified release in `slot` (for
    /// systemd-boot, its kernel): mounts the slot read-only for the call, always
    /// unmounts. Skipped when an earlier run already armed the slot (see
    /// [`crate::boot::needs_prepare`]).
    fn prepare_boot(&mut self, slot: crate::slots::Slot, version: &str) -> Result<(), UpdateError> {
        tracing::info!(release = %version, slot = %slot, phase = "arming", "arming the bootloader: {version} on slot {slot}");
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

    /// Drops a staging, staged or armed release: its slot is marked unbootable (an
    /// armed trial is disarmed) and the state says cancelled.
    pub fn cancel(&mut self) -> Result<crate::slots::Slot, UpdateError> {
        let lock = self.store.lock()?;
        let mut state = self.store.load()?;
        let (slot, version, from_version, bytes_fetched) = match &state {
            State::Staging(s) => (
                s.slot,
                s.version.clone(),
                s.from_version.clone(),
                s.bytes_fetched,
            ),
            State::Staged(s) | State::Armed { staged: s, .. } => (
                s.slot,
                s.version.clone(),
                s.from_version.clone(),
                s.bytes_fetched,
            ),
            other => return Err(UpdateError::NothingToCancel(other.name())),
        };
        self.boot.mark_unbootable(slot)?;
        state.cancel(timefmt::now())?;
        self.store.save(&lock, &state)?;
        self.drop_partials();
        crate::emit!(tracing::Level::WARN, crate::events::UPDATE_CANCELLED, update_agent_release = %version, update_agent_slot = %slot, "update to {version} cancelled");
        self.history.record(crate::history::Entry {
            version,
            from_version,
            slot,
            outcome: crate::history::Outcome::Cancelled,
            reason: String::new(),
            bytes_fetched,
            at: timefmt::now(),
            cause: None,
        })?;
        Ok(slot)
    }

    /// Removes the kept frames of an attempt that ended; a leftover only costs space
    /// until the next staging opens the store, so a failure is logged, not returned.
    fn drop_partials(&self) {
        if let Err(e) = Partials::remove_all(&self.cfg.state_dir) {
            tracing::warn!(error = %e, "cannot remove the kept partial downloads");
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        lock: &UpdateLock,
        mut state: State,
        src: &dyn RangeSource,
        p: &Payload,
        booted: &dyn SourceSlot,
        mut writer: SlotWriter,
        start: Start,
        cancel: Option<&AtomicBool>,
        on: &mut dyn FnMut(Progress),
    ) -> Result<(), UpdateError> {
        let m: &Manifest = &p.manifest;
        let slot = writer.slot();
        // A second handle on the device: fsync through it flushes the writes made
        // through the first, while the apply engine holds that one.
        let sync_handle: File = writer.try_clone_file().map_err(UpdateError::Sync)?;
        let (mut bytes_done, mut fetched) = match &state {
            State::Staging(s) => (s.bytes_done, s.bytes_fetched),
            _ => (0, 0),
        };
        on(Progress::Opened {
            version: m.version.clone(),
            delta: m.is_delta(),
            ops: m.operations.len(),
            bytes: m.target_size,
            resumed_at: start.op,
        });
        let mut ops_written = start.op;
        let mut checkpoint_err: Option<UpdateError> = None;
        let every = std::time::Duration::from_millis(self.cfg.apply.checkpoint_ms);
        let partials = match &state {
            State::Staging(s) => Partials::open(&self.cfg.state_dir, &s.manifest_sha256, every)
                .inspect_err(|e| tracing::warn!(error = %error_chain(e), "partial downloads are not kept across restarts"))
                .ok(),
            _ => None,
        };
        if let Some(parts) = partials.as_ref().filter(|_| src.is_remote()) {
            let mut head = vec![0u8; p.head_len() as usize];
            // Served from what the opening request brought: no second request.
            if src.read_range(0, &mut head).is_ok() {
                parts.keep_head(src.size(), &head);
            }
        }
        let in_flight = || partials.as_ref().map_or(0, Partials::in_flight);
        let every_bytes = self.cfg.apply.checkpoint_bytes;
        let every_fetched = self.cfg.apply.checkpoint_fetched_bytes;
        let mut start = start;
        // Resumed past the first operation: the slot's prefix was taken on the word of
        // a checkpoint, and a failed read-back rechecks it once before it counts.
        let mut recheck = start.op > 0;
        let result = loop {
            let opts = apply::Options {
                start_op: start.op,
                workers: self.cfg.fetch.parallel,
                memory_budget: self.cfg.apply.memory_budget,
                cancel,
                check_zero_digests: false,
                partial: partials.as_ref(),
                read_back_from: start.read_back,
            };
            let mut last = Instant::now();
            let (mut since, mut fetched_since) = (0u64, 0u64);
            let r = apply::apply(
                m,
                Blob {
                    source: src,
                    offset: p.blob_offset,
                },
                Some(booted),
                &mut writer,
                &opts,
                &mut |e| match e {
                    Event::OpDone {
                        op,
                        bytes,
                        fetched: f,
                        ..
                    } => {
                        ops_written = op + 1;
                        bytes_done += bytes;
                        fetched += f;
                        since += bytes;
                        fetched_since += f;
                        on(Progress::Op {
                            done: op + 1,
                            total: m.operations.len(),
                            bytes_done,
                            bytes_fetched: fetched,
                            in_flight: in_flight(),
                        });
                        if checkpoint_err.is_none()
                            && (since >= every_bytes
                                || fetched_since >= every_fetched
                                || last.elapsed() >= every)
                        {
                            let r = sync_handle
                                .sync_all()
                                .map_err(UpdateError::Sync)
                                .and_then(|()| Ok(state.progress(op + 1, bytes_done, fetched)?))
                                .and_then(|()| Ok(self.store.save(lock, &state)?));
                            match r {
                                Err(e) => checkpoint_err = Some(e),
                                // Durable in the slot now: their kept frames are not needed.
                                Ok(()) => {
                                    if let Some(p) = &partials {
                                        p.keep_from(op + 1);
                                    }
                                }
                            }
                            failpoint("after-checkpoint");
                            since = 0;
                            fetched_since = 0;
                            last = Instant::now();
                        }
                    }
                    Event::Fetching { op, received } => on(Progress::Op {
                        done: op,
                        total: m.operations.len(),
                        bytes_done,
                        bytes_fetched: fetched,
                        in_flight: received,
                    }),
                    Event::Verifying => {
                        on(Progress::Verifying);
                        // The engine has flushed the slot: every operation is durable,
                        // and the read-back's marks can be recorded from here on.
                        if checkpoint_err.is_none() && ops_written > start.op {
                            let r = state
                                .progress(ops_written, bytes_done, fetched)
                                .map_err(UpdateError::from)
                                .and_then(|()| Ok(self.store.save(lock, &state)?));
                            match r {
                                Err(e) => checkpoint_err = Some(e),
                                Ok(()) => {
                                    if let Some(p) = &partials {
                                        p.keep_from(ops_written);
                                    }
                                }
                            }
                        }
                        last = Instant::now();
                    }
                    Event::ReadBack(mark) => {
                        if checkpoint_err.is_none() && last.elapsed() >= every {
                            let r = state
                                .read_back(crate::state::ReadBack {
                                    offset: mark.len,
                                    sha256_state: mark.state_hex(),
                                })
                                .map_err(UpdateError::from)
                                .and_then(|()| Ok(self.store.save(lock, &state)?));
                            if let Err(e) = r {
                                checkpoint_err = Some(e);
                            }
                            failpoint("after-read-back-mark");
                            last = Instant::now();
                        }
                    }
                },
            );
            match r {
                Err(ApplyError::TargetHashMismatch { .. }) if recheck => {
                    recheck = false;
                    let good = apply::verified_prefix(m, &mut writer, m.operations.len())?;
                    tracing::warn!(release = %m.version, slot = %slot, phase = "staging", "the slot did not read back as the checkpoint said (changed while the agent was down?); rewriting from operation {good} of {}", m.operations.len());
                    if good == m.operations.len() {
                        break r;
                    }
                    bytes_done = op_bytes(m, good);
                    state.rewind(good, bytes_done)?;
                    self.store.save(lock, &state)?;
                    ops_written = good;
                    start = Start {
                        op: good,
                        read_back: None,
                    };
                }
                r => break r,
            }
        };
        if let Some(e) = checkpoint_err {
            return Err(e);
        }
        if let Err(e) = result {
            if let ApplyError::Fetch { .. } = e {
                // The network gave out (after its retries): keep what is written. The
                // attempt stays Staging, so a resume continues from here instead of
                // downloading everything again.
                sync_handle.sync_all().map_err(UpdateError::Sync)?;
                state.progress(ops_written, bytes_done, fetched)?;
                self.store.save(lock, &state)?;
                if let Some(p) = &partials {
                    p.keep_from(ops_written);
                }
                return Err(UpdateError::Interrupted {
                    done: ops_written,
                    total: m.operations.len(),
                    source: e,
                });
            }
            let cancelled = matches!(e, ApplyError::Cancelled { .. });
            let reason = if cancelled {
                String::new()
            } else {
                error_chain(&e)
            };
            if cancelled {
                state.cancel(timefmt::now())?;
            } else {
                state.fail(reason.clone(), timefmt::now())?;
            }
            self.store.save(lock, &state)?;
            self.drop_partials();
            tracing::warn!(release = %m.version, slot = %slot, phase = if cancelled { "cancelled" } else { "failed" }, reason = %reason, "staging ended without a staged release");
            if cancelled {
                crate::emit!(tracing::Level::WARN, crate::events::UPDATE_CANCELLED, update_agent_release = %m.version, update_agent_slot = %slot, "staging {} cancelled", m.version);
            } else {
                crate::emit!(tracing::Level::ERROR, crate::events::UPDATE_FAILED, update_agent_release = %m.version, update_agent_slot = %slot, update_agent_reason = %reason, "staging {} failed: {reason}", m.version);
            }
            self.history.record(crate::history::Entry {
                version: m.version.clone(),
                from_version: self.running_version(),
                slot,
                outcome: if cancelled {
                    crate::history::Outcome::Cancelled
                } else {
                    crate::history::Outcome::Failed
                },
                reason,
                bytes_fetched: fetched,
                at: timefmt::now(),
                cause: None,
            })?;
            return Err(e.into());
        }
        failpoint("after-apply");
        state.progress(m.operations.len(), m.target_size, fetched)?;
        state.staged(hex::encode(m.target_sha256))?;
        self.store.save(lock, &state)?;
        drop(partials);
        self.drop_partials();
        self.store.set_image(
            lock,
            slot,
            Some(crate::state::SlotImage {
                version: m.version.clone(),
                sha256: hex::encode(m.target_sha256),
            }),
        )?;
        failpoint("after-staged");
        // Release the exclusive hold on the slot: the bootloader may need to mount it.
        drop(writer);
        drop(sync_handle);
        self.prepare_boot(slot, &m.version)?;
        self.boot.arm_trial(slot, self.cfg.boot.tries)?;
        failpoint("after-arm");
        state.armed(self.cfg.boot.tries)?;
        self.store.save(lock, &state)?;
        tracing::info!(release = %m.version, slot = %slot, phase = "armed", tries = self.cfg.boot.tries, bytes_fetched = fetched, "release staged and verified; bootloader armed for a trial boot");
        on(Progress::Armed {
            slot,
            version: m.version.clone(),
            tries: self.cfg.boot.tries,
        });
        Ok(())
    }
}

/// `…/2.0.from-abcd.uap` → `…/2.0.full.uap`: the publisher's naming (`bundle create`).
/// Output bytes of the first `ops` operations of `m`.
fn op_bytes(m: &Manifest, ops: usize) -> u64 {
    let bs = u64::from(m.block_size);
    m.operations[..ops]
        .iter()
        .flat_map(|op| &op.dst)
        .map(|e| e.blocks * bs)
        .sum()
}

fn sibling_full(url: &str, version: &str) -> String {
    match url.rfind('/') {
        Some(i) => format!("{}/{version}.full.uap", &url[..i]),
        None => format!("{version}.full.uap"),
    }
}

/// What [`Agent::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub url: String,
    pub version: String,
    pub delta: bool,
    /// Bytes fetched at most: the head and every blob (reused blocks cost less).
    pub download_bytes: u64,
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

/// A fresh attempt (operation) id: time and randomness, short enough to type.
pub fn attempt_id() -> String {
    format!("{:x}-{:04x}", timefmt::now(), rand::random::<u16>())
}

/// The whole error chain in one line, for the persistent record.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn sibling_full_url() {
        assert_eq!(
            super::sibling_full("http://h/p/2.0.from-ab.uap", "2.0"),
            "http://h/p/2.0.full.uap"
        );
        assert_eq!(
            super::sibling_full("2.0.from-ab.uap", "2.0"),
            "2.0.full.uap"
        );
    }
}
