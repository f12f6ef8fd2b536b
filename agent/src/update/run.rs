//! The write with its checkpoints: the apply engine run into the inactive slot, the
//! state and kept frames checkpointed as operations land and as the read-back goes,
//! a slot changed under a checkpoint rewritten, and the attempt ended (staged and
//! armed, interrupted and kept, or cancelled or failed and recorded).

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crate::apply::{self, ApplyError, Blob, Event, SourceSlot};
use crate::midstate::Mark;
use crate::partial::Partials;
use crate::payload::{Manifest, Payload, RangeSource};
use crate::slots::{Slot, SlotWriter};
use crate::state::{State, UpdateLock};
use crate::timefmt;

use super::{error_chain, failpoint, Agent, Progress, UpdateError};

/// Where [`Agent::run`] starts: the first operation to write, and where an earlier
/// read-back stood when every operation was already written.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Start {
    pub(super) op: usize,
    pub(super) read_back: Option<crate::midstate::Mark>,
}

/// What the caller of a staging hands it: a flag that cancels it, and where its
/// progress goes.
pub(super) struct Caller<'a> {
    pub(super) cancel: Option<&'a AtomicBool>,
    pub(super) on: &'a mut dyn FnMut(Progress),
}

/// The write [`Agent::run`] carries out: the payload's operations, with the booted
/// slot as their source, into the inactive slot, from `start` on.
pub(super) struct Write<'a> {
    pub(super) src: &'a dyn RangeSource,
    pub(super) p: &'a Payload,
    pub(super) booted: &'a dyn SourceSlot,
    pub(super) writer: SlotWriter,
    pub(super) start: Start,
}

impl Agent {
    /// Writes the payload into the slot, then verifies, records and arms it.
    pub(super) fn run(
        &mut self,
        lock: &UpdateLock,
        mut state: State,
        mut write: Write<'_>,
        caller: Caller<'_>,
    ) -> Result<(), UpdateError> {
        let Caller { cancel, on } = caller;
        let p = write.p;
        let m: &Manifest = &p.manifest;
        let slot = write.writer.slot();
        // A second handle on the device: fsync through it flushes the writes made
        // through the first, while the apply engine holds that one.
        let sync_handle: File = write.writer.try_clone_file().map_err(UpdateError::Sync)?;
        on(Progress::Opened {
            version: m.version.clone(),
            delta: m.is_delta(),
            ops: m.operations.len(),
            bytes: m.target_size,
            resumed_at: write.start.op,
        });
        let partials = self.open_partials(&state, write.src, p);
        let mut ck = Checkpoints::new(
            self,
            lock,
            &mut state,
            &sync_handle,
            partials.as_ref(),
            on,
            &write,
        );
        let applied = self.write_slot(&mut ck, &mut write, cancel)?;
        if let Some(e) = ck.err.take() {
            return Err(e);
        }
        let fetched = ck.fetched;
        if let Err(e) = applied {
            if let ApplyError::Fetch { .. } = e {
                // The network gave out (after its retries): keep what is written. The
                // attempt stays Staging, so a resume continues from here instead of
                // downloading everything again.
                return Err(ck.interrupted(e));
            }
            self.end_unstaged(lock, &mut state, m, slot, fetched, &e)?;
            return Err(e.into());
        }
        failpoint("after-apply");
        self.record_staged(lock, &mut state, m, slot, fetched)?;
        drop(partials);
        self.drop_partials();
        failpoint("after-staged");
        // Release the exclusive hold on the slot: the bootloader may need to mount it.
        drop(write);
        drop(sync_handle);
        self.arm(lock, &mut state, m, slot, fetched, on)
    }

