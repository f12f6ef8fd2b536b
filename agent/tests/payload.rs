//! Payload format, generator and apply engine, end to end on real files.
//!
//! One test binary for the whole payload room (fewer binaries link faster).

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

fn roundtrip(seed: u64, blocks: usize, extra: usize) {
    let fx = Fixture::new(seed, blocks, extra);
    let opts = small_opts();
    let out = fx.path("out.img");

    let delta = fx.delta(&opts);
    let r = apply_bytes(fs::read(&delta).expect("read"), Some(&fx.src), &out).expect("apply delta");
    assert_eq!(
        fs::read(&out).expect("out"),
        fx.target_bytes,
        "delta seed {seed}"
    );
    assert_eq!(r.bytes_written, fx.target_bytes.len() as u64);

    // A full payload, steered by the source, on a node that has it: reuses blocks.
    let full = fx.full(&opts, true);
    let bytes = fs::read(&full).expect("read");
    let r = apply_bytes(bytes.clone(), Some(&fx.src), &out).expect("apply full with source");
    assert_eq!(
        fs::read(&out).expect("out"),
        fx.target_bytes,
        "full+source seed {seed}"
    );
    let m = Payload::open(
        &MemSource {
            bytes: bytes.clone(),
            name: "full".into(),
        },
        Trust::InspectOnly,
    )
    .expect("open")
    .manifest;
    let reusable = m
        .operations
        .iter()
        .filter(|o| o.kind == OpKind::Data && !o.src.is_empty())
        .count();
    assert_eq!(
        r.ops_reused, reusable,
        "every hinted op is found on the source"
    );
    // ... and on a node without it.
    let r = apply_bytes(bytes, None, &out).expect("apply full alone");
    assert_eq!(
        fs::read(&out).expect("out"),
        fx.target_bytes,
        "full seed {seed}"
    );
    assert_eq!(r.ops_reused, 0);
    assert_eq!(r.bytes_fetched, m.blob_size);

    // A full payload built without knowledge of any source.
    let full = fx.full(&opts, false);
    apply_bytes(fs::read(&full).expect("read"), Some(&fx.src), &out).expect("apply blind full");
    assert_eq!(
        fs::read(&out).expect("out"),
        fx.target_bytes,
        "blind full seed {seed}"
    );
}

#[test]
fn roundtrip_fixed_cases() {
    roundtrip(1, 64, 0);
    roundtrip(2, 100, 30);
    roundtrip(3, 8, 200);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]
    #[test]
    fn roundtrip_generated_images(seed in 1u64.., blocks in 1usize..120, extra in 0usize..60) {
        roundtrip(seed, blocks, extra);
    }

    /// The decoder never panics and never accepts what it cannot re-encode identically.
    #[test]
    fn decoder_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(m) = codec::decode(&bytes) {
            prop_assert_eq!(codec::encode(&m), bytes);
        }
    }

    /// Mutations of a real manifest: decode+validate either fails with a typed error or
    /// yields a manifest whose encoding is exactly the input.
    #[test]
    fn decoder_on_mutated_manifests(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut bytes = baseline().0;
        for (at, v) in flips {
            let i = at % bytes.len();
            bytes[i] = v;
        }
        if let Ok(m) = codec::decode(&bytes) {
            prop_assert_eq!(codec::encode(&m), bytes.clone());
            let _ = m.validate();
        }
    }
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

