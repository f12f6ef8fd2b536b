//! After the reboot: what happened, and commit or roll back.
//!
//! At every start the agent compares its persistent state with the slot that booted:
//!
//! | state | booted | means | does |
//! |---|---|---|---|
//! | Armed(b) | b | trial boot | health checks → commit, or RollingBack + reboot |
//! | Armed(b) | a | the bootloader fell back | RolledBack "the new slot did not boot", b unbootable |
//! | RollingBack(b→a) | a | the rollback reboot happened | RolledBack (b unbootable unless manual); points the bootloader at a again if an ESP repair undid it |
//! | RollingBack(b→a) | b | killed before the reboot | point the bootloader at a again, reboot |
//! | Staged(b), b bootable | any | the flip reached the disk, the state did not | as Armed(b) |
//! | Committed(b), b counted | b | the commit's write was undone (an ESP repair) | commit again |
//! | Committed(b), the bootloader's guard gave up on b | a | the committed slot stopped booting | RolledBack "slot b stopped booting" (cause stopped_booting, integrity named), a the default, b unbootable |
//! | anything else | — | a normal boot | nothing |
//!
//! Every boot that is not rolling back then sets the default's guard back
//! (`BootControl::guard_default`): the bootloader counts boots of the default and
//! falls back when they never reach this point (GRUB: `ua_boots`; systemd-boot: the
//! default's entry counted as `…@default+N.conf`, whose last boot already reads as a
//! fallback, so the running slot is named).
//!
//! The staged-but-bootable row: arming writes the bootloader first and the state second, so a
//! power cut between the two leaves a release the bootloader will try (and may be
//! running now) while the state says Staged. Only `arm_trial` makes a slot bootable
//! again once staging began (it starts by marking the slot unbootable), so a Staged
//! slot the bootloader calls bootable was armed: it is taken as Armed, and the trial
//! is judged (or its fallback recorded) like any other instead of being re-armed under
//! a running trial (found by VM lab scenario 5).
//!
//! Order keeps every interruption recoverable: the state says RollingBack *before* the
//! bootloader is pointed back, so an agent killed in between redoes the rollback on the
//! next start instead of mistaking the reboot for a bootloader fallback; a commit
//! killed between the bootloader and the state is redone (both steps are idempotent).
//! History comes after the state: an end state (Committed, RolledBack) carries what its
//! history entry needs, and every start records the entry if a power cut took it
//! between the two (found by VM lab scenario 5: a cut 50 ms into a commit left 6.0
//! committed and the history without it).

use std::time::Instant;

use crate::boot::BootStatus;
use crate::health::CheckResult;
use crate::history::{Entry, Outcome, RollbackCause};
use crate::slots::Slot;
use crate::state::State;
use crate::timefmt;
use crate::update::{failpoint, Agent, PostBootError, UpdateError};

mod last_words;

/// What `after_boot` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootOutcome {
    /// Nothing was pending.
    Normal,
    /// The trial release passed its checks and is the default now.
    Committed { version: String, slot: Slot },
    /// The trial failed; the old slot is the default again and the node must reboot.
    RollingBack {
        version: String,
        to: Slot,
        reason: String,
        checks: Vec<CheckResult>,
    },
    /// Running the old slot after a rollback (ours, or the bootloader's own fallback).
    RolledBack {
        version: String,
        slot: Slot,
        reason: String,
    },
}

impl Agent {
    /// Works out what happened across the reboot and acts on it. `checks` runs the
    /// health checks (only called on a trial boot).
    pub fn after_boot(
        &mut self,
        checks: &dyn Fn() -> Vec<CheckResult>,
    ) -> Result<BootOutcome, UpdateError> {
        let lock = self.store.lock()?;
        let outcome = self.judge_boot(&lock, checks)?;
        if !matches!(outcome, BootOutcome::RollingBack { .. }) {
            self.guard_default_boots();
        }
        self.mark_boot_checked();
        Ok(outcome)
    }