    /// The kept frames of this payload (none if the state directory refuses them, or
    /// when not staging), with the payload's verified head kept beside them.
    fn open_partials(&self, state: &State, src: &dyn RangeSource, p: &Payload) -> Option<Partials> {
        let every = Duration::from_millis(self.cfg.apply.checkpoint_ms);
        let partials = match state {
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
        partials
    }

    /// Runs the engine from `w.start`, and once more from where the slot is good after
    /// a failed read-back of a resumed slot, or from the start of the dm-verity tree
    /// when every operation holds but a resumed tree's root is wrong. The outer error
    /// is a rewind that could not be recorded; the inner one is the engine's.
    fn write_slot(
        &self,
        ck: &mut Checkpoints<'_>,
        w: &mut Write<'_>,
        cancel: Option<&AtomicBool>,
    ) -> Result<Result<apply::Report, ApplyError>, UpdateError> {
        let m = &w.p.manifest;
        let slot = w.writer.slot();
        let mut start = w.start;
        // Resumed past the first operation: the slot's prefix was taken on the word of
        // a checkpoint, and a failed read-back rechecks it once before it counts.
        let mut recheck = start.op > 0;
        loop {
            let r = self.apply_pass(ck, w, cancel, start);
            match r {
                // The slot did not read back as the checkpoint and the mark said. The
                // operations are hashed one by one first: a changed one is rewritten
                // from there (the rewind is recorded, so a restart does not repeat
                // this). When all hold, and the read-back had resumed a dm-verity tree,
                // its level 0 as written before the restart is what changed: built
                // again from byte 0, once.
                Err(
                    ApplyError::TargetHashMismatch { .. } | ApplyError::VerityRootMismatch { .. },
                ) if recheck => {
                    recheck = false;
                    let good = apply::verified_prefix(m, &mut w.writer, m.operations.len())?;
                    if good == m.operations.len() {
                        let tree = matches!(r, Err(ApplyError::VerityRootMismatch { .. }));
                        if !(tree && start.read_back.is_some()) {
                            return Ok(r);
                        }
                        tracing::warn!(release = %m.version, slot = %slot, phase = "staging", "the dm-verity tree resumed from the slot has the wrong root; building it again from the start");
                        start.read_back = None;
                        continue;
                    }
                    tracing::warn!(release = %m.version, slot = %slot, phase = "staging", "the slot did not read back as the checkpoint said (changed while the agent was down?); rewriting from operation {good} of {}", m.operations.len());
                    ck.rewind(good)?;
                    start = Start {
                        op: good,
                        read_back: None,
                    };
                }
                r => return Ok(r),
            }
        }
    }

    /// One pass of the engine from `start`, its events counted and checkpointed by `ck`.
    fn apply_pass(
        &self,
        ck: &mut Checkpoints<'_>,
        w: &mut Write<'_>,
        cancel: Option<&AtomicBool>,
        start: Start,
    ) -> Result<apply::Report, ApplyError> {
        let opts = apply::Options {
            start_op: start.op,
            workers: self.cfg.fetch.parallel,
            memory_budget: self.cfg.apply.memory_budget,
            cancel,
            check_zero_digests: false,
            partial: ck.partials,
            read_back_from: start.read_back,
        };
        ck.begin(start.op);
        apply::apply(
            &w.p.manifest,
            Blob {
                source: w.src,
                offset: w.p.blob_offset,
            },
            Some(w.booted),
            &mut w.writer,
            &opts,
            &mut |e| ck.event(e),
        )
    }

    /// Records the written and verified slot: its image (and tree), then the state
    /// says Staged.
    fn record_staged(
        &self,
        lock: &UpdateLock,
        state: &mut State,
        m: &Manifest,
        slot: Slot,
        fetched: u64,
    ) -> Result<(), UpdateError> {
        // The slot's image (and tree) before the state says Staged: a resumed Staged
        // run arms from this record, so it must never be missing then.
        self.store.set_image(
            lock,
            slot,
            Some(crate::state::SlotImage {
                version: m.version.clone(),
                sha256: hex::encode(m.target_sha256),
                verity: m.verity.as_ref().map(|v| crate::state::SlotVerity {
                    root_hash: hex::encode(v.root_hash),
                    hash_offset: v.hash_offset,
                }),
            }),
        )?;
        state.progress(m.operations.len(), m.target_size, fetched)?;
        state.staged(hex::encode(m.target_sha256))?;
        self.store.save(lock, state)?;
        Ok(())
    }

    /// Arms the staged slot for a trial boot, and says so.
    fn arm(
        &mut self,
        lock: &UpdateLock,
        state: &mut State,
        m: &Manifest,
        slot: Slot,
        fetched: u64,
        on: &mut dyn FnMut(Progress),
    ) -> Result<(), UpdateError> {
        self.prepare_boot(slot, &m.version)?;
        self.boot.arm_trial(slot, self.cfg.boot.tries)?;
        failpoint("after-arm");
        state.armed(self.cfg.boot.tries)?;
        self.store.save(lock, state)?;
        tracing::info!(release = %m.version, slot = %slot, phase = "armed", tries = self.cfg.boot.tries, bytes_fetched = fetched, "release staged and verified; bootloader armed for a trial boot");
        on(Progress::Armed {
            slot,
            version: m.version.clone(),
            tries: self.cfg.boot.tries,
        });
        Ok(())
    }

    /// Records an attempt that ended without a staged release (cancelled, or failed
    /// on `e`): the state says so, the kept frames go, the journal and the history
    /// are told.
    fn end_unstaged(
        &mut self,
        lock: &UpdateLock,
        state: &mut State,
        m: &Manifest,
        slot: Slot,
        fetched: u64,
        e: &ApplyError,
    ) -> Result<(), UpdateError> {
        let cancelled = matches!(e, ApplyError::Cancelled { .. });
        let reason = if cancelled {
            String::new()
        } else {
            error_chain(e)
        };
        if cancelled {
            state.cancel(timefmt::now())?;
        } else {
            state.fail(reason.clone(), timefmt::now())?;
        }
        self.store.save(lock, state)?;
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
            boot: None,
        })?;
        Ok(())
    }
}