/// Hardening finding 13: the untrusted head is verified where the source holds it,
/// not copied first. A source that holds the whole payload in memory and refuses to
/// copy anything but the 64-byte header still opens.
#[test]
fn the_head_is_verified_in_place() {
    struct InPlace(MemSource);
    impl update_agent::payload::RangeSource for InPlace {
        fn size(&self) -> u64 {
            self.0.bytes.len() as u64
        }
        fn read_range(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
            if offset != 0 || buf.len() > 64 {
                return Err(std::io::Error::other(format!(
                    "copied {} bytes at {offset}",
                    buf.len()
                )));
            }
            self.0.read_range(offset, buf)
        }
        fn name(&self) -> &Path {
            self.0.name()
        }
        fn bytes(&self, offset: u64, len: usize) -> std::io::Result<std::borrow::Cow<'_, [u8]>> {
            self.0.bytes(offset, len)
        }
    }
    let (m, blob) = baseline();
    let bytes = assemble(&m, &[key().sign(&m)], &blob).expect("assemble");
    let keys = trusted();
    let src = InPlace(MemSource {
        bytes,
        name: "in-place".into(),
    });
    Payload::open(
        &src,
        Trust::Keys {
            keys: &keys,
            now: NOW,
        },
    )
    .expect("opened without copying the head");
}

#[test]
fn baseline_is_accepted() {
    let (m, blob) = baseline();
    let p = open_signed(&m, &blob).expect("baseline opens");
    assert!(p.manifest.is_delta());
    let kinds: Vec<OpKind> = p.manifest.operations.iter().map(|o| o.kind).collect();
    for k in [OpKind::Zero, OpKind::Copy, OpKind::Patch] {
        assert!(kinds.contains(&k), "baseline exercises {k:?}: {kinds:?}");
    }
}

#[test]
fn hostile_manifests_get_typed_errors() {
    let m = baseline_manifest();
    let copy = first(&m, OpKind::Copy);
    let patch = first(&m, OpKind::Patch);
    let target_blocks = m.target_blocks();

    // Raw-byte faults.
    let mut b = baseline().0;
    b[0] = 2;
    assert_eq!(
        manifest_err(open_signed(&b, &baseline().1)),
        ManifestError::UnsupportedVersion(2)
    );
    let mut b = baseline().0;
    b.push(0);
    assert_eq!(
        manifest_err(open_signed(&b, &baseline().1)),
        ManifestError::TrailingBytes { count: 1 }
    );
    let b = baseline().0;
    assert!(matches!(
        manifest_err(open_signed(&b[..b.len() - 5], &baseline().1)),
        ManifestError::Truncated {
            loc: Loc::Op(_),
            field: "sha256"
        }
    ));
    // A version encoded in two bytes instead of one.
    let mut b = vec![0x81, 0x00];
    b.extend_from_slice(&baseline().0[1..]);
    assert_eq!(
        manifest_err(open_signed(&b, &baseline().1)),
        ManifestError::NonCanonical {
            loc: Loc::Manifest,
            field: "format_version"
        }
    );

    // Structured faults, each naming its operation.
    assert_eq!(
        mutated(|m| m.operations[copy].dst[0] = Extent::new(target_blocks, 1)),
        ManifestError::ExtentOutOfRange {
            loc: Loc::Op(copy),
            field: "dst",
            index: 0,
            start: target_blocks,
            blocks: 1,
            limit: target_blocks
        }
    );
    assert!(matches!(
        mutated(|m| {
            let d = m.operations[patch].dst[0];
            m.operations[copy].dst.push(d);
            m.operations[copy].src.push(Extent::new(0, d.blocks));
        }),
        ManifestError::Overlap { .. }
    ));
    assert!(matches!(
        mutated(|m| {
            m.operations.remove(patch);
        }),
        ManifestError::Gap { .. }
    ));
    assert_eq!(
        mutated(|m| m.operations[copy].src[0].blocks += 1),
        ManifestError::SizeMismatch {
            op: copy,
            src_blocks: m.operations[copy].src_blocks() + 1,
            dst_blocks: m.operations[copy].dst_blocks()
        }
    );
    assert!(matches!(
        mutated(|m| m.operations[patch].data_offset = m.blob_size),
        ManifestError::DataOutOfBlob { op, .. } if op == patch
    ));
    assert_eq!(
        mutated(|m| m.source = None),
        ManifestError::NeedsSource {
            op: copy.min(patch),
            kind: m.operations[copy.min(patch)].kind.name()
        }
    );
    assert!(matches!(
        mutated(|m| m.operations[copy].dst[0].blocks = 0),
        ManifestError::EmptyExtent { loc: Loc::Op(i), field: "dst", .. } if i == copy
    ));
    assert_eq!(
        mutated(|m| m.block_size = 3000),
        ManifestError::BadBlockSize(3000)
    );
    assert!(matches!(
        mutated(|m| m.operations[patch].src = vec![Extent::new(0, (64 << 20) / 4096)]),
        ManifestError::OutOfBounds { loc: Loc::Op(i), field: "src", .. } | ManifestError::ExtentOutOfRange { loc: Loc::Op(i), .. } if i == patch
    ));

    // Counts beyond the limits are refused before any allocation.
    let mut hdr = m.clone();
    hdr.operations.clear();
    let mut b = codec::encode(&hdr);
    b.pop();
    b.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
    assert!(matches!(
        manifest_err(open_signed(&b, &baseline().1)),
        ManifestError::TooMany {
            field: "operations",
            ..
        }
    ));

    // An unknown operation type at operation 0.
    let mut h = m.clone();
    h.operations.truncate(1);
    let mut b = codec::encode(&h);
    let mut hdr = m;
    hdr.operations.clear();
    let kind_at = codec::encode(&hdr).len();
    b[kind_at] = 9;
    assert_eq!(
        manifest_err(open_signed(&b, &baseline().1)),
        ManifestError::UnknownOpKind { op: 0, kind: 9 }
    );
}

