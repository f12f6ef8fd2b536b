//! Hard bounds on what a manifest may ask for, and the format version this build reads.
//! They keep decoding and applying bounded in memory and time whatever a hostile or
//! broken payload says.

/// Version of the manifest encoding this build writes for a payload without a
/// dm-verity tree (and the first it reads).
pub const FORMAT_VERSION: u64 = 1;
/// The version that adds the dm-verity tree's parameters (field 10); written only when
/// a manifest has them, so nodes that read only version 1 keep reading the rest.
pub const FORMAT_VERSION_VERITY: u64 = 2;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: u64 = 32 << 20;
/// Largest signature block accepted, in bytes.
pub const MAX_SIGNATURE_BYTES: u64 = 64 << 10;
/// Most signatures one payload may carry.
pub const MAX_SIGNATURES: u64 = 16;
/// Most operations in one manifest.
pub const MAX_OPERATIONS: u64 = 1 << 20;
/// Most extents in one operation's `dst` or `src` list.
pub const MAX_EXTENTS_PER_OP: u64 = 1 << 16;
/// Most extents in the whole manifest.
pub const MAX_EXTENTS_TOTAL: u64 = 1 << 22;
/// Longest `compatible` / version string.
pub const MAX_STRING: u64 = 256;
/// Longest dm-verity salt (what the verity superblock holds).
pub const MAX_VERITY_SALT: u64 = 256;
/// Largest image (target or source): 16 TiB.
pub const MAX_IMAGE_SIZE: u64 = 1 << 44;
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 1 << 16;
/// Most bytes one DATA or PATCH frame may decompress to; a decoder holds this much.
pub const MAX_FRAME_OUTPUT: u64 = 16 << 20;
/// Largest PATCH reference; a decoder holds this much besides the output.
pub const MAX_REFERENCE: u64 = 32 << 20;
/// Latest `expires` accepted: 9999-12-31T23:59:59Z.
pub const MAX_TIMESTAMP: u64 = 253_402_300_799;
