//! The payload file: a fixed header, the manifest, its signatures, then the blob.
//!
//! ```text
//! 0   magic "UAPAYLD\0" | u32 header version | u32 manifest length | u32 signatures length
//! 20  u32 reserved | u64 blob offset | 32 reserved bytes          (all little-endian, 64 bytes)
//! 64  manifest (canonical bytes, signed) | signature block | zero padding
//! blob offset (4 KiB aligned): the blob, `blob_size` bytes of zstd frames
//! ```
//! Everything before the blob fits in one range request, and any operation's frame
//! is one more: `blob offset + data_offset`, `data_len` bytes.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use super::codec::{self, Reader};
use super::error::{Loc, ManifestError, PayloadError};
use super::limits;
use super::manifest::Manifest;
use super::sign::{Fingerprint, PublisherKey, SignatureEntry, TrustedKeys};

pub const MAGIC: [u8; 8] = *b"UAPAYLD\0";
pub const HEADER_VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 64;
pub const BLOB_ALIGN: u64 = 4096;

/// Random access to the bytes of a payload, wherever they live (file, HTTP, memory).
pub trait RangeSource: Sync {
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`; short data is an error.
    fn read_range(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Name shown in errors (a path or URL).
    fn name(&self) -> &Path;
    /// The bytes at `offset`, borrowed where the source already holds them in memory
    /// (an HTTP source's first response), so checking a payload's head copies nothing
    /// more; otherwise read once into a buffer of their own.
    fn bytes(&self, offset: u64, len: usize) -> io::Result<Cow<'_, [u8]>> {
        let mut v = vec![0u8; len];
        self.read_range(offset, &mut v)?;
        Ok(Cow::Owned(v))
    }
    /// [`Self::read_range`], handing each piece of `buf` to `arrived` as it comes in, in
    /// order, so a caller can keep what arrived before an interruption. Sources that
    /// download override it; the others hand over the whole range at the end.
    fn read_range_streaming(
        &self,
        offset: u64,
        buf: &mut [u8],
        arrived: &mut dyn FnMut(&[u8]),
    ) -> io::Result<()> {
        self.read_range(offset, buf)?;
        arrived(buf);
        Ok(())
    }
    /// Whether the bytes come over a network (worth keeping across restarts).
    fn is_remote(&self) -> bool {
        false
    }
}

/// A payload in a local file.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
    path: PathBuf,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self, PayloadError> {
        let io = |source| PayloadError::Io {
            path: path.to_owned(),
            source,
        };
        // Non-blocking, so a FIFO or a device that never answers cannot hold the
        // caller in open(2); then only a regular file is read.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(PayloadError::NotAFile {
                path: path.to_owned(),
            });
        }
        let len = meta.len();
        Ok(Self {
            file,
            len,
            path: path.to_owned(),
        })
    }
}

impl RangeSource for FileSource {
    fn size(&self) -> u64 {
        self.len
    }
    fn read_range(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn name(&self) -> &Path {
        &self.path
    }
}

/// What a payload is trusted against when it is opened.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// Signatures must verify against these keys and the manifest must be current at `now`
    /// (seconds since the Unix epoch).
    Keys { keys: &'a TrustedKeys, now: u64 },
    /// Only structure is checked: for `bundle inspect`, never for writing a slot.
    InspectOnly,
}

/// An opened payload: a manifest that passed every check asked for.
#[derive(Debug, Clone)]
pub struct Payload {
    pub manifest: Manifest,
    pub manifest_len: u64,
    pub signatures: Vec<SignatureEntry>,
    /// The key whose signature was verified; `None` when opened with `InspectOnly`.
    pub signer: Option<Fingerprint>,
    pub blob_offset: u64,
}

impl Payload {
    /// Bytes before the blob: what a node downloads before any operation.
    pub fn head_len(&self) -> u64 {
        self.blob_offset
    }

    pub fn open(src: &dyn RangeSource, trust: Trust<'_>) -> Result<Self, PayloadError> {
        let path = src.name().to_owned();
        let io = |source| PayloadError::Io {
            path: path.clone(),
            source,
        };
        let Layout {
            manifest_len,
            sig_len,
            blob_offset,
        } = read_header(src, &path)?;
        // Checked where it lies: the signature is verified on these bytes before any
        // copy or decode.
        let head = src
            .bytes(HEADER_LEN, (blob_offset - HEADER_LEN) as usize)
            .map_err(io)?;
        let (head, padding) = head.split_at((manifest_len + sig_len) as usize);
        if padding.iter().any(|&b| b != 0) {
            return Err(PayloadError::BadHeader {
                path,
                field: "padding",
                value: 0,
            });
        }
        let (manifest_bytes, sig_bytes) = head.split_at(manifest_len as usize);
        let signatures = decode_signatures(sig_bytes)
            .ok_or_else(|| PayloadError::BadSignatureBlock { path: path.clone() })?;
        let (signer, manifest) = verify_and_decode(manifest_bytes, &signatures, trust, &path)?;
        let expected = blob_offset.saturating_add(manifest.blob_size);
        if src.size() != expected {
            return Err(PayloadError::WrongLength {
                path,
                expected,
                actual: src.size(),
            });
        }
        Ok(Self {
            manifest,
            manifest_len,
            signatures,
            signer,
            blob_offset,
        })
    }
}

/// Where the parts of a payload lie, from its header.
struct Layout {
    manifest_len: u64,
    sig_len: u64,
    blob_offset: u64,
}

/// The fixed header of the payload at `path`: magic, version, the lengths (within
/// the limits) and the one blob offset they allow; reserved bytes zero.
fn read_header(src: &dyn RangeSource, path: &Path) -> Result<Layout, PayloadError> {
    let path = path.to_owned();
    if src.size() < HEADER_LEN {
        return Err(PayloadError::BadMagic { path });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    src.read_range(0, &mut header)
        .map_err(|source| PayloadError::Io {
            path: path.clone(),
            source,
        })?;
    if header[..8] != MAGIC {
        return Err(PayloadError::BadMagic { path });
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([header[o], header[o + 1], header[o + 2], header[o + 3]]);
    let bad = |field, value: u64| PayloadError::BadHeader {
        path: path.clone(),
        field,
        value,
    };
    let version = u32_at(8);
    if version != HEADER_VERSION {
        return Err(bad("header_version", u64::from(version)));
    }
    let manifest_len = u64::from(u32_at(12));
    let sig_len = u64::from(u32_at(16));
    let mut blob_offset_bytes = [0u8; 8];
    blob_offset_bytes.copy_from_slice(&header[24..32]);
    let blob_offset = u64::from_le_bytes(blob_offset_bytes);
    if u32_at(20) != 0 || header[32..].iter().any(|&b| b != 0) {
        return Err(bad("reserved", 0));
    }
    if manifest_len > limits::MAX_MANIFEST_BYTES {
        return Err(PayloadError::Manifest {
            path,
            source: ManifestError::TooLarge {
                len: manifest_len,
                max: limits::MAX_MANIFEST_BYTES,
            },
        });
    }
    if sig_len == 0 || sig_len > limits::MAX_SIGNATURE_BYTES {
        return Err(bad("signatures_length", sig_len));
    }
    let head_end = HEADER_LEN + manifest_len + sig_len;
    // One layout per manifest: the blob starts at the first aligned offset, and the
    // padding before it is zeros, so the unsigned bytes cannot carry anything.
    if blob_offset != head_end.div_ceil(BLOB_ALIGN) * BLOB_ALIGN || blob_offset > src.size() {
        return Err(bad("blob_offset", blob_offset));
    }
    Ok(Layout {
        manifest_len,
        sig_len,
        blob_offset,
    })
}

/// The signature checked on the raw manifest bytes (with `Trust::Keys`), then the
/// manifest decoded, validated and, with keys, checked against the clock.
fn verify_and_decode(
    manifest_bytes: &[u8],
    signatures: &[SignatureEntry],
    trust: Trust<'_>,
    path: &Path,
) -> Result<(Option<Fingerprint>, Manifest), PayloadError> {
    let trust_err = |source| PayloadError::Trust {
        path: path.to_owned(),
        source,
    };
    // The signature is checked on the raw bytes before the decoder sees them, so a
    // hostile manifest from an untrusted publisher never reaches the parser.
    let signer = match trust {
        Trust::Keys { keys, .. } => {
            Some(keys.verify(manifest_bytes, signatures).map_err(trust_err)?)
        }
        Trust::InspectOnly => None,
    };
    let manifest = codec::decode(manifest_bytes)
        .and_then(|m| m.validate().map(|()| m))
        .map_err(|source| PayloadError::Manifest {
            path: path.to_owned(),
            source,
        })?;
    if let Trust::Keys { now, .. } = trust {
        check_validity(&manifest, now).map_err(trust_err)?;
    }
    Ok((signer, manifest))
}

/// Clock skew tolerated for a manifest created "in the future".
const CLOCK_SKEW: u64 = 300;

fn check_validity(m: &Manifest, now: u64) -> Result<(), super::error::TrustError> {
    use super::error::TrustError;
    if now >= m.expires {
        return Err(TrustError::Expired {
            expires: m.expires,
            now,
        });
    }
    if m.created > now.saturating_add(CLOCK_SKEW) {
        return Err(TrustError::NotYetValid {
            created: m.created,
            now,
        });
    }
    Ok(())
}

fn decode_signatures(bytes: &[u8]) -> Option<Vec<SignatureEntry>> {
    let mut r = Reader { buf: bytes, pos: 0 };
    let loc = Loc::Manifest;
    let n = r.count(loc, "signatures", limits::MAX_SIGNATURES).ok()?;
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let key = r.digest(loc, "key").ok()?;
        let mut signature = [0u8; 64];
        signature.copy_from_slice(r.take(64, loc, "signature").ok()?);
        v.push(SignatureEntry { key, signature });
    }
    (r.remaining() == 0).then_some(v)
}

fn encode_signatures(sigs: &[SignatureEntry]) -> Vec<u8> {
    let mut w = Vec::new();
    codec::put_uint(&mut w, sigs.len() as u64);
    for s in sigs {
        w.extend_from_slice(&s.key);
        w.extend_from_slice(&s.signature);
    }
    w
}

/// Everything before the blob: header, manifest, signatures, padding to the blob.
pub fn head_bytes(manifest_bytes: &[u8], signatures: &[SignatureEntry]) -> io::Result<Vec<u8>> {
    let sigs = encode_signatures(signatures);
    let head_end = HEADER_LEN + manifest_bytes.len() as u64 + sigs.len() as u64;
    let blob_offset = head_end.div_ceil(BLOB_ALIGN) * BLOB_ALIGN;
    let len32 = |n: usize| {
        u32::try_from(n)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "manifest too large"))
    };
    let mut head = Vec::with_capacity(blob_offset as usize);
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&HEADER_VERSION.to_le_bytes());
    head.extend_from_slice(&len32(manifest_bytes.len())?.to_le_bytes());
    head.extend_from_slice(&len32(sigs.len())?.to_le_bytes());
    head.extend_from_slice(&0u32.to_le_bytes());
    head.extend_from_slice(&blob_offset.to_le_bytes());
    head.resize(HEADER_LEN as usize, 0);
    head.extend_from_slice(manifest_bytes);
    head.extend_from_slice(&sigs);
    head.resize(blob_offset as usize, 0);
    Ok(head)
}

/// A whole payload in memory from raw parts (small payloads, tests, tools that
/// re-sign a manifest).
pub fn assemble(
    manifest_bytes: &[u8],
    signatures: &[SignatureEntry],
    blob: &[u8],
) -> io::Result<Vec<u8>> {
    let mut v = head_bytes(manifest_bytes, signatures)?;
    v.extend_from_slice(blob);
    Ok(v)
}

/// Writes a complete payload to `out`: header, signed manifest, then `blob` copied in.
/// `manifest.blob_size` and `blob_sha256` must already describe `blob`.
pub fn write_payload(
    out: &mut File,
    manifest: &Manifest,
    key: &PublisherKey,
    blob: &mut File,
) -> io::Result<u64> {
    let manifest_bytes = codec::encode(manifest);
    let head = head_bytes(&manifest_bytes, &[key.sign(&manifest_bytes)])?;
    out.write_all(&head)?;
    io::Seek::seek(blob, io::SeekFrom::Start(0))?;
    let copied = io::copy(blob, out)?;
    if copied != manifest.blob_size {
        return Err(io::Error::other(format!(
            "blob is {copied} bytes but the manifest says {}",
            manifest.blob_size
        )));
    }
    Ok(head.len() as u64 + copied)
}

/// A payload held in memory.
#[derive(Debug, Clone)]
pub struct MemSource {
    pub bytes: Vec<u8>,
    pub name: PathBuf,
}

impl RangeSource for MemSource {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    fn read_range(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let src = self
            .bytes
            .get(start..end)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn name(&self) -> &Path {
        &self.name
    }
    fn bytes(&self, offset: u64, len: usize) -> io::Result<Cow<'_, [u8]>> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start.checked_add(len).ok_or(io::ErrorKind::UnexpectedEof)?;
        self.bytes
            .get(start..end)
            .map(Cow::Borrowed)
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}