#[test]
fn oversized_manifest_is_refused_from_the_header() {
    let (m, blob) = baseline();
    let sig = key().sign(&m);
    let mut bytes = assemble(&m, &[sig], &blob).expect("assemble");
    bytes[12..16].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let keys = trusted();
    let r = Payload::open(
        &MemSource {
            bytes,
            name: "big".into(),
        },
        Trust::Keys {
            keys: &keys,
            now: NOW,
        },
    );
    assert!(matches!(manifest_err(r), ManifestError::TooLarge { .. }));
}

#[test]
fn trust_failures() {
    let (m, blob) = baseline();
    let open_with = |bytes: Vec<u8>, now: u64| {
        let keys = trusted();
        Payload::open(
            &MemSource {
                bytes,
                name: "p".into(),
            },
            Trust::Keys { keys: &keys, now },
        )
    };
    let trust_err = |r: Result<Payload, PayloadError>| match r {
        Err(PayloadError::Trust { source, .. }) => source,
        Err(e) => panic!("expected a trust error, got {e}"),
        Ok(_) => panic!("accepted"),
    };
    // Signed by a key the node does not trust.
    let stranger = PublisherKey::from_seed([9u8; 32]);
    let bytes = assemble(&m, &[stranger.sign(&m)], &blob).expect("assemble");
    assert!(matches!(
        trust_err(open_with(bytes, NOW)),
        TrustError::UntrustedKey { .. }
    ));
    // A byte of the manifest changed after signing.
    let sig = key().sign(&m);
    let mut tampered = m.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let bytes = assemble(&tampered, std::slice::from_ref(&sig), &blob).expect("assemble");
    assert!(matches!(
        trust_err(open_with(bytes, NOW)),
        TrustError::BadSignature { .. }
    ));
    // Not signed at all.
    let bytes = assemble(&m, &[], &blob).expect("assemble");
    assert!(matches!(
        trust_err(open_with(bytes, NOW)),
        TrustError::Unsigned
    ));
    // Expired, and not yet valid.
    let bytes = assemble(&m, &[sig], &blob).expect("assemble");
    assert!(matches!(
        trust_err(open_with(bytes.clone(), NOW + 2 * 86_400)),
        TrustError::Expired { .. }
    ));
    assert!(matches!(
        trust_err(open_with(bytes, NOW - 86_400)),
        TrustError::NotYetValid { .. }
    ));
    // A forged signature entry naming the trusted key.
    let bogus = SignatureEntry {
        key: update_agent::payload::sign::fingerprint(&key().public()),
        signature: [1u8; 64],
    };
    let bytes = assemble(&m, &[bogus], &blob).expect("assemble");
    assert!(matches!(
        trust_err(open_with(bytes, NOW)),
        TrustError::BadSignature { .. }
    ));
}

