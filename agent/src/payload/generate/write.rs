//! The end of generation: frames compressed on all cores, blob offsets assigned,
//! the manifest validated and signed, the payload written and renamed into place.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::image::{gather, sha_of, Image};
use super::plan::Planned;
use super::{GenerateError, Options, Summary};
use crate::payload::container::write_payload;
use crate::payload::manifest::{Manifest, OpKind, Operation, SourceImage};
use crate::payload::sign::PublisherKey;

/// Compresses one frame, with `reference` as its zstd prefix when not empty.
pub(crate) fn compress_frame(
    data: &[u8],
    reference: &[u8],
    level: i32,
) -> Result<Vec<u8>, &'static str> {
    use zstd::zstd_safe::{CCtx, CParameter};
    let mut cctx = CCtx::create();
    let window = (data.len() + reference.len())
        .max(1 << 17)
        .next_power_of_two();
    let window_log = window.trailing_zeros().min(27);
    let e = |c| zstd::zstd_safe::get_error_name(c);
    cctx.set_parameter(CParameter::CompressionLevel(level))
        .map_err(e)?;
    cctx.set_parameter(CParameter::WindowLog(window_log))
        .map_err(e)?;
    cctx.set_parameter(CParameter::ContentSizeFlag(true))
        .map_err(e)?;
    cctx.set_parameter(CParameter::ChecksumFlag(false))
        .map_err(e)?;
    if !reference.is_empty() {
        cctx.ref_prefix(reference).map_err(e)?;
    }
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut out, data).map_err(e)?;
    Ok(out)
}

/// A compressed frame (for DATA/PATCH) and the sha256 of the operation's output.
type FrameResult = Result<(Option<Vec<u8>>, [u8; 32]), GenerateError>;

/// The operations whose frames are in the blob file, and the blob's size and sha256.
struct Blob {
    ops: Vec<Operation>,
    size: u64,
    sha256: [u8; 32],
}

/// Compresses frames, assigns blob offsets, signs and writes the payload.
pub(super) fn finish(
    target: &Image,
    source: Option<&Image>,
    source_info: Option<SourceImage>,
    mut planned: Vec<Planned>,
    opts: &Options,
    key: &PublisherKey,
    out: &Path,
) -> Result<Summary, GenerateError> {
    planned.sort_by_key(|p| p.dst.first().map_or(0, |e| e.start));
    let werr = |source| GenerateError::Write {
        path: out.to_owned(),
        source,
    };
    let blob_path = temp_path(out, "blob.tmp");
    let mut blob_file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&blob_path)
        .map_err(werr)?;
    let _cleanup = RemoveOnDrop(blob_path);
    let blob = write_blob(target, source, &planned, opts, &mut blob_file, out)?;
    let manifest = manifest_of(target, source_info, blob, opts);
    // The generator checks its own output with the same rules a node applies.
    manifest.validate().map_err(GenerateError::Metadata)?;
    let tmp = temp_path(out, "tmp");
    let _cleanup_tmp = RemoveOnDrop(tmp.clone());
    let mut f = File::create(&tmp).map_err(werr)?;
    let size = write_payload(&mut f, &manifest, key, &mut blob_file).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    fs::rename(&tmp, out).map_err(werr)?;
    Ok(Summary {
        path: out.to_owned(),
        payload_bytes: size,
        manifest_bytes: crate::payload::codec::encode(&manifest).len() as u64,
        operations: manifest.operations.len(),
        delta: manifest.is_delta(),
    })
}

/// A temporary name beside `out`, hidden (`.NAME.SUFFIX`).
fn temp_path(out: &Path, suffix: &str) -> PathBuf {
    let dir = out.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.{suffix}",
        out.file_name()
            .map_or("payload".into(), |n| n.to_string_lossy())
    ))
}

/// Compresses the planned operations' frames on all cores and appends them to
/// `blob` in operation order (errors name the payload `out` it is for).
fn write_blob(
    target: &Image,
    source: Option<&Image>,
    planned: &[Planned],
    opts: &Options,
    blob: &mut File,
    out: &Path,
) -> Result<Blob, GenerateError> {
    let mut blob_hash = Sha256::new();
    let mut blob_size = 0u64;
    let mut ops: Vec<Operation> = Vec::with_capacity(planned.len());
    // Batches bound the compressed frames held in memory at once.
    for (batch_no, batch) in planned.chunks(16).enumerate() {
        let results = compress_batch(target, source, batch, batch_no * 16, opts);
        for (p, r) in batch.iter().zip(results) {
            let (frame, sha256) = r?;
            let (data_offset, data_len) = match frame {
                Some(f) => {
                    blob.write_all(&f).map_err(|source| GenerateError::Write {
                        path: out.to_owned(),
                        source,
                    })?;
                    blob_hash.update(&f);
                    let at = blob_size;
                    blob_size += f.len() as u64;
                    (at, f.len() as u64)
                }
                None => (0, 0),
            };
            ops.push(Operation {
                kind: p.kind,
                dst: p.dst.clone(),
                src: p.src.clone(),
                data_offset,
                data_len,
                sha256,
            });
        }
    }
    Ok(Blob {
        ops,
        size: blob_size,
        sha256: blob_hash.finalize().into(),
    })
}

/// Hashes each operation's output and compresses its frame (DATA, and PATCH against
/// its reference), in parallel; `first` is the batch's first chunk number.
fn compress_batch(
    target: &Image,
    source: Option<&Image>,
    batch: &[Planned],
    first: usize,
    opts: &Options,
) -> Vec<FrameResult> {
    let bs = opts.block_size as usize;
    batch
        .par_iter()
        .enumerate()
        .map(|(j, p)| {
            let sha = sha_of(target, bs, &p.dst);
            if !p.kind.has_data() {
                return Ok((None, sha));
            }
            let data = gather(target, bs, &p.dst);
            let reference = match (p.kind, source) {
                (OpKind::Patch, Some(src)) => gather(src, bs, &p.src),
                _ => Vec::new(),
            };
            let frame = compress_frame(&data, &reference, opts.level).map_err(|message| {
                GenerateError::Compress {
                    chunk: first + j,
                    message,
                }
            })?;
            Ok((Some(frame), sha))
        })
        .collect()
}

/// The manifest of the release in `opts` with `blob`'s operations.
fn manifest_of(
    target: &Image,
    source_info: Option<SourceImage>,
    blob: Blob,
    opts: &Options,
) -> Manifest {
    Manifest {
        compatible: opts.compatible.clone(),
        version: opts.version.clone(),
        min_source_version: opts.min_source_version.clone(),
        created: opts.created,
        expires: opts.expires,
        block_size: opts.block_size,
        target_size: target.len(),
        target_sha256: target.sha256(),
        verity: opts.verity.clone(),
        source: source_info,
        blob_size: blob.size,
        blob_sha256: blob.sha256,
        operations: blob.ops,
    }
}

/// Removes a temporary file when generation ends, whether it succeeded or not.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
