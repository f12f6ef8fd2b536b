//! Typed errors for reading, checking and trusting payloads. Each names the field and,
//! where there is one, the operation index, so a publisher can find the fault.

use std::fmt;
use std::path::PathBuf;

/// Where in a manifest a fault sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loc {
    Manifest,
    Op(usize),
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Manifest => f.write_str("manifest"),
            Self::Op(i) => write!(f, "operation {i}"),
        }
    }
}

/// A manifest that cannot be decoded or breaks a rule of the format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is {len} bytes, more than the limit of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("{loc}: field `{field}` is cut short (manifest ends early)")]
    Truncated { loc: Loc, field: &'static str },
    #[error("{loc}: field `{field}` is not canonically encoded")]
    NonCanonical { loc: Loc, field: &'static str },
    #[error("unsupported manifest format version {0} (this build reads versions {v1} and {v2})", v1 = super::limits::FORMAT_VERSION, v2 = super::limits::FORMAT_VERSION_VERITY)]
    UnsupportedVersion(u64),
    #[error("operation {op}: unknown operation type {kind}")]
    UnknownOpKind { op: usize, kind: u8 },
    #[error("{loc}: field `{field}` is not valid UTF-8")]
    InvalidUtf8 { loc: Loc, field: &'static str },
    #[error("{loc}: field `{field}` is empty or holds control characters")]
    BadString { loc: Loc, field: &'static str },
    #[error("{loc}: field `{field}` has {count} entries, more than the limit of {max}")]
    TooMany {
        loc: Loc,
        field: &'static str,
        count: u64,
        max: u64,
    },
    #[error("{loc}: field `{field}` is {value}, outside the allowed range (at most {max})")]
    OutOfBounds {
        loc: Loc,
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("{loc}: field `{field}` has invalid value {value}")]
    BadValue {
        loc: Loc,
        field: &'static str,
        value: u64,
    },
    #[error("{count} unexpected bytes after the end of the manifest")]
    TrailingBytes { count: usize },
    #[error("block size {0} is not a power of two between 512 and 65536")]
    BadBlockSize(u32),
    #[error("`{field}` = {value} is not a multiple of the block size {block_size}")]
    NotBlockMultiple {
        field: &'static str,
        value: u64,
        block_size: u32,
    },
    #[error("manifest expires ({expires}) before it was created ({created})")]
    ExpiresBeforeCreated { created: u64, expires: u64 },
    #[error("{loc}: required field `{field}` is missing or empty")]
    Missing { loc: Loc, field: &'static str },
    #[error("{loc}: a {kind} operation must not have `{field}`")]
    NotAllowed {
        loc: Loc,
        kind: &'static str,
        field: &'static str,
    },
    #[error("{loc}: `{field}` extent {index} is empty")]
    EmptyExtent {
        loc: Loc,
        field: &'static str,
        index: usize,
    },
    #[error("{loc}: `{field}` extent {index} (blocks {start}+{blocks}) lies beyond the image's {limit} blocks")]
    ExtentOutOfRange {
        loc: Loc,
        field: &'static str,
        index: usize,
        start: u64,
        blocks: u64,
        limit: u64,
    },
    #[error("operation {op}: target block {block} is also written by operation {other}")]
    Overlap { op: usize, other: usize, block: u64 },
    #[error("no operation writes target blocks {start}+{blocks}")]
    Gap { start: u64, blocks: u64 },
    #[error("operation {op}: source covers {src_blocks} blocks but destination {dst_blocks}")]
    SizeMismatch {
        op: usize,
        src_blocks: u64,
        dst_blocks: u64,
    },
    #[error("operation {op}: data range {offset}+{len} lies outside the {blob_size}-byte blob")]
    DataOutOfBlob {
        op: usize,
        offset: u64,
        len: u64,
        blob_size: u64,
    },
    #[error("manifest: dm-verity parameters: {0}")]
    BadVerity(&'static str),
    #[error("operation {op}: a {kind} operation needs a source image, but this is a full payload")]
    NeedsSource { op: usize, kind: &'static str },
}

/// Faults with keys and signatures.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("reading key file {path}")]
    ReadKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path} is not a {expected} ed25519 key in PEM form")]
    ParseKey {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("reading trusted key directory {path}")]
    ReadKeyDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trusted key directory {path} holds no *.pub keys")]
    NoTrustedKeys { path: PathBuf },
    #[error("not signed")]
    Unsigned,
    #[error("signed only by keys this node does not trust (fingerprints: {fingerprints})")]
    UntrustedKey { fingerprints: String },
    #[error("signature by key {fingerprint} does not match the manifest")]
    BadSignature { fingerprint: String },
    #[error(
        "signed by {have} trusted key(s) ({fingerprints}), fewer than the {need} the \
         root of trust requires"
    )]
    BelowThreshold {
        have: usize,
        need: usize,
        fingerprints: String,
    },
    #[error("manifest expired at {expires} (now {now})")]
    Expired { expires: u64, now: u64 },
    #[error("manifest was created at {created}, in the future (now {now}); check the clock")]
    NotYetValid { created: u64, now: u64 },
}

/// Faults with the payload file around the manifest.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("reading payload {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a regular file; payloads are read only from regular files")]
    NotAFile { path: PathBuf },
    #[error("{path} is not an update-agent payload (bad magic)")]
    BadMagic { path: PathBuf },
    #[error("payload {path}: header field `{field}` is invalid ({value})")]
    BadHeader {
        path: PathBuf,
        field: &'static str,
        value: u64,
    },
    #[error("payload {path} is {actual} bytes, but its header and manifest say {expected}")]
    WrongLength {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("payload {path}: invalid manifest")]
    Manifest {
        path: PathBuf,
        #[source]
        source: ManifestError,
    },
    #[error("payload {path}: signature block is malformed")]
    BadSignatureBlock { path: PathBuf },
    #[error("payload {path} is not trusted")]
    Trust {
        path: PathBuf,
        #[source]
        source: TrustError,
    },
}
