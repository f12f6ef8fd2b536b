//! Release payloads: the signed manifest, its byte encoding, the payload file, keys,
//! and the generator that turns a slot image (and optional source images) into payloads.

pub mod codec;
pub mod container;
pub mod error;
pub mod generate;
pub mod limits;
pub mod manifest;
pub mod sign;

pub use container::{FileSource, MemSource, Payload, RangeSource, Trust};
pub use error::{Loc, ManifestError, PayloadError, TrustError};
pub use manifest::{Extent, Manifest, OpKind, Operation, SourceImage, Verity};
pub use sign::{PublisherKey, TrustedKeys};
