//! dm-verity payloads (format version 2): the publisher's signed root is what
//! `veritysetup format` computes, the engine builds a tree `veritysetup verify` accepts,
//! resumes it from a read-back mark, and refuses what does not add up.

use update_agent::payload::Verity;

use super::*;

const VERITYSETUP: &str = "/usr/sbin/veritysetup";

fn verity_opts(fx: &Fixture) -> Options {
    let mut o = small_opts();
    let t = Image::open(&fx.tgt).expect("target");
    o.verity = Some(generate::verity_of(&t, None).expect("verity"));
    o
}

fn open(path: &Path) -> (MemSource, Payload) {
    let src = MemSource {
        bytes: fs::read(path).expect("read"),
        name: "payload".into(),
    };
    let p = Payload::open(
        &src,
        Trust::Keys {
            keys: &trusted(),
            now: NOW,
        },
    )
    .expect("open");
    (src, p)
}

/// Applies the payload at `path` into a file slot of `slot_len` bytes.
fn apply_into(
    path: &Path,
    fx: &Fixture,
    out: &Path,
    slot_len: u64,
    opts: &apply::Options<'_>,
    on: &mut dyn FnMut(apply::Event),
) -> Result<apply::Report, ApplyError> {
    let (src, p) = open(path);
    let source = fs::File::open(&fx.src).expect("source");
    let mut target = FileTarget::create(out, slot_len).expect("slot");
    apply::apply(
        &p.manifest,
        Blob {
            source: &src,
            offset: p.blob_offset,
        },
        Some(&source as &dyn apply::SourceSlot),
        &mut target,
        opts,
        on,
    )
}

fn veritysetup_verify(slot: &Path, v: &Verity) -> std::process::Output {
    Command::new(VERITYSETUP)
        .args([
            "verify",
            s(slot),
            s(slot),
            &hex::encode(v.root_hash),
            &format!("--hash-offset={}", v.hash_offset),
        ])
        .output()
        .expect("running veritysetup (integration/setup.sh installs cryptsetup-bin)")
}

/// A slot file that is already there (a restart finds the slot as it was left).
struct Existing(fs::File);

impl apply::TargetSlot for Existing {
    fn size(&self) -> u64 {
        self.0.metadata().map_or(0, |m| m.len())
    }
    fn invalidate(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn write_all_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.write_all_at(&vec![0; len as usize], offset)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }
    fn write_shared_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, buf, offset)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.0.sync_all()
    }
    fn commit(&mut self) -> std::io::Result<()> {
        self.0.sync_all()
    }
}

#[test]
fn the_signed_root_is_veritysetups_and_the_built_tree_verifies() {
    let fx = Fixture::new(31, 300, 20);
    let opts = verity_opts(&fx);
    let v = opts.verity.clone().expect("verity");
    // The publisher's root, against the real tool on a copy of the target.
    let copy = fx.path("format.img");
    fs::copy(&fx.tgt, &copy).expect("copy");
    let out = Command::new(VERITYSETUP)
        .args([
            "format",
            s(&copy),
            s(&copy),
            &format!("--hash-offset={}", v.hash_offset),
            &format!("--salt={}", hex::encode(&v.salt)),
        ])
        .output()
        .expect("veritysetup format");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&hex::encode(v.root_hash)),
        "veritysetup's root differs from the signed one:\n{text}"
    );

    for (name, path) in [("delta", fx.delta(&opts)), ("full", fx.full(&opts, true))] {
        let (_, p) = open(&path);
        let m = &p.manifest;
        assert_eq!(
            m.verity.as_ref(),
            Some(&v),
            "{name}: the manifest carries it"
        );
        let need = apply::needed_size(m).expect("size");
        assert!(need > m.target_size, "{name}: the tree needs room");
        // A slot of exactly the image is refused before anything is written.
        let small = fx.path(&format!("{name}-small.img"));
        let e = apply_into(
            &path,
            &fx,
            &small,
            m.target_size,
            &Default::default(),
            &mut |_| {},
        )
        .expect_err("no room for the tree");
        assert!(
            matches!(e, ApplyError::TargetTooSmall { expected, .. } if expected == need),
            "{name}: {e}"
        );
        let slot = fx.path(&format!("{name}-slot.img"));
        apply_into(
            &path,
            &fx,
            &slot,
            need + 3 * 4096,
            &Default::default(),
            &mut |_| {},
        )
        .expect("apply");
        let ok = veritysetup_verify(&slot, &v);
        assert!(
            ok.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert_eq!(
            &fs::read(&slot).expect("read")[..fx.target_bytes.len()],
            &fx.target_bytes[..],
            "{name}: the image is untouched by the tree"
        );
    }
}

