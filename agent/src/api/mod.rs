//! The gRPC API (`updateagent.v1`): the daemon's door for fleet controllers and
//! `updatectl`.
//!
//! ```text
//! listeners (server.rs) ─ Unix socket (peer credentials) / TCP + mutual TLS
//!   └─ service.rs: one tonic service; each call checks access.rs first
//!        ├─ reads: status.rs builds Status/history from state.json, history.json and
//!        │         the bootloader, lock-free (never waits for a running update)
//!        └─ changes: ops.rs runs one operation at a time on its own thread with the
//!                    Agent; its progress goes to a broadcast that WatchUpdate streams
//! ```
//! Errors leave as gRPC status codes with `google.rpc.ErrorInfo` (a stable reason)
//! and, for bad requests, `google.rpc.BadRequest` naming the field.

pub mod access;
pub mod auto;
pub mod client;
pub mod intent;
pub mod limits;
pub mod listen;
pub mod metrics_http;
pub mod ops;
pub mod server;
pub mod service;
pub mod status;

pub use update_agent_proto::v1 as pb;

use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::update::{error_chain, UpdateError};

/// `ErrorInfo.domain` of every error the API returns.
pub const ERROR_DOMAIN: &str = "update-agent";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("invalid `{field}`: {why}")]
    InvalidArgument { field: &'static str, why: String },
    #[error(
        "an update to {version} is running (operation {operation}); watch it or cancel it first"
    )]
    Busy { operation: String, version: String },
    #[error("another request holds the agent ({what} is running); try again when it ends")]
    AgentBusy { what: &'static str },
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
    #[error("running the reboot command {command:?}")]
    Reboot {
        command: Vec<String>,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Update(#[from] UpdateError),
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

impl ApiError {
    /// The gRPC code and the stable `ErrorInfo.reason`.
    pub fn code(&self) -> (Code, &'static str) {
        use crate::fetch::FetchError;
        use crate::state::StateError;
        match self {
            Self::PermissionDenied(_) => (Code::PermissionDenied, "PERMISSION_DENIED"),
            Self::InvalidArgument { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Self::Busy { .. } | Self::AgentBusy { .. } => (Code::FailedPrecondition, "BUSY"),
            Self::VersionNotFound { .. } => (Code::NotFound, "VERSION_NOT_FOUND"),
            Self::UnknownOperation(_) => (Code::NotFound, "UNKNOWN_OPERATION"),
            Self::NothingToReboot { .. } => (Code::FailedPrecondition, "NOTHING_TO_REBOOT"),
            Self::Reboot { .. } | Self::Worker => (Code::Internal, "INTERNAL"),
            Self::TooMany { .. } => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
            Self::CheckTimeout { .. } => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            Self::Update(e) => match e {
                UpdateError::Busy { .. } | UpdateError::State(StateError::Locked { .. }) => {
                    (Code::FailedPrecondition, "BUSY")
                }
                UpdateError::State(StateError::Illegal { .. })
                | UpdateError::NothingToCancel(_) => (Code::FailedPrecondition, "WRONG_STATE"),
                UpdateError::PostBoot(_) => (Code::FailedPrecondition, "WRONG_STATE"),
                UpdateError::Fetch(FetchError::File(crate::payload::PayloadError::NotAFile {
                    ..
                })) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
                UpdateError::Fetch(FetchError::Status { status: 404, .. })
                | UpdateError::Fetch(FetchError::File(_)) => (Code::NotFound, "PAYLOAD_NOT_FOUND"),
                UpdateError::ChannelFetch { source, .. }
                    if matches!(
                        **source,
                        FetchError::Status { status: 404, .. } | FetchError::File(_)
                    ) =>
                {
                    (Code::NotFound, "CHANNEL_NOT_FOUND")
                }
                UpdateError::ChannelFetch { .. } | UpdateError::ChannelRead { .. } => {
                    (Code::Unavailable, "FETCH_FAILED")
                }
                UpdateError::Channel { .. } => (Code::FailedPrecondition, "REJECTED"),
                UpdateError::Fetch(FetchError::Scheme { .. }) => {
                    (Code::InvalidArgument, "INVALID_ARGUMENT")
                }
                UpdateError::Fetch(_) => (Code::Unavailable, "FETCH_FAILED"),
                UpdateError::Payload(_)
                | UpdateError::Incompatible { .. }
                | UpdateError::Downgrade { .. }
                | UpdateError::SourceTooOld { .. }
                | UpdateError::UnknownRunning { .. }
                | UpdateError::TargetTooLarge { .. }
                | UpdateError::NoMatchingPayload { .. }
                | UpdateError::NotFull { .. }
                | UpdateError::PayloadChanged { .. } => (Code::FailedPrecondition, "REJECTED"),
                _ => (Code::Internal, "INTERNAL"),
            },
        }
    }

    /// The request field at fault, when there is one.
    fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidArgument { field, .. } => Some(field),
            Self::Update(UpdateError::Fetch(crate::fetch::FetchError::Scheme { .. })) => {
                Some("source")
            }
            _ => None,
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let (code, reason) = e.code();
        let mut meta = HashMap::new();
        if let ApiError::Busy { operation, .. } = &e {
            meta.insert("operation_id".to_owned(), operation.clone());
        }
        let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, meta);
        if let Some(field) = e.field() {
            details.add_bad_request_violation(field, e.to_string());
        }
        // One line that says it all: the whole chain, not just the outermost context.
        tonic::Status::with_error_details(code, error_chain(&e), details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_code_reason_and_field() {
        let s: tonic::Status = ApiError::InvalidArgument {
            field: "page_token",
            why: "not a token from ListHistory".into(),
        }
        .into();
        assert_eq!(s.code(), Code::InvalidArgument);
        let d = s.get_error_details();
        assert_eq!(
            d.error_info().map(|i| i.reason.as_str()),
            Some("INVALID_ARGUMENT")
        );
        let br = d.bad_request().expect("bad request details");
        assert_eq!(br.field_violations[0].field, "page_token");

        let s: tonic::Status = ApiError::Busy {
            operation: "op1".into(),
            version: "2.0".into(),
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let info = s.get_error_details().error_info().cloned().expect("info");
        assert_eq!(
            info.metadata.get("operation_id").map(String::as_str),
            Some("op1")
        );
        assert!(s.message().contains("2.0"), "{}", s.message());
    }
}
