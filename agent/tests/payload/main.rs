//! Payload format, generator and apply engine, end to end on real files.
//!
//! One test binary for the whole payload room (fewer binaries link faster).
//!
//! The parts: `roundtrip.rs` generate then apply gives the image back, the decoder on
//! any bytes; `admission.rs` what opening a payload refuses (hostile manifests, trust,
//! the head, ranges and padding); `engine.rs` the engine's failures (a flipped byte,
//! the wrong source, cancel); `publisher.rs` `updatectl bundle` as a publisher runs it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use proptest::prelude::*;
use update_agent::apply::{self, ApplyError, Blob};
use update_agent::file_target::FileTarget;
use update_agent::payload::codec;
use update_agent::payload::container::{assemble, MemSource, Trust};
use update_agent::payload::generate::{self, Image, Options};
use update_agent::payload::sign::{PublisherKey, SignatureEntry};
use update_agent::payload::{
    Extent, Loc, Manifest, ManifestError, OpKind, Payload, PayloadError, TrustError, TrustedKeys,
};

const BS: usize = 4096;
const NOW: u64 = 1_800_000_000;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Text-like content: compressible, and similar blocks share long runs.
    fn block(&mut self) -> Vec<u8> {
        const WORDS: [&str; 12] = [
            "kernel ",
            "update ",
            "slot ",
            "verity ",
            "zstd ",
            "patch ",
            "grub ",
            "node ",
            "fleet ",
            "\n",
            "0x7f45 ",
            "rollback ",
        ];
        let mut v = Vec::with_capacity(BS);
        while v.len() < BS {
            if self.below(8) == 0 {
                v.extend_from_slice(&self.next().to_le_bytes());
            } else {
                v.extend_from_slice(WORDS[self.below(WORDS.len() as u64) as usize].as_bytes());
            }
        }
        v.truncate(BS);
        v
    }
}

/// A source image and a target made from it with shared, moved, changed, zero and
/// fresh blocks.
fn image_pair(seed: u64, blocks: usize, extra: usize) -> (Vec<u8>, Vec<u8>) {
    let mut r = Rng(seed | 1);
    let mut src = Vec::with_capacity(blocks * BS);
    for _ in 0..blocks {
        if r.below(5) == 0 {
            src.extend(std::iter::repeat_n(0u8, BS));
        } else {
            src.extend(r.block());
        }
    }
    let mut tgt = Vec::with_capacity((blocks + extra) * BS);
    for i in 0..blocks + extra {
        let pick = r.below(10);
        let j = r.below(blocks as u64) as usize;
        match pick {
            0..=3 if i < blocks => tgt.extend_from_slice(&src[i * BS..(i + 1) * BS]),
            4 | 5 => tgt.extend_from_slice(&src[j * BS..(j + 1) * BS]),
            6 | 7 => {
                let mut b = src[j * BS..(j + 1) * BS].to_vec();
                for _ in 0..1 + r.below(6) {
                    let at = r.below(BS as u64) as usize;
                    b[at] = b[at].wrapping_add(1 + r.below(200) as u8);
                }
                tgt.extend(b);
            }
            8 => tgt.extend(std::iter::repeat_n(0u8, BS)),
            _ => tgt.extend(r.block()),
        }
    }
    (src, tgt)
}

fn key() -> PublisherKey {
    PublisherKey::from_seed([7u8; 32])
}

fn trusted() -> TrustedKeys {
    let mut k = TrustedKeys::default();
    k.add(key().public());
    k
}

fn small_opts() -> Options {
    let mut o = Options::new("test-board", "2.0", NOW - 10, NOW + 86_400);
    o.level = 3;
    o.delta_chunk = 16 << 10;
    o.data_chunk = 32 << 10;
    o.max_reference = 64 << 10;
    o
}

struct Fixture {
    dir: tempfile::TempDir,
    src: PathBuf,
    tgt: PathBuf,
    target_bytes: Vec<u8>,
}

