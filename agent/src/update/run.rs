//! The write with its checkpoints: the apply engine run into the inactive slot, the
//! state and kept frames checkpointed as operations land and as the read-back goes,
//! a slot changed under a checkpoint rewritten, and the attempt ended (staged and
//! armed, interrupted and kept, or cancelled or failed and recorded).

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::apply::{self, ApplyError, Blob, Event, SourceSlot};
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
        write: Write<'_>,
        caller: Caller<'_>,
    ) -> Result<(), UpdateError> {
        let Write {
            src,
            p,
            booted,
            mut writer,
            start,
        } = write;
        let Caller { cancel, on } = caller;
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
                            // The dm-verity tree's level 0 is written as far as the
                            // mark: durable first, or a resume would trust lost writes.
                            let synced = match m.verity {
                                Some(_) => sync_handle.sync_all().map_err(UpdateError::Sync),
                                None => Ok(()),
                            };
                            let r = synced
                                .and_then(|()| {
                                    Ok(state.read_back(crate::state::ReadBack {
                                        offset: mark.len,
                                        sha256_state: mark.state_hex(),
                                    })?)
                                })
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
                // A tree resumed from the slot did not come out right: level 0 as
                // written before the restart is not what it was. Build it all again once.
                Err(ApplyError::VerityRootMismatch { .. }) if start.read_back.is_some() => {
                    tracing::warn!(release = %m.version, slot = %slot, phase = "staging", "the dm-verity tree resumed from the slot has the wrong root; building it again from the start");
                    start.read_back = None;
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
            self.end_unstaged(lock, &mut state, m, slot, fetched, &e)?;
            return Err(e.into());
        }
        failpoint("after-apply");
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
        self.store.save(lock, &state)?;
        drop(partials);
        self.drop_partials();
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
        })?;
        Ok(())
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