/// The checkpoint bookkeeping of a run: what is written and fetched so far, what has
/// landed since the last checkpoint, and the first checkpoint that failed (the write
/// goes on without checkpoints, and the run ends with that error).
struct Checkpoints<'r> {
    agent: &'r Agent,
    lock: &'r UpdateLock,
    state: &'r mut State,
    /// The slot's second handle, fsynced before the state claims what it holds.
    sync: &'r File,
    partials: Option<&'r Partials>,
    on: &'r mut dyn FnMut(Progress),
    m: &'r Manifest,
    /// Where the engine's current pass started.
    start_op: usize,
    ops_written: usize,
    bytes_done: u64,
    fetched: u64,
    since: u64,
    fetched_since: u64,
    last: Instant,
    err: Option<UpdateError>,
}

impl<'r> Checkpoints<'r> {
    /// The bookkeeping of `write`, counting on from what the state says is done.
    fn new(
        agent: &'r Agent,
        lock: &'r UpdateLock,
        state: &'r mut State,
        sync: &'r File,
        partials: Option<&'r Partials>,
        on: &'r mut dyn FnMut(Progress),
        write: &Write<'r>,
    ) -> Self {
        let (bytes_done, fetched) = match &*state {
            State::Staging(s) => (s.bytes_done, s.bytes_fetched),
            _ => (0, 0),
        };
        Self {
            agent,
            lock,
            state,
            sync,
            partials,
            on,
            m: &write.p.manifest,
            start_op: write.start.op,
            ops_written: write.start.op,
            bytes_done,
            fetched,
            since: 0,
            fetched_since: 0,
            last: Instant::now(),
            err: None,
        }
    }

    fn every(&self) -> Duration {
        Duration::from_millis(self.agent.cfg.apply.checkpoint_ms)
    }