#[test]
fn a_tree_resumes_from_a_read_back_mark_and_a_wrong_one_is_caught() {
    let fx = Fixture::new(32, 900, 40);
    let opts = verity_opts(&fx);
    let v = opts.verity.clone().expect("verity");
    let path = fx.delta(&opts);
    let (_, p) = open(&path);
    let m = p.manifest;
    let need = apply::needed_size(&m).expect("size");
    let slot = fx.path("slot.img");
    let mut marks = Vec::new();
    apply_into(&path, &fx, &slot, need, &Default::default(), &mut |e| {
        if let apply::Event::ReadBack(mark) = e {
            marks.push(mark);
        }
    })
    .expect("apply");
    // A mark inside the image: what a restart would have written down.
    let mark = *marks
        .iter()
        .find(|mk| mk.len > m.target_size / 3 && mk.len < m.target_size)
        .unwrap_or_else(|| {
            panic!(
                "a mark in the middle (marks at {:?})",
                marks.iter().map(|mk| mk.len).collect::<Vec<_>>()
            )
        });
    // Lose everything the builder had not flushed at that mark: level 0 past the mark's
    // block, the upper levels and the superblock.
    let data_blocks = m.target_size / 4096;
    let level0_blocks = data_blocks.div_ceil(128);
    let level0_at = need - level0_blocks * 4096;
    let keep_until = level0_at + (mark.len / 4096) * 32;
    let mut bytes = fs::read(&slot).expect("read");
    bytes[v.hash_offset as usize..level0_at as usize].fill(0);
    bytes[keep_until as usize..].fill(0);
    let resume_opts = apply::Options {
        start_op: m.operations.len(),
        read_back_from: Some(mark),
        ..Default::default()
    };
    let run = |bytes: &[u8]| {
        fs::write(&slot, bytes).expect("write");
        let (src, p) = open(&path);
        let mut target = Existing(
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&slot)
                .expect("slot"),
        );
        apply::apply(
            &p.manifest,
            Blob {
                source: &src,
                offset: p.blob_offset,
            },
            Some(&fs::File::open(&fx.src).expect("src") as &dyn apply::SourceSlot),
            &mut target,
            &resume_opts,
            &mut |_| {},
        )
    };
    run(&bytes).expect("resumed tree");
    let ok = veritysetup_verify(&slot, &v);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // A level-0 digest before the mark changed while the node was down: the root
    // comes out wrong and says so (the staging then builds the tree again from zero).
    bytes[level0_at as usize + 5] ^= 1;
    let e = run(&bytes).expect_err("a wrong resumed tree");
    assert!(matches!(e, ApplyError::VerityRootMismatch { .. }), "{e}");
}

