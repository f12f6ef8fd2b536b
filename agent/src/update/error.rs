//! The errors of staging and of what follows the reboot (`postboot`): one type the
//! daemon and the API map, kept below both rooms so neither names the other.

use crate::apply::ApplyError;
use crate::boot::BootError;
use crate::fetch::FetchError;
use crate::payload::PayloadError;
use crate::slots::{Slot, SlotError};
use crate::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error(transparent)]
    Slots(#[from] SlotError),
    #[error("bootloader")]
    Boot(#[from] BootError),
    #[error(transparent)]
    State(#[from] StateError),
    /// Boxed: the root's errors are large and rare.
    #[error("trust")]
    Trust(#[source] Box<crate::trust::node::NodeTrustError>),
    #[error("fetching the payload")]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error("applying the payload")]
    Apply(#[from] ApplyError),
    #[error("payload is for {payload:?}, this node is {node:?}")]
    Incompatible { payload: String, node: String },
    #[error("payload {to} is older than the running release {from}; refused (allow downgrades to force)")]
    Downgrade { from: String, to: String },
    #[error("payload {to} needs at least release {minimum} running, this node runs {running}")]
    SourceTooOld {
        to: String,
        minimum: String,
        running: String,
    },
    #[error("cannot tell the running release: no VERSION_ID in {path}; allow downgrades to update anyway")]
    UnknownRunning { path: std::path::PathBuf },
    #[error("release {version} is {size} bytes but slot {slot} holds only {slot_size}")]
    TargetTooLarge {
        version: String,
        size: u64,
        slot: crate::slots::Slot,
        slot_size: u64,
    },
    #[error(
        "release {version}'s dm-verity tree ends at byte {tree_end} of the slot (the image is \
         {size} bytes, the tree {tree_bytes}), but slot {slot} holds only {slot_size}: grow the \
         slots or publish a smaller image"
    )]
    TreeDoesNotFit {
        version: String,
        size: u64,
        tree_bytes: u64,
        tree_end: u64,
        slot: crate::slots::Slot,
        slot_size: u64,
    },
    #[error(
        "delta {url} was built from a different image than the booted slot \
         (it needs sha256 {expected}, the slot has {actual}), and no full payload was found beside it"
    )]
    NoMatchingPayload {
        url: String,
        expected: String,
        actual: String,
        #[source]
        full: Box<UpdateError>,
    },
    #[error("{url} is not a full payload")]
    NotFull { url: String },
    #[error("reading the booted slot")]
    BootedRead(#[source] std::io::Error),
    #[error("an update to {version} from {url} is in progress; cancel it first")]
    Busy { version: String, url: String },
    #[error(
        "the payload at {url} changed since this update started (manifest sha256 {now}, was {was})"
    )]
    PayloadChanged {
        url: String,
        was: String,
        now: String,
    },
    #[error("syncing slot")]
    Sync(#[source] std::io::Error),
    #[error(
        "staging stopped after operation {done} of {total}; the written part is kept \
         (`update-agent resume` or the same `stage` continues, `update-agent cancel` drops it)"
    )]
    Interrupted {
        done: usize,
        total: usize,
        #[source]
        source: ApplyError,
    },
    #[error("nothing to cancel: the agent is {0}")]
    NothingToCancel(&'static str),
    #[error(transparent)]
    PostBoot(#[from] PostBootError),
    #[error("fetching channel {channel} from {url}")]
    ChannelFetch {
        channel: String,
        url: String,
        #[source]
        source: Box<FetchError>,
    },
    #[error("reading channel {channel} from {url}")]
    ChannelRead {
        channel: String,
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("channel {channel} from {url}")]
    Channel {
        channel: String,
        url: String,
        #[source]
        source: Box<crate::channel::ChannelError>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PostBootError {
    #[error("no trial boot to mark good: the agent is {state} and slot {booted} booted")]
    NotOnTrial { state: &'static str, booted: Slot },
    #[error("nothing to roll back to: {why}")]
    NoRollbackTarget { why: String },
}

impl From<crate::trust::node::NodeTrustError> for UpdateError {
    fn from(e: crate::trust::node::NodeTrustError) -> Self {
        Self::Trust(Box::new(e))
    }
}