    /// A pass of the engine starts at operation `op`: nothing has landed since.
    fn begin(&mut self, op: usize) {
        self.start_op = op;
        self.since = 0;
        self.fetched_since = 0;
        self.last = Instant::now();
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::OpDone {
                op, bytes, fetched, ..
            } => self.op_done(op, bytes, fetched),
            Event::Fetching { op, received } => self.report(op, received),
            Event::Verifying => self.verifying(),
            Event::ReadBack(mark) => self.read_back(&mark),
        }
    }

    fn report(&mut self, done: usize, in_flight: u64) {
        (self.on)(Progress::Op {
            done,
            total: self.m.operations.len(),
            bytes_done: self.bytes_done,
            bytes_fetched: self.fetched,
            in_flight,
        });
    }

    /// Operation `op` is written: counted, reported, and checkpointed when enough
    /// bytes, fetched bytes or time have gone by since the last checkpoint.
    fn op_done(&mut self, op: usize, bytes: u64, fetched: u64) {
        self.ops_written = op + 1;
        self.bytes_done += bytes;
        self.fetched += fetched;
        self.since += bytes;
        self.fetched_since += fetched;
        let in_flight = self.partials.map_or(0, Partials::in_flight);
        self.report(op + 1, in_flight);
        let cfg = &self.agent.cfg.apply;
        if self.err.is_none()
            && (self.since >= cfg.checkpoint_bytes
                || self.fetched_since >= cfg.checkpoint_fetched_bytes
                || self.last.elapsed() >= self.every())
        {
            if let Err(e) = self.save_ops(op + 1, true) {
                self.err = Some(e);
            }
            failpoint("after-checkpoint");
            self.since = 0;
            self.fetched_since = 0;
            self.last = Instant::now();
        }
    }

    fn verifying(&mut self) {
        (self.on)(Progress::Verifying);
        tracing::info!(release = %self.m.version, phase = "verifying", dm_verity = self.m.verity.is_some(), "every operation written and flushed; reading the slot back");
        // The engine has flushed the slot: every operation is durable,
        // and the read-back's marks can be recorded from here on.
        if self.err.is_none() && self.ops_written > self.start_op {
            if let Err(e) = self.save_ops(self.ops_written, false) {
                self.err = Some(e);
            }
        }
        self.last = Instant::now();
    }

    /// The read-back has hashed the slot up to `mark`: recorded at most once per
    /// checkpoint interval.
    fn read_back(&mut self, mark: &Mark) {
        if self.err.is_some() || self.last.elapsed() < self.every() {
            return;
        }
        if let Err(e) = self.save_mark(mark) {
            self.err = Some(e);
        }
        failpoint("after-read-back-mark");
        self.last = Instant::now();
    }

    /// The state saved with `ops` operations done, after an fsync of the slot when
    /// `sync` (the state never claims bytes the device may not have).
    fn save_ops(&mut self, ops: usize, sync: bool) -> Result<(), UpdateError> {
        if sync {
            self.sync.sync_all().map_err(UpdateError::Sync)?;
        }
        self.state.progress(ops, self.bytes_done, self.fetched)?;
        self.agent.store.save(self.lock, self.state)?;
        // Durable in the slot now: their kept frames are not needed.
        if let Some(p) = self.partials {
            p.keep_from(ops);
        }
        Ok(())
    }

    fn save_mark(&mut self, mark: &Mark) -> Result<(), UpdateError> {
        // The dm-verity tree's level 0 is written as far as the mark: durable first,
        // or a resume would trust lost writes.
        if self.m.verity.is_some() {
            self.sync.sync_all().map_err(UpdateError::Sync)?;
        }
        self.state.read_back(crate::state::ReadBack {
            offset: mark.len,
            // A tree's read-back keeps no hash: nothing, which an older agent refuses
            // (and reads back from byte 0) instead of continuing a hash from zeros.
            sha256_state: if self.m.verity.is_some() {
                String::new()
            } else {
                mark.state_hex()
            },
        })?;
        self.agent.store.save(self.lock, self.state)?;
        Ok(())
    }

    /// Back to operation `good`, the first the slot does not hold as written: the
    /// counts and the state say so.
    fn rewind(&mut self, good: usize) -> Result<(), UpdateError> {
        self.bytes_done = op_bytes(self.m, good);
        self.state.rewind(good, self.bytes_done)?;
        self.agent.store.save(self.lock, self.state)?;
        self.ops_written = good;
        Ok(())
    }

    /// The engine's fetch gave out: what is written is kept (the slot fsynced, the
    /// state saved) and the attempt reported interrupted, or the error keeping it.
    fn interrupted(&mut self, e: ApplyError) -> UpdateError {
        match self.save_ops(self.ops_written, true) {
            Err(err) => err,
            Ok(()) => UpdateError::Interrupted {
                done: self.ops_written,
                total: self.m.operations.len(),
                source: e,
            },
        }
    }
}

/// Output bytes of the first `ops` operations of `m`.
fn op_bytes(m: &Manifest, ops: usize) -> u64 {
    let bs = u64::from(m.block_size);
    m.operations[..ops]
        .iter()
        .flat_map(|op| &op.dst)
        .map(|e| e.blocks * bs)
        .sum()
}