#[test]
fn flipped_blob_byte_is_caught_at_its_operation() {
    let fx = Fixture::new(77, 48, 4);
    let delta = fx.delta(&small_opts());
    let bytes = fs::read(&delta).expect("read");
    let p = Payload::open(
        &MemSource {
            bytes: bytes.clone(),
            name: "d".into(),
        },
        Trust::InspectOnly,
    )
    .expect("open");
    let out = fx.path("flip.img");
    let mut checked = 0;
    for (i, op) in p.manifest.operations.iter().enumerate() {
        if !op.kind.has_data() {
            continue;
        }
        for at in [0, op.data_len / 2, op.data_len - 1] {
            let mut b = bytes.clone();
            b[(p.blob_offset + op.data_offset + at) as usize] ^= 0x20;
            let err = apply_bytes(b, Some(&fx.src), &out).expect_err("corruption must fail");
            let e = err.downcast_ref::<ApplyError>().expect("an apply error");
            let op_of = match e {
                ApplyError::Decompress { op, .. }
                | ApplyError::OpHashMismatch { op, .. }
                | ApplyError::WrongLength { op, .. } => *op,
                other => panic!("unexpected error {other}"),
            };
            assert_eq!(op_of, i, "error names the corrupted operation: {e}");
            assert!(!out.exists(), "nothing appears at the output path");
            checked += 1;
        }
    }
    assert!(checked >= 3);
}

#[test]
fn wrong_source_fails_at_the_first_copy() {
    let fx = Fixture::new(5, 64, 0);
    let delta = fx.delta(&small_opts());
    let other = fx.path("other.img");
    let mut wrong = fs::read(&fx.src).expect("read");
    for b in wrong.iter_mut().step_by(1000) {
        *b = b.wrapping_add(1);
    }
    fs::write(&other, wrong).expect("write");
    let out = fx.path("o.img");
    let err =
        apply_bytes(fs::read(&delta).expect("read"), Some(&other), &out).expect_err("must fail");
    let e = err.downcast_ref::<ApplyError>().expect("apply error");
    assert!(
        matches!(
            e,
            ApplyError::OpHashMismatch { .. }
                | ApplyError::Decompress { .. }
                | ApplyError::WrongLength { .. }
        ),
        "{e}"
    );
    assert!(!out.exists());
}

