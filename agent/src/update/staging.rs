//! Staging: start (size check, exclusive open, slot unbootable, state Staging), the
//! write with its checkpoints (`run`), resume after a crash, and cancel.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::apply::{self, ApplyError, Blob, Event, SourceSlot};
use crate::partial::Partials;
use crate::payload::{Manifest, Payload, RangeSource};
use crate::slots::SlotWriter;
use crate::state::{Staging, State, UpdateLock};
use crate::timefmt;

use super::admit::Opened;
use super::helpers::sibling_full;
use super::{attempt_id, error_chain, failpoint, Agent, Progress, UpdateError};

/// Where [`Agent::run`] starts: the first operation to write, and where an earlier
/// read-back stood when every operation was already written.
#[derive(Debug, Default, Clone, Copy)]
struct Start {
    op: usize,
    read_back: Option<crate::midstate::Mark>,
}

/// What the caller of a staging hands it: a flag that cancels it, and where its
/// progress goes.
struct Caller<'a> {
    cancel: Option<&'a AtomicBool>,
    on: &'a mut dyn FnMut(Progress),
}

/// The attempt [`Agent::start`] begins: its id, and the payload opened from `url`.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    id: &'a str,
    url: &'a str,
    opened: &'a Opened,
}

/// The write [`Agent::run`] carries out: the payload's operations, with the booted
/// slot as their source, into the inactive slot, from `start` on.
struct Write<'a> {
    src: &'a dyn RangeSource,
    p: &'a Payload,
    booted: &'a dyn SourceSlot,
    writer: SlotWriter,
    start: Start,
}

impl Agent {
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
        let result = self.start(
            &lock,
            state,
            Attempt {
                id: attempt,
                url,
                opened: &opened,
            },
            &booted,
            Caller {
                cancel,
                on: &mut *on,
            },
        );
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
                let attempt = Attempt {
                    id: attempt,
                    url: &full_url,
                    opened: &full,
                };
                self.start(&lock, state, attempt, &booted, Caller { cancel, on })
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
    fn start(
        &mut self,
        lock: &UpdateLock,
        mut state: State,
        attempt: Attempt<'_>,
        booted: &dyn SourceSlot,
        caller: Caller<'_>,
    ) -> Result<(), UpdateError> {
        let Attempt {
            id: attempt,
            url,
            opened: (src, p, mbytes),
        } = attempt;
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
        let write = Write {
            src: src.as_ref(),
            p,
            booted,
            writer,
            start: Start::default(),
        };
        self.run(lock, state, write, caller)
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
                let write = Write {
                    src: src.as_ref(),
                    p: &p,
                    booted: &booted,
                    writer,
                    start: Start {
                        op: s.ops_done,
                        read_back,
                    },
                };
                self.run(&lock, state, write, Caller { cancel, on })
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

    fn run(
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

/// Output bytes of the first `ops` operations of `m`.
fn op_bytes(m: &Manifest, ops: usize) -> u64 {
    let bs = u64::from(m.block_size);
    m.operations[..ops]
        .iter()
        .flat_map(|op| &op.dst)
        .map(|e| e.blocks * bs)
        .sum()
}
