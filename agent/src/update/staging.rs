//! Staging: start (size check, exclusive open, slot unbootable, state Staging, then
//! the write in `run.rs`), resume after a crash, and cancel.

use std::sync::atomic::AtomicBool;

use sha2::{Digest, Sha256};

use crate::apply::{self, SourceSlot};
use crate::state::{Staging, State, UpdateLock};
use crate::timefmt;

use super::admit::Opened;
use super::helpers::sibling_full;
use super::run::{Caller, Start, Write};
use super::{attempt_id, failpoint, Agent, Progress, UpdateError};

/// The attempt [`Agent::start`] begins: its id, and the payload opened from `url`.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    id: &'a str,
    url: &'a str,
    opened: &'a Opened,
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
        self.stage_as(&attempt_id(), url, None, allow_downgrade, cancel, on)
    }

    /// [`Agent::stage`] under a caller-chosen attempt id (the API's operation id), with
    /// the payload's head when a check just fetched it ([`Checked::head`]).
    pub fn stage_as(
        &mut self,
        attempt: &str,
        url: &str,
        head: Option<(u64, Vec<u8>)>,
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
        let opened = self.open_checked(url, allow_downgrade, head)?;
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
        match self.open_checked(&full_url, allow_downgrade, None) {
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
        // The image and its tree fit the slot: checked when the payload was opened.
        let slot = self.layout.inactive();
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
                    // With a dm-verity tree the mark is its offset alone (level 0 is
                    // on the slot up to it); the state words are not used.
                    match p.manifest.verity {
                        Some(_) => crate::midstate::Mark::offset_only(r.offset),
                        None => crate::midstate::Mark::from_hex(r.offset, &r.sha256_state),
                    }
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "the read-back starts again from byte 0"),
                    )
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
            boot: None,
        })?;
        Ok(slot)
    }
}