#[test]
fn verity_manifest_rules() {
    let fx = Fixture::new(33, 64, 0);
    let opts = verity_opts(&fx);
    let path = fx.delta(&opts);
    let (_, p) = open(&path);
    let blob = fs::read(&path).expect("read")[p.blob_offset as usize..].to_vec();
    let good = p.manifest;
    let bytes = codec::encode(&good);
    assert_eq!(bytes[0], 2, "a manifest with a tree is format version 2");
    assert_eq!(codec::decode(&bytes).expect("decode"), good);
    let with = |f: &dyn Fn(&mut Manifest)| {
        let mut m = good.clone();
        f(&mut m);
        manifest_err(open_signed(&codec::encode(&m), &blob))
    };
    let e = with(&|m| m.verity.as_mut().expect("v").hash_offset = m.target_size - 4096);
    assert!(matches!(e, ManifestError::BadVerity(_)), "{e}");
    assert!(e.to_string().contains("inside the data"), "{e}");
    let e = with(&|m| m.verity.as_mut().expect("v").hash_offset += 1);
    assert!(matches!(e, ManifestError::BadVerity(_)), "{e}");
    let e = with(&|m| m.verity.as_mut().expect("v").salt = vec![1; 257]);
    assert!(
        matches!(
            e,
            ManifestError::OutOfBounds {
                field: "verity_salt",
                ..
            }
        ),
        "{e}"
    );
    // A version 1 manifest has an empty field 10; the old opaque root hash is refused.
    let mut v1 = codec::encode(&baseline_manifest());
    assert_eq!(v1[0], 1);
    let at = v1
        .windows(32)
        .position(|w| w == baseline_manifest().target_sha256)
        .expect("digest")
        + 32;
    assert_eq!(v1[at], 0);
    v1[at] = 1;
    v1.insert(at + 1, 0xaa);
    let e = manifest_err(open_signed(&v1, &baseline().1));
    assert!(
        matches!(
            e,
            ManifestError::BadValue {
                field: "verity_root_hash",
                ..
            }
        ),
        "{e}"
    );
    let mut v3 = bytes;
    v3[0] = 3;
    let e = manifest_err(open_signed(&v3, &blob));
    assert!(matches!(e, ManifestError::UnsupportedVersion(3)), "{e}");
    assert!(e.to_string().contains("versions 1 and 2"), "{e}");
    // A signed root that is not the image's: the tree is built, checked, refused.
    let mut m = good.clone();
    m.verity.as_mut().expect("v").root_hash[0] ^= 1;
    let mb = codec::encode(&m);
    let sig = key().sign(&mb);
    let payload = fx.path("wrong-root.uap");
    fs::write(&payload, assemble(&mb, &[sig], &blob).expect("assemble")).expect("write");
    let slot = fx.path("wrong-root.img");
    let need = apply::needed_size(&m).expect("size");
    let e = apply_into(&payload, &fx, &slot, need, &Default::default(), &mut |_| {})
        .expect_err("wrong root");
    assert!(matches!(e, ApplyError::VerityRootMismatch { .. }), "{e}");
    assert!(e.is_content_error());
}

#[test]
fn bundle_inspect_and_verify_show_and_check_the_tree() {
    let fx = Fixture::new(34, 80, 8);
    let keys = fx.path("keys");
    let out = fx.path("out");
    let (code, _, stderr) = updatectl(&["bundle", "keygen", "--out", s(&keys)]);
    assert_eq!(code, 0, "{stderr}");
    let key = keys.join("update-agent.key");
    let pubdir = fx.path("trusted");
    fs::create_dir(&pubdir).expect("mkdir");
    fs::copy(keys.join("update-agent.pub"), pubdir.join("publisher.pub")).expect("copy");
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "create",
        "--target",
        s(&fx.tgt),
        "--source",
        s(&fx.src),
        "--version",
        "2.0",
        "--compatible",
        "board-x",
        "--out",
        s(&out),
        "--level",
        "3",
        "--key",
        s(&key),
        "--verity",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let full = out.join("2.0.full.uap");
    let (code, stdout, stderr) = updatectl(&["bundle", "inspect", s(&full), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let root = doc["verity"]["root_hash"]
        .as_str()
        .expect("root")
        .to_owned();
    assert_eq!(root.len(), 64);
    assert_eq!(doc["verity"]["hash_offset"], fx.target_bytes.len() as u64);
    // `bundle apply` writes what a slot holds: the image, then a tree the tool accepts.
    let slot = fx.path("applied.img");
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "apply",
        s(&full),
        "--keys",
        s(&pubdir),
        "--output",
        s(&slot),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let o = Command::new(VERITYSETUP)
        .args([
            "verify",
            s(&slot),
            s(&slot),
            &root,
            &format!("--hash-offset={}", fx.target_bytes.len()),
        ])
        .output()
        .expect("veritysetup");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // --verity-hash-offset without --verity is a usage error.
    let (code, _, stderr) = updatectl(&[
        "bundle",
        "create",
        "--target",
        s(&fx.tgt),
        "--version",
        "2.1",
        "--compatible",
        "board-x",
        "--out",
        s(&out),
        "--key",
        s(&key),
        "--verity-hash-offset",
        "8192",
    ]);
    assert_eq!(code, 2, "{stderr}");
}
