//! Why a release was rolled back: recorded in the state machine while the rollback
//! reboot is pending and in history after it. Its own module, below both, so that
//! `state.rs` and `history.rs` need not name each other.

use serde::{Deserialize, Serialize};

/// Why a release was rolled back, for metrics and alerts (the reason says it in
/// words).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackCause {
    /// The trial boot failed its health checks.
    HealthCheck,
    /// The bootloader fell back: the new slot never reached the health checks.
    DidNotBoot,
    /// An operator asked.
    Manual,
    /// A committed release stopped booting: the bootloader gave up on it after its
    /// guarded boots ran out and booted the slot before it.
    StoppedBooting,
}

impl RollbackCause {
    pub fn name(self) -> &'static str {
        match self {
            Self::HealthCheck => "health_check",
            Self::DidNotBoot => "did_not_boot",
            Self::Manual => "manual",
            Self::StoppedBooting => "stopped_booting",
        }
    }
}
