//! The gRPC API (`updateagent.v1`): the daemon's door for fleet controllers and
//! `updatectl`.
//!
//! ```text
//! listeners (server.rs) ─ Unix socket (peer credentials) / TCP + mutual TLS
//!   └─ service.rs: one tonic service; each call checks access.rs first, turns the
//!        request into the daemon's terms, calls `crate::daemon::Daemon`, and turns
//!        the answer into protobuf (convert.rs, status.rs)
//! ```
//! This is the adapter only: what the daemon does lives in `crate::daemon`. Errors
//! leave as gRPC status codes with `google.rpc.ErrorInfo` (a stable reason) and, for
//! bad requests, `google.rpc.BadRequest` naming the field (error.rs).

pub mod access;
pub mod client;
pub mod convert;
pub mod error;
pub mod limits;
pub mod listen;
pub mod metrics_http;
pub mod server;
pub mod service;
pub mod status;

pub use update_agent_proto::v1 as pb;

pub use error::{ApiError, ERROR_DOMAIN};