    fn judge_boot(
        &mut self,
        lock: &crate::state::UpdateLock,
        checks: &dyn Fn() -> Vec<CheckResult>,
    ) -> Result<BootOutcome, UpdateError> {
        let mut state = self.store.load()?;
        // Before anything is saved in this boot.
        let since = self.records_since(&state);
        let booted = self.layout.booted;
        let now = timefmt::now();
        let boot = self.boot.status()?;
        self.repair_after_cut(lock, &mut state, &boot)?;
        if let Some(fallen) = boot.fell_back_from.filter(|&f| f != booted) {
            return self.default_fell_over(lock, state, fallen, now, since);
        }
        match state.clone() {
            State::Armed { staged, .. } if booted == staged.slot => {
                self.trial_boot(lock, state, staged, checks, now)
            }
            State::Armed { staged, .. } => {
                // A trial was armed but the old slot runs: the bootloader gave up on the
                // new one (no kernel, panic, hang, a dm-verity error), whatever its
                // counter shows now. Whether the slot still holds what was verified
                // tells an integrity failure from a release that cannot boot.
                let lead = "the new slot did not boot";
                let reason = self.integrity_failure(staged.slot, lead);
                let reason = self.with_last_words(reason.unwrap_or_else(|| lead.into()), since);
                self.boot.rollback_to(booted)?;
                self.boot.mark_unbootable(staged.slot)?;
                state.rolled_back(booted, Some(reason), RollbackCause::DidNotBoot, now)?;
                self.store.save(lock, &state)?;
                self.record_rollback(&state, staged.from_version);
                Ok(rolled_back_outcome(&state))
            }
            State::RollingBack { .. } => self.rollback_rebooted(lock, state, &boot, now),
            State::Committed { version, slot, .. }
                if slot == booted && boot.trial.is_some_and(|(s, _)| s == booted) =>
            {
                // Committed, yet the bootloader still counts this slot's tries: the
                // commit's write was undone under the state (a torn systemd-boot rename
                // repaired by fsck.vfat back to its source). Left so, the tries would
                // run out and a committed release would quietly lose its default.
                tracing::warn!(release = %version, slot = %slot, "the running release is committed but the bootloader still counts its tries (a commit undone by a repair of the ESP?); committing it again");
                self.boot.commit(slot)?;
                Ok(BootOutcome::Normal)
            }
            _ => Ok(BootOutcome::Normal),
        }
    }

    /// What a power cut can leave behind, made whole before deciding: a bootloader
    /// armed under a state that still says staged, and an end the history missed.
    fn repair_after_cut(
        &mut self,
        lock: &crate::state::UpdateLock,
        state: &mut State,
        boot: &BootStatus,
    ) -> Result<(), UpdateError> {
        if armed_before_the_cut(state, boot) {
            tracing::warn!(slot = %self.layout.booted, phase = "armed", "the bootloader was armed but the state still said staged (power cut between the two); taking the release as armed");
            state.armed(self.cfg.boot.tries)?;
            self.store.save(lock, state)?;
        }
        if let Some(entry) = history_entry(state, None) {
            if self.record_history(entry) {
                tracing::warn!(state = state.name(), "the history did not have the last update's end (power cut between the state and the history); recorded it");
            }
        }
        Ok(())
    }

