//! `updatectl bundle verify` and `apply`: a payload checked end to end the way a node
//! would, and the image it produces rebuilt and compared.

use std::fs::File;
use std::io::Seek as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::apply::{self, ApplyError, Blob, Event};
use crate::file_target::FileTarget;
use crate::payload::{sign, FileSource, Manifest, OpKind, Payload, Trust, TrustedKeys};
use crate::timefmt;

/// Bytes for people, SI units with two decimals (publishers compare sizes closely).
pub fn human(n: u64) -> String {
    super::render::si_bytes(n, 2)
}

/// A payload or image that fails a check `bundle` makes itself.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("source {path} (sha256 {actual}) is not the image this delta was built from (sha256 {expected})")]
    SourceMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
        /// The failure that led to checking the source.
        #[source]
        cause: ApplyError,
    },
    #[error("payload {path}: blob sha256 {actual} does not match the manifest's {expected}")]
    BlobHash {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// `verify` (output `None`: rebuild into an unnamed scratch file) and `apply`.
pub(super) fn rebuild(
    path: &Path,
    keys_dir: &Path,
    source: Option<&Path>,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let keys = TrustedKeys::load_dir(keys_dir)?;
    let src = FileSource::open(path)?;
    let p = Payload::open(
        &src,
        Trust::Keys {
            keys: &keys,
            now: timefmt::now(),
        },
    )?;
    let m = &p.manifest;
    print_signature(&p);
    check_blob(path, &p)?;
    println!("blob         ok ({}, sha256 matches)", human(m.blob_size));
    let source_file = match source {
        Some(s) => {
            // The source's sha256 is not checked up front: every operation's output is
            // verified anyway, and hashing a whole slot first would cost as much as the
            // apply. It is checked only to explain a failure (below).
            Some(File::open(s).with_context(|| format!("opening source image {}", s.display()))?)
        }
        None if m.is_delta() => {
            anyhow::ensure!(
                output.is_none(),
                "{} is a delta: pass --source with the image it was built from",
                path.display()
            );
            println!("rebuild      skipped: this is a delta; pass --source to rebuild the target");
            return Ok(());
        }
        None => None,
    };
    // With a dm-verity tree the output is what a slot holds: the image, then its tree
    // (so `verify` also checks the signed root, and `apply` writes a slot image).
    let mut target = open_target(output, apply::needed_size(m)?)?;
    let result = apply::apply(
        m,
        Blob {
            source: &src,
            offset: p.blob_offset,
        },
        source_file.as_ref().map(|f| f as &dyn apply::SourceSlot),
        &mut target,
        &apply::Options {
            // `verify` audits everything the manifest claims; `apply` trusts the read-back.
            check_zero_digests: output.is_none(),
            ..apply::Options::default()
        },
        &mut |e: Event| {
            if e == Event::Verifying {
                println!(
                    "written      all {} operations; reading back",
                    m.operations.len()
                );
            }
        },
    );
    let report = explained(result, m, source_file.as_ref().zip(source))?;
    print_report(&p, &report);
    if let Some(o) = output {
        println!("output       {}", o.display());
    }
    Ok(())
}

/// The signature line: who signed what, for which product, until when.
fn print_signature(p: &Payload) {
    let m = &p.manifest;
    let signer = p.signer.map(|f| sign::short(&f)).unwrap_or_default();
    println!(
        "signature    ok (key {signer}); {} {} for {}, expires {}",
        if m.is_delta() {
            "delta"
        } else {
            "full payload"
        },
        m.version,
        m.compatible,
        timefmt::rfc3339(m.expires)
    );
}

/// The blob as a whole against the manifest's sha256; a node checks per operation
/// instead, as it fetches.
fn check_blob(path: &Path, p: &Payload) -> anyhow::Result<()> {
    let m = &p.manifest;
    let blob_sha = {
        let mut f = File::open(path).with_context(|| format!("reading {}", path.display()))?;
        f.seek(std::io::SeekFrom::Start(p.blob_offset))
            .with_context(|| format!("reading blob of {}", path.display()))?;
        crate::hashio::sha256_of(std::io::Read::take(f, m.blob_size))
            .with_context(|| format!("reading blob of {}", path.display()))?
    };
    if blob_sha != m.blob_sha256 {
        return Err(Rejected::BlobHash {
            path: path.to_owned(),
            expected: hex::encode(m.blob_sha256),
            actual: hex::encode(blob_sha),
        }
        .into());
    }
    Ok(())
}

/// The image to write: `output`, or an unnamed scratch file for `verify`.
fn open_target(output: Option<&Path>, size: u64) -> anyhow::Result<FileTarget> {
    Ok(match output {
        Some(o) => {
            FileTarget::create(o, size).with_context(|| format!("creating {}", o.display()))?
        }
        None => {
            let dir = std::env::temp_dir();
            FileTarget::scratch(&dir, size)
                .with_context(|| format!("creating a scratch file in {}", dir.display()))?
        }
    })
}

/// The apply's report, or its error; a wrong source shows up as a bad operation, so
/// a failed delta hashes the source (`source`: the file and its path) to say so
/// plainly if that is the cause.
fn explained(
    result: Result<apply::Report, ApplyError>,
    m: &Manifest,
    source: Option<(&File, &Path)>,
) -> anyhow::Result<apply::Report> {
    match (result, &m.source, source) {
        (Ok(r), _, _) => Ok(r),
        (Err(e), Some(expected), Some((file, spath))) => {
            let actual = apply::hash_source(file, expected.size).ok();
            Err(match actual {
                Some(a) if a != expected.sha256 => Rejected::SourceMismatch {
                    path: spath.to_owned(),
                    expected: hex::encode(expected.sha256),
                    actual: hex::encode(a),
                    cause: e,
                }
                .into(),
                _ => e.into(),
            })
        }
        (Err(e), _, _) => Err(e.into()),
    }
}

/// The rebuilt target, the time each step took, and what a node would download.
fn print_report(p: &Payload, report: &apply::Report) {
    let m = &p.manifest;
    println!(
        "rebuild      ok: target sha256:{} ({} bytes) in {:.2} s \
         (write {:.2} s, flush {:.2} s, read back {:.2} s)",
        hex::encode(m.target_sha256),
        m.target_size,
        report.seconds,
        report.write_seconds,
        report.sync_seconds,
        report.verify_seconds
    );
    println!(
        "download     {} of frames + {} head = {} ({} of {} DATA operations found locally)",
        human(report.bytes_fetched),
        human(p.head_len()),
        human(report.bytes_fetched + p.head_len()),
        report.ops_reused,
        m.operations
            .iter()
            .filter(|o| o.kind == OpKind::Data)
            .count()
    );
}
