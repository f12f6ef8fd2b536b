//! The canonical byte encoding of a manifest (spec: docs/payload-format.md).
//!
//! Integers are unsigned LEB128 in their shortest form, strings are a length then
//! UTF-8, digests are raw bytes. There is exactly one encoding of each manifest, so
//! the bytes that are signed are the bytes that are decoded; a non-shortest integer
//! or trailing garbage is an error, not something to normalise.

use super::error::{Loc, ManifestError};
use super::limits;
use super::limits::FORMAT_VERSION_VERITY;
use super::manifest::{Extent, Manifest, OpKind, Operation, SourceImage, Verity, FORMAT_VERSION};

/// Serialises `m` to its canonical bytes.
pub fn encode(m: &Manifest) -> Vec<u8> {
    let mut w = Vec::with_capacity(256 + m.operations.len() * 64);
    put_uint(
        &mut w,
        if m.verity.is_some() {
            FORMAT_VERSION_VERITY
        } else {
            FORMAT_VERSION
        },
    );
    put_str(&mut w, &m.compatible);
    put_str(&mut w, &m.version);
    put_opt_str(&mut w, m.min_source_version.as_deref());
    put_uint(&mut w, m.created);
    put_uint(&mut w, m.expires);
    put_uint(&mut w, u64::from(m.block_size));
    put_uint(&mut w, m.target_size);
    w.extend_from_slice(&m.target_sha256);
    match &m.verity {
        // Version 1: the field is an empty length.
        None => put_uint(&mut w, 0),
        Some(v) => {
            put_uint(&mut w, v.hash_offset);
            put_uint(&mut w, v.salt.len() as u64);
            w.extend_from_slice(&v.salt);
            w.extend_from_slice(&v.uuid);
            w.extend_from_slice(&v.root_hash);
        }
    }
    match &m.source {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_uint(&mut w, s.size);
            w.extend_from_slice(&s.sha256);
        }
    }
    put_uint(&mut w, m.blob_size);
    w.extend_from_slice(&m.blob_sha256);
    put_uint(&mut w, m.operations.len() as u64);
    for op in &m.operations {
        w.push(op.kind as u8);
        put_extents(&mut w, &op.dst);
        put_extents(&mut w, &op.src);
        if op.kind.has_data() {
            put_uint(&mut w, op.data_offset);
            put_uint(&mut w, op.data_len);
        }
        w.extend_from_slice(&op.sha256);
    }
    w
}

/// Parses canonical manifest bytes. Structure and limits only; call
/// [`Manifest::validate`] for the semantic rules.
pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
    if bytes.len() as u64 > limits::MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge {
            len: bytes.len() as u64,
            max: limits::MAX_MANIFEST_BYTES,
        });
    }
    let mut r = Reader { buf: bytes, pos: 0 };
    let m = Loc::Manifest;
    let version = r.uint(m, "format_version")?;
    if version != FORMAT_VERSION && version != FORMAT_VERSION_VERITY {
        return Err(ManifestError::UnsupportedVersion(version));
    }
    let compatible = r.string(m, "compatible")?;
    let release = r.string(m, "version")?;
    let min_source_version = match r.byte(m, "min_source_version")? {
        0 => None,
        1 => Some(r.string(m, "min_source_version")?),
        v => return Err(bad(m, "min_source_version", v)),
    };
    let created = r.uint(m, "created")?;
    let expires = r.uint(m, "expires")?;
    let block_size = r.uint(m, "block_size")?;
    let block_size = u32::try_from(block_size).map_err(|_| ManifestError::OutOfBounds {
        loc: m,
        field: "block_size",
        value: block_size,
        max: u64::from(limits::MAX_BLOCK_SIZE),
    })?;
    let target_size = r.uint(m, "target_size")?;
    let target_sha256 = r.digest(m, "target_sha256")?;
    let verity = verity(&mut r, version)?;
    let source = match r.byte(m, "source")? {
        0 => None,
        1 => Some(SourceImage {
            size: r.uint(m, "source_size")?,
            sha256: r.digest(m, "source_sha256")?,
        }),
        v => return Err(bad(m, "source", v)),
    };
    let blob_size = r.uint(m, "blob_size")?;
    let blob_sha256 = r.digest(m, "blob_sha256")?;
    let operations = operations(&mut r)?;
    if r.remaining() != 0 {
        return Err(ManifestError::TrailingBytes {
            count: r.remaining(),
        });
    }
    Ok(Manifest {
        compatible,
        version: release,
        min_source_version,
        created,
        expires,
        block_size,
        target_size,
        target_sha256,
        verity,
        source,
        blob_size,
        blob_sha256,
        operations,
    })
}