    /// The bootloader gave up on the default slot `fallen` (its guarded boots ran out
    /// without reaching the agent: a panic, a hang, a dm-verity error at every boot)
    /// and booted this slot, which it only does when this one is not marked unbootable.
    /// A committed release there is rolled back: state first, so a cut before the
    /// bootloader is pointed here finds the fallback again at the next boot (GRUB
    /// alternates the two slots until one reaches the agent).
    fn default_fell_over(
        &mut self,
        lock: &crate::state::UpdateLock,
        mut state: State,
        fallen: Slot,
        now: u64,
        since: std::time::SystemTime,
    ) -> Result<BootOutcome, UpdateError> {
        let booted = self.layout.booted;
        let lead = format!(
            "committed slot {fallen} stopped booting ({} boots in a row did not reach the \
             agent; the bootloader fell back to slot {booted})",
            self.cfg.boot.default_tries
        );
        let reason = self
            .integrity_failure(fallen, &lead)
            .unwrap_or_else(|| lead.clone());
        let reason = self.with_last_words(reason, since);
        let committed = match &state {
            State::Committed { slot, previous, .. } if *slot == fallen => {
                Some(previous.as_ref().map(|(_, v)| v.clone()))
            }
            _ => None,
        };
        if let Some(from_version) = &committed {
            state.rolled_back(booted, Some(reason), RollbackCause::StoppedBooting, now)?;
            self.store.save(lock, &state)?;
            self.boot.rollback_to(booted)?;
            self.boot.mark_unbootable(fallen)?;
            self.record_rollback(&state, from_version.clone());
            return Ok(rolled_back_outcome(&state));
        }
        // No committed release of ours on that slot (the agent's state is elsewhere):
        // the bootloader is pointed here all the same, and the journal says why.
        self.boot.rollback_to(booted)?;
        self.boot.mark_unbootable(fallen)?;
        crate::emit!(tracing::Level::ERROR, crate::events::ROLLED_BACK, update_agent_slot = %booted, update_agent_cause = RollbackCause::StoppedBooting.name(), update_agent_reason = %reason, "{reason}; slot {booted} is the default now");
        Ok(BootOutcome::Normal)
    }

