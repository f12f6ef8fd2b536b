//! Staging a release: the agent's write path from a payload URL to an armed slot.
//!
//! ```text
//! lock ─> open payload (head) ─> signature, expiry, compatible, version policy
//!      ─> delta for this booted slot? else the full payload beside it
//!      ─> size check ─> open inactive slot (O_EXCL) ─> bootloader: slot unbootable
//!      ─> state Staging ─> apply (checkpoint: fsync slot, then persist ops_done)
//!      ─> read-back hash ─> state Staged ─> bootloader: arm trial ─> state Armed
//! ```
//! Killed at any point, the next `resume` finds the state and carries on from the
//! checkpoint (and, once every operation is written, from where the read-back stood);
//! the final read-back proves the checkpoint, and only when it fails are the operations
//! re-hashed to rewrite from the first one that no longer matches.
//!
//! The parts: `agent.rs` the agent and its handle on the node; `admit.rs` the checks a
//! payload passes before anything is written; `staging.rs` start, resume and cancel;
//! `run.rs` the write with its checkpoints; `helpers.rs` fail points, attempt ids,
//! error chains; `error.rs` the errors of this room and of `postboot` (below both, so
//! `postboot` names this room and this room does not name `postboot`).

mod admit;
mod agent;
mod error;
mod helpers;
mod run;
mod staging;

pub use admit::Checked;
pub use agent::{open_boot, running_version, Agent, Progress};
pub use error::{PostBootError, UpdateError};
pub(crate) use helpers::failpoint;
pub use helpers::{attempt_id, error_chain};
