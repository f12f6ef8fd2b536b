//! The A/B rules: the agent's five variables in the block, validated, and the
//! transitions between them.
//!
//! | variable  | values      | meaning | when missing |
//! |-----------|-------------|---------|--------------|
//! | `ua_default` | `a`, `b` | the slot that boots when no trial is pending | `a` |
//! | `ua_trial` | `a`, `b`, empty | the slot armed for trial boots | no trial (as empty) |
//! | `ua_tries` | one digit `0`-`9` | trial boots left; GRUB counts it down (string comparison, 9→8 … 1→0) *before* each trial boot, and clears `ua_trial` when it finds 0 | `0` (as empty) |
//! | `ua_a_ok`, `ua_b_ok` | `1`, `0` | `0`: never boot this slot (being written, or known bad) | `1` |
//! | `ua_boots` | one digit, empty | the default's guard: boots of the default left before GRUB tries the other slot; GRUB counts it down before each boot of the default, the agent sets it back ([`GrubState::guard_default`]) once a boot reached it | no guard (as empty) |
//! | `ua_fallen` | `a`, `b`, empty | set by GRUB when the guard ran out: the default it gave up on (the other slot is booting) | none (as empty) |
//!
//! Any other value (`ua_default=c`, `ua_tries=10`, ...) is Malformed, never guessed;
//! so is a trial of the default slot or of a slot marked `0` (no transition makes
//! one, and the GRUB script ignores it).
//! A missing `ua_X_ok` counts as bootable because that is what the GRUB script does
//! (it only refuses an explicit `0`) and because a grubenv made by other tools has
//! none: its slot is running, so presuming it bad would refuse `rollback_to` the very
//! slot that works. The agent never relies on a missing `0`: it marks a slot `0`
//! before writing into it. Every transition writes all five variables, in the order
//! above, so after the first one the state is explicit. The guard's two variables are
//! written only once the agent keeps a guard (a block without them stays without).
//!
//! `ua_trial=b` with `ua_tries=0` is reported as trial `(b, 0)`: the last try is the
//! boot running now (or, after another reboot, GRUB falls back and clears the trial).
//!
//! # Transitions
//!
//! * `mark_unbootable(s)`: `ua_s_ok=0`, and clears a trial of `s`; refused for the default.
//! * `arm_trial(s, n)`: `ua_s_ok=1`, `ua_trial=s`, `ua_tries=n`; refused for the default
//!   slot and for `n` outside 1..=9 (one digit: GRUB script has no arithmetic).
//! * `commit(s)`: `ua_default=s`, no trial, `ua_tries=0`; refused if `s` is marked
//!   unbootable (a half-written slot must go through a trial first).
//! * `rollback_to(s)`: `ua_default=s`, no trial, `ua_tries=0`; refused if `s` is marked
//!   unbootable.
//! * `commit(s)` and `rollback_to(s)` also clear `ua_fallen`: the default is chosen anew;
//!   `rollback_to(s)` clears `ua_boots` too (the agent on `s` may not know the guard).
//! * `guard_default(n)`: `ua_boots=n` (`0`: no guard, both variables emptied) and
//!   `ua_fallen` cleared; refused for `n` above 9.
//!
//! A refused transition writes nothing.

use super::env::{EnvError, GrubEnv};
use crate::boot::{BootError, BootStatus};
use crate::slots::Slot;

pub const VAR_DEFAULT: &str = "ua_default";
pub const VAR_TRIAL: &str = "ua_trial";
pub const VAR_TRIES: &str = "ua_tries";
pub const VAR_A_OK: &str = "ua_a_ok";
pub const VAR_B_OK: &str = "ua_b_ok";
pub const VAR_BOOTS: &str = "ua_boots";
pub const VAR_FALLEN: &str = "ua_fallen";
/// The variables the agent owns, in the order every transition writes them.
pub const OWNED_VARS: [&str; 7] = [
    VAR_DEFAULT,
    VAR_TRIAL,
    VAR_TRIES,
    VAR_A_OK,
    VAR_B_OK,
    VAR_BOOTS,
    VAR_FALLEN,
];
/// Tries are one decimal digit: the GRUB script counts down by string comparison.
pub const MAX_TRIES: u8 = 9;