/// Field 10: the dm-verity tree's parameters in version 2; in version 1 an empty
/// length (it once allowed an opaque root hash no node ever used; anything but empty
/// is refused rather than half understood).
fn verity(r: &mut Reader<'_>, version: u64) -> Result<Option<Verity>, ManifestError> {
    let m = Loc::Manifest;
    if version == FORMAT_VERSION_VERITY {
        return Ok(Some(r.verity(m)?));
    }
    match r.uint(m, "verity_root_hash")? {
        0 => Ok(None),
        v => Err(ManifestError::BadValue {
            loc: m,
            field: "verity_root_hash",
            value: v,
        }),
    }
}

/// The operations: their count (bounded by the limit and by what the input can
/// hold), then each one; the extents of all of them count against one limit.
fn operations(r: &mut Reader<'_>) -> Result<Vec<Operation>, ManifestError> {
    let m = Loc::Manifest;
    let count = r.count(m, "operations", limits::MAX_OPERATIONS)?;
    // Each operation takes at least 35 bytes (kind, two empty extent lists, digest);
    // refuse counts the input cannot hold before reserving memory for them.
    if count.saturating_mul(35) > r.remaining() as u64 {
        return Err(ManifestError::Truncated {
            loc: m,
            field: "operations",
        });
    }
    let mut operations = Vec::with_capacity(count as usize);
    let mut extents_total = 0u64;
    for i in 0..count as usize {
        operations.push(operation(r, i, &mut extents_total)?);
    }
    Ok(operations)
}

/// Operation `i`: kind, destination and source extents, its frame (kinds with data),
/// the sha256 of what it writes.
fn operation(
    r: &mut Reader<'_>,
    i: usize,
    extents_total: &mut u64,
) -> Result<Operation, ManifestError> {
    let loc = Loc::Op(i);
    let raw = r.byte(loc, "kind")?;
    let kind = OpKind::from_wire(raw).ok_or(ManifestError::UnknownOpKind { op: i, kind: raw })?;
    let dst = r.extents(loc, "dst", extents_total)?;
    let src = r.extents(loc, "src", extents_total)?;
    let (data_offset, data_len) = if kind.has_data() {
        (r.uint(loc, "data_offset")?, r.uint(loc, "data_len")?)
    } else {
        (0, 0)
    };
    let sha256 = r.digest(loc, "sha256")?;
    Ok(Operation {
        kind,
        dst,
        src,
        data_offset,
        data_len,
        sha256,
    })
}

fn bad(loc: Loc, field: &'static str, value: u8) -> ManifestError {
    ManifestError::BadValue {
        loc,
        field,
        value: u64::from(value),
    }
}

pub(crate) fn put_uint(w: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            w.push(b);
            return;
        }
        w.push(b | 0x80);
    }
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    put_uint(w, s.len() as u64);
    w.extend_from_slice(s.as_bytes());
}

fn put_opt_str(w: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => w.push(0),
        Some(s) => {
            w.push(1);
            put_str(w, s);
        }
    }
}

fn put_extents(w: &mut Vec<u8>, extents: &[Extent]) {
    put_uint(w, extents.len() as u64);
    for e in extents {
        put_uint(w, e.start);
        put_uint(w, e.blocks);
    }
}