    /// Sets the default's boot guard back once a boot of it reached the agent, so the
    /// bootloader counts the next boots of it afresh. Bookkeeping: a failure is logged
    /// (the bootloader keeps counting down from where it was, and falls back earlier).
    fn guard_default_boots(&mut self) {
        let booted = self.layout.booted;
        let n = self.cfg.boot.default_tries;
        match self.boot.status() {
            // The guarded default's last boot (systemd-boot then already names the
            // other slot as the default) reached the agent: set it back as well.
            Ok(b) if b.fell_back_from == Some(booted) => {}
            Ok(b) if b.default != booted => {
                tracing::warn!(slot = %booted, default = %b.default, "running slot {booted}, not the bootloader's default slot {}; its boots are not guarded", b.default);
                return;
            }
            Ok(b) if b.default_boots_left == (n > 0).then_some(n) && b.fell_back_from.is_none() => {
                return;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %crate::update::error_chain(&e), "cannot read the boot state to guard the default's boots");
                return;
            }
        }
        if let Err(e) = self.boot.guard_default(booted, n) {
            tracing::warn!(error = %crate::update::error_chain(&e), "cannot set the default slot's boot guard back");
        }
    }

    /// The trial boot of `staged`: the health checks decide between a commit and a
    /// rollback (state first, then the bootloader; the reboot is the caller's).
    fn trial_boot(
        &mut self,
        lock: &crate::state::UpdateLock,
        mut state: State,
        staged: crate::state::Staged,
        checks: &dyn Fn() -> Vec<CheckResult>,
        now: u64,
    ) -> Result<BootOutcome, UpdateError> {
        tracing::info!(release = %staged.version, slot = %staged.slot, phase = "checking", "trial boot: running the health checks");
        let t = Instant::now();
        let results = checks();
        let ms = t.elapsed().as_millis() as u64;
        tracing::info!(release = %staged.version, millis = ms, "health checks done in {ms} ms");
        if let Some(reason) = failure_reason(&results) {
            let to = staged.slot.other();
            state.rolling_back(to, reason.clone(), now)?;
            self.store.save(lock, &state)?;
            failpoint("after-rolling-back-state");
            self.boot.rollback_to(to)?;
            failpoint("after-rollback");
            tracing::error!(release = %staged.version, slot = %staged.slot, phase = "rolling_back", reason = %reason, "trial boot failed its health checks; rolling back");
            crate::emit!(tracing::Level::ERROR, crate::events::ROLLING_BACK, update_agent_release = %staged.version, update_agent_slot = %staged.slot, update_agent_cause = "health_check", update_agent_reason = %reason, "{} failed its health checks; rolling back to slot {to}: {reason}", staged.version);
            return Ok(BootOutcome::RollingBack {
                version: staged.version,
                to,
                reason,
                checks: results,
            });
        }
        self.commit_trial(lock, state, &staged)?;
        tracing::info!(release = %staged.version, slot = %staged.slot, phase = "committed", "trial boot healthy; committed");
        Ok(BootOutcome::Committed {
            version: staged.version,
            slot: staged.slot,
        })
    }

    /// A boot with the state `RollingBack`: the reboot happened (rolled back, the
    /// bootloader's default checked), or it did not (asked again).
    fn rollback_rebooted(
        &mut self,
        lock: &crate::state::UpdateLock,
        mut state: State,
        boot: &BootStatus,
        now: u64,
    ) -> Result<BootOutcome, UpdateError> {
        let State::RollingBack {
            version,
            from,
            to,
            reason,
            manual,
            ..
        } = state.clone()
        else {
            // Only called on that state; anything else is no rollback of ours.
            return Ok(BootOutcome::Normal);
        };
        if self.layout.booted != to {
            // Killed before the reboot (or it did not happen): do it again.
            self.boot.rollback_to(to)?;
            return Ok(BootOutcome::RollingBack {
                version,
                to,
                reason,
                checks: Vec::new(),
            });
        }
        if boot.default != to {
            // The rollback's write was undone under the state (a torn
            // systemd-boot rename repaired by fsck.vfat back to its source):
            // the next reboot would run `from` again.
            tracing::warn!(slot = %to, "rolled back, yet the bootloader's default is slot {from} (a rollback undone by a repair of the ESP?); pointing it at slot {to} again");
            self.boot.rollback_to(to)?;
        }
        if !manual {
            self.boot.mark_unbootable(from)?;
        }
        let cause = if manual {
            RollbackCause::Manual
        } else {
            RollbackCause::HealthCheck
        };
        state.rolled_back(to, None, cause, now)?;
        self.store.save(lock, &state)?;
        self.record_rollback(&state, None);
        Ok(rolled_back_outcome(&state))
    }

    /// Commits the running trial without waiting for health checks.
    pub fn mark_good(&mut self) -> Result<BootOutcome, UpdateError> {
        let lock = self.store.lock()?;
        let state = self.store.load()?;
        match &state {
            State::Armed { staged, .. } if staged.slot == self.layout.booted => {
                let staged = staged.clone();
                self.commit_trial(&lock, state, &staged)?;
                Ok(BootOutcome::Committed {
                    version: staged.version,
                    slot: staged.slot,
                })
            }
            other => Err(PostBootError::NotOnTrial {
                state: other.name(),
                booted: self.layout.booted,
            }
            .into()),
        }
    }

    /// Points the bootloader back at the slot that ran before the committed release,
    /// if it still holds that known-good release. The caller reboots.
    pub fn rollback(&mut self) -> Result<BootOutcome, UpdateError> {
        let lock = self.store.lock()?;
        let mut state = self.store.load()?;
        let (version, slot, previous) = match &state {
            State::Committed {
                version,
                slot,
                previous,
                ..
            } => (version.clone(), *slot, previous.clone()),
            other => {
                return Err(PostBootError::NoRollbackTarget {
                    why: format!(
                        "the agent is {} (only a committed release can be rolled back)",
                        other.name()
                    ),
                }
                .into())
            }
        };
        let Some((to, old_version)) = previous else {
            return Err(PostBootError::NoRollbackTarget {
                why: "the other slot holds no known-good release".into(),
            }
            .into());
        };
        if slot != self.layout.booted {
            return Err(PostBootError::NoRollbackTarget {
                why: format!(
                    "slot {} runs, not the committed slot {slot}",
                    self.layout.booted
                ),
            }
            .into());
        }
        let reason = format!("manual rollback from {version} to {old_version}");
        state.rolling_back(to, reason.clone(), timefmt::now())?;
        self.store.save(&lock, &state)?;
        self.boot.rollback_to(to)?;
        crate::emit!(tracing::Level::WARN, crate::events::ROLLING_BACK, update_agent_release = %version, update_agent_slot = %to, update_agent_cause = "manual", update_agent_reason = %reason, "{reason}; reboot to finish it");
        Ok(BootOutcome::RollingBack {
            version,
            to,
            reason,
            checks: Vec::new(),
        })
    }

    fn commit_trial(
        &mut self,
        lock: &crate::state::UpdateLock,
        mut state: State,
        staged: &crate::state::Staged,
    ) -> Result<(), UpdateError> {
        let slot = staged.slot;
        tracing::info!(release = %staged.version, slot = %slot, phase = "committing", "committing: making the trial slot the default");
        let t = Instant::now();
        self.boot.commit(slot)?;
        failpoint("after-boot-commit");
        let t_boot = t.elapsed();
        let previous = staged.from_version.clone().map(|v| (slot.other(), v));
        state.commit(previous, timefmt::now())?;
        let boot = self.boot_record(&staged.attempt);
        state.booted_by(boot.clone())?;
        self.store.save(lock, &state)?;
        failpoint("after-commit-state");
        let t_state = t.elapsed();
        tracing::info!(
            release = %staged.version,
            bootloader_ms = t_boot.as_millis() as u64,
            state_ms = (t_state - t_boot).as_millis() as u64,
            "commit: bootloader {} ms, state {} ms",
            t_boot.as_millis(),
            (t_state - t_boot).as_millis()
        );
        if let Some(entry) = history_entry(&state, None) {
            self.record_history(entry);
        }
        crate::kexec::record::remove(&self.cfg.state_dir);
        let downtime = boot
            .downtime_ms
            .map_or("unknown".to_owned(), |ms| format!("{ms} ms"));
        crate::emit!(tracing::Level::INFO, crate::events::COMMITTED, update_agent_release = %staged.version, update_agent_slot = %slot, update_agent_boot = boot.method.name(), update_agent_downtime_ms = boot.downtime_ms.unwrap_or(0), "committed {} on slot {slot} (booted by {}, downtime {downtime})", staged.version, boot.method.name());
        Ok(())
    }

    /// How the trial that is being committed booted (see `kexec::record`).
    fn boot_record(&self, attempt: &str) -> crate::reboot_method::BootRecord {
        let cmdline = std::fs::read_to_string(&self.cfg.slots.cmdline).unwrap_or_default();
        crate::kexec::record::boot_record(&self.cfg.state_dir, &cmdline, attempt, timefmt::now_ms())
    }

    /// Why a slot with a verified dm-verity tree failed (after `lead`, what happened),
    /// when it no longer holds what was verified: its data computed into a tree again does not reach the root hash
    /// recorded when the agent built it. `None` when it still does, when the slot has
    /// no tree, or when it cannot be read (logged).
    fn integrity_failure(&self, slot: crate::slots::Slot, lead: &str) -> Option<String> {
        let img = self.store.images()[slot.index()].clone()?;
        let v = img.verity?;
        let device = self.layout.partition(slot).device.clone();
        let file = match std::fs::File::open(&device) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(slot = %slot, device = %device.display(), error = %e, "cannot read the slot that did not boot to check its integrity");
                return None;
            }
        };
        let read =
            |buf: &mut [u8], off: u64| std::os::unix::fs::FileExt::read_exact_at(&file, buf, off);
        match crate::verity::root_of_device(&read, v.hash_offset) {
            Ok(root) if hex::encode(root) == v.root_hash => None,
            Ok(root) => Some(format!(
                "{lead}, and it failed its integrity check: slot {slot} no \
                 longer holds the {} image it was verified with (its data now reaches \
                 dm-verity root {}, not {}); it changed after staging",
                img.version,
                hex::encode(root),
                v.root_hash
            )),
            Err(e) => Some(format!(
                "{lead}, and it failed its integrity check: slot {slot}'s \
                 dm-verity tree for {} is no longer readable ({})",
                img.version,
                crate::update::error_chain(&e)
            )),
        }
    }

    fn record_rollback(&self, state: &State, from_version: Option<String>) {
        if let State::RolledBack {
            version,
            reason,
            slot,
            cause,
            ..
        } = state
        {
            let cause = cause.map_or("unknown", RollbackCause::name);
            tracing::error!(release = %version, slot = %slot, phase = "rolled_back", reason = %reason, "rolled back");
            crate::emit!(tracing::Level::ERROR, crate::events::ROLLED_BACK, update_agent_release = %version, update_agent_slot = %slot, update_agent_cause = cause, update_agent_reason = %reason, "{version} rolled back ({cause}): {reason}");
        }
        if let Some(entry) = history_entry(state, from_version) {
            self.record_history(entry);
        }
    }

    /// Records an end state's history entry once; whether it was recorded. History is
    /// bookkeeping: a failure to write it is logged and never stops a commit, a
    /// rollback or the gate (the next start tries again, from the state).
    fn record_history(&self, entry: Entry) -> bool {
        match self.history.record_once(entry) {
            Ok(recorded) => recorded,
            Err(e) => {
                tracing::warn!(error = %crate::update::error_chain(&e), "could not record the update's end in the history; the next start tries again");
                false
            }
        }
    }
}