impl GrubEnv {
    /// The agent-owned variables that are present, as `k=v k=v`.
    pub fn owned_raw(&self) -> String {
        OWNED_VARS
            .iter()
            .filter_map(|&k| {
                self.get(k)
                    .map(|v| format!("{k}={}", String::from_utf8_lossy(v)))
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The agent's view of the block: the owned variables, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrubState {
    pub default: Slot,
    pub trial: Option<Slot>,
    pub tries: u8,
    /// Whether each slot may be booted: `[a, b]`.
    pub ok: [bool; 2],
    /// The default's guard: boots left before the other slot is tried (`None`: none).
    pub boots: Option<u8>,
    /// The default GRUB gave up on when the guard ran out.
    pub fallen: Option<Slot>,
}

impl GrubState {
    /// A new block: `default` bootable, the other slot not (nothing is known about it
    /// until a trial is armed).
    pub fn initial(default: Slot) -> Self {
        let mut ok = [false; 2];
        ok[default.index()] = true;
        Self {
            default,
            trial: None,
            tries: 0,
            ok,
            boots: None,
            fallen: None,
        }
    }

    pub fn from_env(env: &GrubEnv) -> Result<Self, EnvError> {
        use EnvError::Malformed;
        let default = match env.get(VAR_DEFAULT) {
            None => Slot::A,
            Some(b"a") => Slot::A,
            Some(b"b") => Slot::B,
            Some(_) => return Err(Malformed("ua_default is not a or b")),
        };
        let trial = match env.get(VAR_TRIAL) {
            None | Some(b"") => None,
            Some(b"a") => Some(Slot::A),
            Some(b"b") => Some(Slot::B),
            Some(_) => return Err(Malformed("ua_trial is not a, b or empty")),
        };
        let tries = match env.get(VAR_TRIES) {
            None | Some(b"") => 0,
            Some(&[d]) if d.is_ascii_digit() => d - b'0',
            Some(_) => return Err(Malformed("ua_tries is not a single digit")),
        };
        let ok = |var: &str, what: &'static str| match env.get(var) {
            None | Some(b"1") => Ok(true),
            Some(b"0") => Ok(false),
            Some(_) => Err(Malformed(what)),
        };
        let ok = [
            ok(VAR_A_OK, "ua_a_ok is not 0 or 1")?,
            ok(VAR_B_OK, "ua_b_ok is not 0 or 1")?,
        ];
        let boots = match env.get(VAR_BOOTS) {
            None | Some(b"") => None,
            Some(&[d]) if d.is_ascii_digit() => Some(d - b'0'),
            Some(_) => return Err(Malformed("ua_boots is not a single digit")),
        };
        let fallen = match env.get(VAR_FALLEN) {
            None | Some(b"") => None,
            Some(b"a") => Some(Slot::A),
            Some(b"b") => Some(Slot::B),
            Some(_) => return Err(Malformed("ua_fallen is not a, b or empty")),
        };
        // States no transition produces and the GRUB script ignores: reporting them
        // as a trial would tell the agent something GRUB will not do.
        match trial {
            Some(t) if t == default => Err(Malformed("ua_trial names the default slot")),
            Some(t) if !ok[t.index()] => Err(Malformed("ua_trial names a slot marked not ok")),
            _ => Ok(Self {
                default,
                trial,
                tries,
                ok,
                boots,
                fallen,
            }),
        }
    }

    /// Writes the five A/B variables, in [`OWNED_VARS`] order, then the guard's two
    /// when there is a guard or the block already has them.
    pub fn apply_to(&self, env: &mut GrubEnv) -> Result<(), EnvError> {
        if self.tries > MAX_TRIES || self.boots.is_some_and(|b| b > MAX_TRIES) {
            return Err(EnvError::Malformed("a count would not be a single digit"));
        }
        let flag = |ok: bool| if ok { "1" } else { "0" };
        env.set(VAR_DEFAULT, self.default.letter())?;
        env.set(VAR_TRIAL, self.trial.map_or("", Slot::letter))?;
        env.set(VAR_TRIES, &self.tries.to_string())?;
        env.set(VAR_A_OK, flag(self.ok[0]))?;
        env.set(VAR_B_OK, flag(self.ok[1]))?;
        if self.boots.is_some() || env.get(VAR_BOOTS).is_some() {
            env.set(
                VAR_BOOTS,
                &self.boots.map_or(String::new(), |b| b.to_string()),
            )?;
        }
        if self.fallen.is_some() || env.get(VAR_FALLEN).is_some() {
            env.set(VAR_FALLEN, self.fallen.map_or("", Slot::letter))?;
        }
        Ok(())
    }

    pub fn status(&self, raw: String) -> BootStatus {
        BootStatus {
            default: self.default,
            trial: self.trial.map(|s| (s, self.tries)),
            bootable: self.ok,
            default_boots_left: self.boots,
            fell_back_from: self.fallen,
            raw,
        }
    }

    fn ok(&self, slot: Slot) -> bool {
        self.ok[slot.index()]
    }

    pub fn mark_unbootable(self, slot: Slot) -> Result<Self, BootError> {
        if slot == self.default {
            return Err(refused("mark unbootable", slot, "it is the default slot"));
        }
        let mut next = self;
        next.ok[slot.index()] = false;
        if next.trial == Some(slot) {
            next.trial = None;
            next.tries = 0;
        }
        Ok(next)
    }

    pub fn arm_trial(self, slot: Slot, tries: u8) -> Result<Self, BootError> {
        if slot == self.default {
            return Err(refused("arm a trial of", slot, "it is the default slot"));
        }
        if tries == 0 || tries > MAX_TRIES {
            return Err(refused("arm a trial of", slot, "tries must be 1 to 9"));
        }
        let mut next = self;
        next.ok[slot.index()] = true;
        next.trial = Some(slot);
        next.tries = tries;
        Ok(next)
    }

    /// What the fragment does before a trial boot: one try fewer, on disk first.
    pub fn consume_try(self, slot: Slot) -> Result<Self, BootError> {
        if self.trial != Some(slot) {
            return Err(refused("count a try of", slot, "it is not the armed trial"));
        }
        if self.tries == 0 {
            return Err(refused("count a try of", slot, "it has no try left"));
        }
        let mut next = self;
        next.tries -= 1;
        Ok(next)
    }

    pub fn commit(self, slot: Slot) -> Result<Self, BootError> {
        if !self.ok(slot) {
            return Err(refused("commit", slot, "it is marked unbootable"));
        }
        Ok(Self {
            default: slot,
            trial: None,
            tries: 0,
            fallen: None,
            ..self
        })
    }

    /// Also ends the guard: the slot rolled back to may run an agent that does not
    /// know it, which would never set it back, and GRUB would then leave that slot
    /// after a few good boots. An agent that knows it guards the slot once it runs.
    pub fn rollback_to(self, slot: Slot) -> Result<Self, BootError> {
        if !self.ok(slot) {
            return Err(refused("roll back to", slot, "it is marked unbootable"));
        }
        Ok(Self {
            default: slot,
            trial: None,
            tries: 0,
            boots: None,
            fallen: None,
            ..self
        })
    }

    /// Sets the default's guard back to `boots` (0: no guard) after a boot reached the
    /// agent; a fallback GRUB recorded is over once this is called.
    pub fn guard_default(self, slot: Slot, boots: u8) -> Result<Self, BootError> {
        if slot != self.default {
            return Err(refused(
                "guard the boots of",
                slot,
                "it is not the default slot",
            ));
        }
        if boots > MAX_TRIES {
            return Err(refused(
                "guard the boots of",
                self.default,
                "boots must be 0 to 9",
            ));
        }
        Ok(Self {
            boots: (boots > 0).then_some(boots),
            fallen: None,
            ..self
        })
    }
}

fn refused(action: &'static str, slot: Slot, why: &'static str) -> BootError {
    BootError::Refused { action, slot, why }
}