pub(crate) struct Reader<'a> {
    pub(crate) buf: &'a [u8],
    pub(crate) pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(
        &mut self,
        n: usize,
        loc: Loc,
        field: &'static str,
    ) -> Result<&'a [u8], ManifestError> {
        if self.remaining() < n {
            return Err(ManifestError::Truncated { loc, field });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Field 10 of a version 2 manifest: the dm-verity tree's parameters.
    fn verity(&mut self, loc: Loc) -> Result<Verity, ManifestError> {
        let hash_offset = self.uint(loc, "verity_hash_offset")?;
        let n = self.uint(loc, "verity_salt")?;
        if n > limits::MAX_VERITY_SALT {
            return Err(ManifestError::OutOfBounds {
                loc,
                field: "verity_salt",
                value: n,
                max: limits::MAX_VERITY_SALT,
            });
        }
        let salt = self.take(n as usize, loc, "verity_salt")?.to_vec();
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(self.take(16, loc, "verity_uuid")?);
        let root_hash = self.digest(loc, "verity_root_hash")?;
        Ok(Verity {
            hash_offset,
            salt,
            uuid,
            root_hash,
        })
    }

    fn byte(&mut self, loc: Loc, field: &'static str) -> Result<u8, ManifestError> {
        Ok(self.take(1, loc, field)?[0])
    }

    pub(crate) fn digest(
        &mut self,
        loc: Loc,
        field: &'static str,
    ) -> Result<[u8; 32], ManifestError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.take(32, loc, field)?);
        Ok(d)
    }

    pub(crate) fn uint(&mut self, loc: Loc, field: &'static str) -> Result<u64, ManifestError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.byte(loc, field)?;
            let bits = u64::from(b & 0x7f);
            // The tenth byte may only carry the top bit of a u64.
            if i == 9 && b > 1 {
                return Err(ManifestError::NonCanonical { loc, field });
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                // A zero final byte after the first means a longer-than-needed encoding.
                if i > 0 && b == 0 {
                    return Err(ManifestError::NonCanonical { loc, field });
                }
                return Ok(v);
            }
        }
        Err(ManifestError::NonCanonical { loc, field })
    }

    pub(crate) fn count(
        &mut self,
        loc: Loc,
        field: &'static str,
        max: u64,
    ) -> Result<u64, ManifestError> {
        let n = self.uint(loc, field)?;
        if n > max {
            return Err(ManifestError::TooMany {
                loc,
                field,
                count: n,
                max,
            });
        }
        Ok(n)
    }

    fn string(&mut self, loc: Loc, field: &'static str) -> Result<String, ManifestError> {
        let n = self.uint(loc, field)?;
        if n > limits::MAX_STRING {
            return Err(ManifestError::OutOfBounds {
                loc,
                field,
                value: n,
                max: limits::MAX_STRING,
            });
        }
        let bytes = self.take(n as usize, loc, field)?;
        let s =
            std::str::from_utf8(bytes).map_err(|_| ManifestError::InvalidUtf8 { loc, field })?;
        if s.is_empty() || s.chars().any(char::is_control) {
            return Err(ManifestError::BadString { loc, field });
        }
        Ok(s.to_owned())
    }

    fn extents(
        &mut self,
        loc: Loc,
        field: &'static str,
        total: &mut u64,
    ) -> Result<Vec<Extent>, ManifestError> {
        let n = self.count(loc, field, limits::MAX_EXTENTS_PER_OP)?;
        *total += n;
        if *total > limits::MAX_EXTENTS_TOTAL {
            return Err(ManifestError::TooMany {
                loc,
                field: "extents (whole manifest)",
                count: *total,
                max: limits::MAX_EXTENTS_TOTAL,
            });
        }
        // Every extent takes at least two bytes.
        if n.saturating_mul(2) > self.remaining() as u64 {
            return Err(ManifestError::Truncated { loc, field });
        }
        let mut v = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let start = self.uint(loc, field)?;
            let blocks = self.uint(loc, field)?;
            v.push(Extent { start, blocks });
        }
        Ok(v)
    }
}