#[test]
fn cancel_stops_and_leaves_nothing() {
    use std::sync::atomic::AtomicBool;
    let fx = Fixture::new(11, 64, 0);
    let delta = fs::read(fx.delta(&small_opts())).expect("read");
    let src = MemSource {
        bytes: delta,
        name: "d".into(),
    };
    let keys = trusted();
    let p = Payload::open(
        &src,
        Trust::Keys {
            keys: &keys,
            now: NOW,
        },
    )
    .expect("open");
    let out = fx.path("c.img");
    let mut target = FileTarget::create(&out, p.manifest.target_size).expect("target");
    let cancel = AtomicBool::new(false);
    let source = fs::File::open(&fx.src).expect("src");
    let opts = apply::Options {
        cancel: Some(&cancel),
        ..apply::Options::default()
    };
    let r = apply::apply(
        &p.manifest,
        Blob {
            source: &src,
            offset: p.blob_offset,
        },
        Some(&source),
        &mut target,
        &opts,
        &mut |e| {
            if let apply::Event::OpDone { op: 1, .. } = e {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        },
    );
    assert!(matches!(r, Err(ApplyError::Cancelled { op: 2 })), "{r:?}");
    drop(target);
    assert!(!out.exists());
}

// ---- updatectl bundle, as a publisher runs it ----

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

#[test]
fn cli_publisher_workflow_and_errors() {
    let fx = Fixture::new(21, 96, 16);
    let keys = fx.path("keys");
    let out = fx.path("out");
    let (code, stdout, stderr) = updatectl(&["bundle", "keygen", "--out", s(&keys)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("fingerprint"));
    // A second keygen must not overwrite the key.
    let (code, _, stderr) = updatectl(&["bundle", "keygen", "--out", s(&keys)]);
    assert_eq!(code, 1);
    assert!(stderr.contains("refusing to overwrite"), "{stderr}");

    let key = keys.join("update-agent.key");
    let base = |extra: &[&str]| {
        let mut v = vec![
            "bundle",
            "create",
            "--target",
            s(&fx.tgt),
            "--version",
            "2.0",
            "--compatible",
            "board-x",
            "--out",
            s(&out),
            "--level",
            "3",
        ];
        v.extend_from_slice(extra);
        v.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let run = |v: Vec<String>| updatectl(&v.iter().map(String::as_str).collect::<Vec<_>>());

    // Missing key: named.
    let (code, _, stderr) = run(base(&[
        "--key",
        "/nonexistent/k.key",
        "--source",
        s(&fx.src),
    ]));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/k.key"), "{stderr}");
    // Unreadable image: named.
    let (code, _, stderr) = run(base(&["--key", s(&key), "--source", "/nonexistent/v0.img"]));
    assert_eq!(code, 1);
    assert!(stderr.contains("/nonexistent/v0.img"), "{stderr}");
    // Target smaller than the source: names both files.
    let big = fx.path("big.img");
    fs::write(&big, vec![1u8; fx.target_bytes.len() + 8 * BS]).expect("write");
    let (code, _, stderr) = run(base(&["--key", s(&key), "--source", s(&big)]));
    assert_eq!(code, 1);
    assert!(
        stderr.contains("smaller than source") && stderr.contains("big.img"),
        "{stderr}"
    );

    let (code, stdout, stderr) = run(base(&["--key", s(&key), "--source", s(&fx.src)]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("full payload") && stdout.contains("delta from"),
        "{stdout}"
    );
    let mut payloads: Vec<PathBuf> = fs::read_dir(&out)
        .expect("out dir")
        .map(|e| e.expect("entry").path())
        .collect();
    payloads.sort();
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    let full = payloads
        .iter()
        .find(|p| s(p).ends_with(".full.uap"))
        .expect("full");
    let delta = payloads
        .iter()
        .find(|p| s(p).contains(".from-"))
        .expect("delta");

    let (code, stdout, _) = updatectl(&["bundle", "inspect", "--json", s(delta)]);
    assert_eq!(code, 0);
    let j: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(j["schema"], 1);
    assert_eq!(j["kind"], "delta");
    assert_eq!(j["version"], "2.0");
    assert_eq!(j["compatible"], "board-x");
    let covered: u64 = j["operations"]
        .as_array()
        .expect("ops")
        .iter()
        .map(|k| k["target_bytes"].as_u64().expect("n"))
        .sum();
    assert_eq!(covered, fx.target_bytes.len() as u64);
    let (code, stdout, _) = updatectl(&["bundle", "inspect", s(full)]);
    assert_eq!(code, 0);
    assert!(stdout.contains("kind         full"), "{stdout}");

    let pubdir = fx.path("trusted");
    fs::create_dir(&pubdir).expect("mkdir");
    fs::copy(keys.join("update-agent.pub"), pubdir.join("publisher.pub")).expect("copy");
    let (code, stdout, stderr) = updatectl(&[
        "bundle",
        "verify",
        s(delta),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.src),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rebuild      ok"), "{stdout}");
    let (code, stdout, stderr) = updatectl(&["bundle", "verify", s(full), "--keys", s(&pubdir)]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("rebuild      ok"), "{stdout}");

    // The wrong source is named, exit 3.
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "verify",
        s(delta),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.tgt),
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("v2.img") && stderr.contains("not the image"),
        "{stderr}"
    );
    // An untrusted key directory: exit 3.
    let other = fx.path("other-keys");
    updatectl(&["bundle", "keygen", "--out", s(&other)]);
    fs::remove_file(other.join("update-agent.key")).expect("rm");
    let (code, _, stderr) = updatectl(&["bundle", "verify", s(delta), "--keys", s(&other)]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("does not trust"), "{stderr}");
    // A key file that does not parse is named.
    fs::write(other.join("broken.pub"), "not a key").expect("write");
    let (code, _, stderr) = updatectl(&["bundle", "verify", s(delta), "--keys", s(&other)]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("broken.pub"), "{stderr}");

    // apply writes the image, and it is the target byte for byte.
    let img = fx.path("applied.img");
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "apply",
        s(delta),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.src),
        "--output",
        s(&img),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(fs::read(&img).expect("img"), fx.target_bytes);

    // A corrupted blob: exit 3, and no output file.
    let mut bytes = fs::read(delta).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0xff;
    let bad = fx.path("bad.uap");
    fs::write(&bad, bytes).expect("write");
    let img2 = fx.path("never.img");
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "apply",
        s(&bad),
        "--keys",
        s(&pubdir),
        "--source",
        s(&fx.src),
        "--output",
        s(&img2),
    ]);
    assert_eq!(code, 3, "{stderr}");
    assert!(!img2.exists());
}