impl Fixture {
    fn new(seed: u64, blocks: usize, extra: usize) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (s, t) = image_pair(seed, blocks, extra);
        let src = dir.path().join("v1.img");
        let tgt = dir.path().join("v2.img");
        fs::write(&src, &s).expect("write source");
        fs::write(&tgt, &t).expect("write target");
        Self {
            dir,
            src,
            tgt,
            target_bytes: t,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn delta(&self, opts: &Options) -> PathBuf {
        let out = self.path("delta.uap");
        let t = Image::open(&self.tgt).expect("target");
        let s = Image::open(&self.src).expect("source");
        generate::create_delta(&t, &s, opts, &key(), &out).expect("create delta");
        out
    }

    fn full(&self, opts: &Options, known: bool) -> PathBuf {
        let out = self.path("full.uap");
        let t = Image::open(&self.tgt).expect("target");
        let s = Image::open(&self.src).expect("source");
        generate::create_full(&t, known.then_some(&s), opts, &key(), &out).expect("create full");
        out
    }
}

/// Opens and applies payload bytes into `out`; returns the report or the first error.
fn apply_bytes(
    bytes: Vec<u8>,
    source: Option<&Path>,
    out: &Path,
) -> Result<apply::Report, Box<dyn std::error::Error>> {
    let src = MemSource {
        bytes,
        name: "payload".into(),
    };
    let keys = trusted();
    let p = Payload::open(
        &src,
        Trust::Keys {
            keys: &keys,
            now: NOW,
        },
    )?;
    let source_file = source.map(fs::File::open).transpose()?;
    let mut target = FileTarget::create(out, p.manifest.target_size)?;
    let r = apply::apply(
        &p.manifest,
        Blob {
            source: &src,
            offset: p.blob_offset,
        },
        source_file.as_ref().map(|f| f as &dyn apply::SourceSlot),
        &mut target,
        &apply::Options::default(),
        &mut |_| {},
    )?;
    Ok(r)
}

/// A small real delta: (manifest bytes, blob bytes).
fn baseline() -> (Vec<u8>, Vec<u8>) {
    use std::sync::OnceLock;
    static B: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    B.get_or_init(|| {
        let fx = Fixture::new(42, 40, 8);
        let bytes = fs::read(fx.delta(&small_opts())).expect("read");
        let p = Payload::open(
            &MemSource {
                bytes: bytes.clone(),
                name: "b".into(),
            },
            Trust::InspectOnly,
        )
        .expect("baseline opens");
        let m = codec::encode(&p.manifest);
        (m, bytes[p.blob_offset as usize..].to_vec())
    })
    .clone()
}

fn baseline_manifest() -> Manifest {
    codec::decode(&baseline().0).expect("decode baseline")
}

/// Signs `manifest_bytes` with the trusted key and opens the result.
fn open_signed(manifest_bytes: &[u8], blob: &[u8]) -> Result<Payload, PayloadError> {
    let sig = key().sign(manifest_bytes);
    let bytes = assemble(manifest_bytes, &[sig], blob).expect("assemble");
    let keys = trusted();
    Payload::open(
        &MemSource {
            bytes,
            name: "hostile".into(),
        },
        Trust::Keys {
            keys: &keys,
            now: NOW,
        },
    )
}

fn manifest_err(r: Result<Payload, PayloadError>) -> ManifestError {
    match r {
        Err(PayloadError::Manifest { source, .. }) => source,
        Err(e) => panic!("expected a manifest error, got {e}"),
        Ok(_) => panic!("hostile manifest was accepted"),
    }
}

fn mutated(f: impl FnOnce(&mut Manifest)) -> ManifestError {
    let mut m = baseline_manifest();
    f(&mut m);
    manifest_err(open_signed(&codec::encode(&m), &baseline().1))
}

fn first(m: &Manifest, kind: OpKind) -> usize {
    m.operations
        .iter()
        .position(|o| o.kind == kind)
        .expect("baseline has this kind")
}

fn updatectl(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(args)
        .output()
        .expect("run updatectl");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

mod admission;
mod engine;
mod publisher;
mod roundtrip;
mod verity;
