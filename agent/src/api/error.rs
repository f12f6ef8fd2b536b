//! How errors leave the API: a gRPC code, a stable `ErrorInfo.reason` in domain
//! `update-agent`, and for bad requests a `BadRequest` naming the field.

use std::collections::HashMap;

use tonic::Code;
use tonic_types::{ErrorDetails, StatusExt};

use crate::daemon::DaemonError;
use crate::fetch::FetchError;
use crate::trust::node::NodeTrustError;
use crate::update::{error_chain, UpdateError};

/// `ErrorInfo.domain` of every error the API returns.
pub const ERROR_DOMAIN: &str = "update-agent";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("invalid `{field}`: {why}")]
    InvalidArgument { field: &'static str, why: String },
    #[error("too many {what} at once (limit {limit}, {key}); try again later")]
    TooMany {
        what: &'static str,
        limit: usize,
        key: &'static str,
    },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
}

impl From<UpdateError> for ApiError {
    fn from(e: UpdateError) -> Self {
        Self::Daemon(e.into())
    }
}

impl ApiError {
    /// The gRPC code and the stable `ErrorInfo.reason`.
    pub fn code(&self) -> (Code, &'static str) {
        match self {
            Self::PermissionDenied(_) => (Code::PermissionDenied, "PERMISSION_DENIED"),
            Self::InvalidArgument { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Self::TooMany { .. } => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
            Self::Daemon(e) => daemon_code(e),
        }
    }

    /// The request field at fault, when there is one.
    fn field(&self) -> Option<&'static str> {
        match self {
            Self::InvalidArgument { field, .. }
            | Self::Daemon(DaemonError::InvalidTarget { field, .. }) => Some(field),
            Self::Daemon(DaemonError::Update(UpdateError::Fetch(FetchError::Scheme {
                ..
            }))) => Some("source"),
            _ => None,
        }
    }
}

fn daemon_code(e: &DaemonError) -> (Code, &'static str) {
    match e {
        DaemonError::InvalidTarget { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
        DaemonError::Busy { .. } | DaemonError::AgentBusy { .. } => {
            (Code::FailedPrecondition, "BUSY")
        }
        DaemonError::VersionNotFound { .. } => (Code::NotFound, "VERSION_NOT_FOUND"),
        DaemonError::UnknownOperation(_) => (Code::NotFound, "UNKNOWN_OPERATION"),
        DaemonError::NothingToReboot { .. } => (Code::FailedPrecondition, "NOTHING_TO_REBOOT"),
        DaemonError::Reboot(_) | DaemonError::Worker => (Code::Internal, "INTERNAL"),
        DaemonError::TooMany { .. } => (Code::ResourceExhausted, "RESOURCE_EXHAUSTED"),
        DaemonError::CheckTimeout { .. } => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
        DaemonError::NotFound(e) | DaemonError::Update(e) => update_code(e),
    }
}

fn update_code(e: &UpdateError) -> (Code, &'static str) {
    use crate::state::StateError;
    match e {
        UpdateError::Busy { .. } | UpdateError::State(StateError::Locked { .. }) => {
            (Code::FailedPrecondition, "BUSY")
        }
        UpdateError::State(StateError::Illegal { .. }) | UpdateError::NothingToCancel(_) => {
            (Code::FailedPrecondition, "WRONG_STATE")
        }
        UpdateError::PostBoot(_) => (Code::FailedPrecondition, "WRONG_STATE"),
        UpdateError::Fetch(FetchError::File(crate::payload::PayloadError::NotAFile { .. })) => {
            (Code::InvalidArgument, "INVALID_ARGUMENT")
        }
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
        | UpdateError::TreeDoesNotFit { .. }
        | UpdateError::NoMatchingPayload { .. }
        | UpdateError::NotFull { .. }
        | UpdateError::PayloadChanged { .. } => (Code::FailedPrecondition, "REJECTED"),
        // Bytes that do not hash as the signed manifest says (an operation, the image,
        // its dm-verity root): the payload is refused, as `update-agent stage` says.
        UpdateError::Apply(a) if a.is_content_error() => (Code::FailedPrecondition, "REJECTED"),
        // The release server's roots could not be read: try again later.
        UpdateError::Trust(e)
            if matches!(
                **e,
                NodeTrustError::Fetch { .. } | NodeTrustError::Body { .. }
            ) =>
        {
            (Code::Unavailable, "FETCH_FAILED")
        }
        // A root that does not verify or has expired: nothing new is trusted.
        UpdateError::Trust(e)
            if matches!(
                **e,
                NodeTrustError::Next { .. }
                    | NodeTrustError::TooLarge { .. }
                    | NodeTrustError::Expired(_)
                    | NodeTrustError::Lifetime { .. }
                    | NodeTrustError::Replayed { .. }
                    | NodeTrustError::NotPinned { .. }
                    | NodeTrustError::WrongVersion { .. }
            ) =>
        {
            (Code::FailedPrecondition, "REJECTED")
        }
        _ => (Code::Internal, "INTERNAL"),
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        let (code, reason) = e.code();
        let mut meta = HashMap::new();
        if let ApiError::Daemon(DaemonError::Busy { operation, .. }) = &e {
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

        let s: tonic::Status = ApiError::from(DaemonError::Busy {
            operation: "op1".into(),
            version: "2.0".into(),
        })
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let info = s.get_error_details().error_info().cloned().expect("info");
        assert_eq!(
            info.metadata.get("operation_id").map(String::as_str),
            Some("op1")
        );
        assert!(s.message().contains("2.0"), "{}", s.message());

        // A payload whose bytes do not hash as signed is refused, as the CLI says.
        let wrong_root = UpdateError::Apply(crate::apply::ApplyError::VerityRootMismatch {
            expected: "ab".into(),
            actual: "cd".into(),
        });
        assert_eq!(
            update_code(&wrong_root),
            (Code::FailedPrecondition, "REJECTED")
        );
        let io = UpdateError::Apply(crate::apply::ApplyError::ReadBack(std::io::Error::other(
            "disk",
        )));
        assert_eq!(update_code(&io), (Code::Internal, "INTERNAL"));
    }
}