#[test]
fn data_range_with_two_frames_is_refused() {
    let fx = Fixture::new(99, 64, 8);
    let bytes = fs::read(fx.delta(&small_opts())).expect("read");
    let p = Payload::open(
        &MemSource {
            bytes: bytes.clone(),
            name: "d".into(),
        },
        Trust::InspectOnly,
    )
    .expect("open");
    let mut m = p.manifest.clone();
    let blob = bytes[p.blob_offset as usize..].to_vec();
    // Stretch the first frame's range over the frame that follows it in the blob.
    let ends: Vec<(usize, u64)> = m
        .operations
        .iter()
        .enumerate()
        .filter(|(_, o)| o.kind.has_data())
        .map(|(i, o)| (i, o.data_offset + o.data_len))
        .collect();
    let (i, end) = ends[0];
    let next = m
        .operations
        .iter()
        .find(|o| o.kind.has_data() && o.data_offset == end)
        .expect("a following frame");
    m.operations[i].data_len += next.data_len;
    let mb = codec::encode(&m);
    let payload = assemble(&mb, &[key().sign(&mb)], &blob).expect("assemble");
    let err = apply_bytes(payload, Some(&fx.src), &fx.path("two.img")).expect_err("refused");
    let e = err.downcast_ref::<ApplyError>().expect("apply error");
    assert!(
        matches!(e, ApplyError::Decompress { op, message, .. } if *op == i && message.contains("more than one")),
        "{e}"
    );
}

#[test]
fn header_padding_and_source_size_are_checked() {
    let (m, blob) = baseline();
    let sig = key().sign(&m);
    let mut bytes = assemble(&m, std::slice::from_ref(&sig), &blob).expect("assemble");
    let blob_offset = bytes.len() - blob.len();
    bytes[blob_offset - 1] = 1;
    let keys = trusted();
    let r = Payload::open(
        &MemSource {
            bytes,
            name: "pad".into(),
        },
        Trust::Keys {
            keys: &keys,
            now: NOW,
        },
    );
    assert!(
        matches!(
            r,
            Err(PayloadError::BadHeader {
                field: "padding",
                ..
            })
        ),
        "{r:?}"
    );

    assert!(matches!(
        mutated(|m| m.source.as_mut().expect("delta").size += 1),
        ManifestError::NotBlockMultiple {
            field: "source_size",
            ..
        }
    ));
    assert!(matches!(
        mutated(|m| m.expires = u64::MAX),
        ManifestError::OutOfBounds {
            field: "expires",
            ..
        }
    ));
}
