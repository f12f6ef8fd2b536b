//! What the daemon's calls can fail with, in the daemon's own terms; `api/error.rs`
//! maps each to a gRPC code and a stable `ErrorInfo.reason`.

use crate::fetch::FetchError;
use crate::update::UpdateError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "an update to {version} is running (operation {operation}); watch it or cancel it first"
    )]
    Busy { operation: String, version: String },
    #[error("another request holds the agent ({what} is running); try again when it ends")]
    AgentBusy { what: &'static str },
    /// The request names no usable target (the field and why).
    #[error("invalid `{field}`: {why}")]
    InvalidTarget { field: &'static str, why: String },
    /// A payload or channel that is not there (see [`not_found`]).
    #[error(transparent)]
    NotFound(UpdateError),
    #[error("release {version} is not published at {url}")]
    VersionNotFound {
        version: String,
        url: String,
        #[source]
        source: Box<UpdateError>,
    },
    #[error("operation {0} is not known (only the running and the last operation are)")]
    UnknownOperation(String),
    #[error("nothing to reboot into: the agent is {state} (set force to reboot anyway)")]
    NothingToReboot { state: &'static str },
    #[error("rebooting")]
    Reboot(#[source] crate::kexec::RebootError),
    #[error(transparent)]
    Update(UpdateError),
    #[error("the agent's worker thread ended unexpectedly")]
    Worker,
    #[error("too many {what} at once (limit {limit}, {key}); try again later")]
    TooMany {
        what: &'static str,
        limit: usize,
        key: &'static str,
    },
    #[error("the check did not finish within {secs} s (api.limits.check_timeout_secs)")]
    CheckTimeout { secs: u64 },
}

impl From<UpdateError> for DaemonError {
    fn from(e: UpdateError) -> Self {
        if not_found(&e) {
            Self::NotFound(e)
        } else {
            Self::Update(e)
        }
    }
}

/// Whether `e` says the payload or channel asked for does not exist (as opposed to
/// one that exists and is wrong, or a server that failed).
pub fn not_found(e: &UpdateError) -> bool {
    match e {
        // A path that names something other than a file is a bad request.
        UpdateError::Fetch(FetchError::File(crate::payload::PayloadError::NotAFile { .. })) => {
            false
        }
        UpdateError::Fetch(FetchError::Status { status: 404, .. } | FetchError::File(_)) => true,
        UpdateError::ChannelFetch { source, .. } => matches!(
            **source,
            FetchError::Status { status: 404, .. } | FetchError::File(_)
        ),
        _ => false,
    }
}

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the agent")]
    Agent(#[source] UpdateError),
    #[error(transparent)]
    Settings(#[from] crate::policy::SettingsError),
    #[error(transparent)]
    MachineId(#[from] MachineIdError),
}

#[derive(Debug, thiserror::Error)]
pub enum MachineIdError {
    #[error("reading the machine id {path} (auto.machine_id)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Nodes sharing an id would share a FleetLock slot (the lock is recursive per
    /// id) and a wave; an id that changes at every boot would strand a slot.
    #[error("the machine id in {path} (auto.machine_id) is {found:?}, not a committed id of 32 hex digits; run systemd-machine-id-setup --commit (or give each node its own id) before enabling unattended updates")]
    Invalid {
        path: std::path::PathBuf,
        found: String,
    },
}