/// The history entry an end state stands for (`None` for the others). Its time is the
/// state's, so the entry is found again after a power cut and recorded once.
/// `from_version` of a rollback is known only where it happened.
fn history_entry(state: &State, from_version: Option<String>) -> Option<Entry> {
    match state {
        State::Committed {
            version,
            slot,
            previous,
            at,
            bytes_fetched,
            boot,
        } => Some(Entry {
            version: version.clone(),
            from_version: previous.as_ref().map(|(_, v)| v.clone()),
            slot: *slot,
            outcome: Outcome::Committed,
            reason: String::new(),
            bytes_fetched: *bytes_fetched,
            at: *at,
            cause: None,
            boot: boot.clone(),
        }),
        State::RolledBack {
            version,
            slot,
            reason,
            at,
            cause,
        } => Some(Entry {
            version: version.clone(),
            from_version,
            // The slot the release was on: the other one.
            slot: slot.other(),
            outcome: Outcome::RolledBack,
            reason: reason.clone(),
            bytes_fetched: 0,
            at: *at,
            cause: *cause,
            boot: None,
        }),
        _ => None,
    }
}

/// Whether `state` says Staged while the bootloader already calls the staged slot
/// bootable: `arm_trial` reached the disk and a power cut came before the state did.
pub fn armed_before_the_cut(state: &State, boot: &BootStatus) -> bool {
    matches!(state, State::Staged(s) if boot.is_bootable(s.slot))
}

/// The first failing check's summary (and how many more failed), if any failed.
fn failure_reason(results: &[CheckResult]) -> Option<String> {
    let failed: Vec<&CheckResult> = results.iter().filter(|r| !r.ok).collect();
    let first = failed.first()?;
    let mut reason = first.summary();
    if failed.len() > 1 {
        reason.push_str(&format!(" (and {} more checks failed)", failed.len() - 1));
    }
    Some(reason)
}

fn rolled_back_outcome(state: &State) -> BootOutcome {
    match state {
        State::RolledBack {
            version,
            slot,
            reason,
            ..
        } => BootOutcome::RolledBack {
            version: version.clone(),
            slot: *slot,
            reason: reason.clone(),
        },
        _ => BootOutcome::Normal,
    }
}

#[cfg(test)]
mod tests;
