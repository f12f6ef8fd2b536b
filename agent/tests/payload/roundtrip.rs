//! Generate then apply gives the target image back (fixed cases and proptest), and
//! the decoder survives arbitrary and mutated bytes (proptest).

use super::*;

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

/// A long unchanged run is cut into COPY operations of at most 32 MiB (the unit of
/// checkpoints and progress; one COPY of most of a slot would be redone whole after
/// every restart), packed full, and the delta still gives the target back.
#[test]
fn long_unchanged_runs_become_copies_of_at_most_32_mib() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut v1 = vec![0u8; 72 * MIB];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in v1.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    // One changed block in the middle: two unchanged runs of about 36 MiB.
    let mut v2 = v1.clone();
    v2[36 * MIB..36 * MIB + 4096].fill(0x5a);
    let (src, tgt, out) = (
        dir.path().join("v1"),
        dir.path().join("v2"),
        dir.path().join("d.uap"),
    );
    fs::write(&src, &v1).expect("v1");
    fs::write(&tgt, &v2).expect("v2");
    let (t, s) = (
        Image::open(&tgt).expect("target"),
        Image::open(&src).expect("source"),
    );
    generate::create_delta(&t, &s, &small_opts(), &key(), &out).expect("delta");
    let bytes = fs::read(&out).expect("read");
    let m = Payload::open(
        &MemSource {
            bytes: bytes.clone(),
            name: "delta".into(),
        },
        Trust::InspectOnly,
    )
    .expect("open")
    .manifest;
    let copies: Vec<u64> = m
        .operations
        .iter()
        .filter(|o| o.kind == OpKind::Copy)
        .map(|o| m.bytes(o.dst_blocks()))
        .collect();
    assert!(
        copies.iter().all(|&b| b <= 32 << 20),
        "a COPY over 32 MiB: {copies:?}"
    );
    assert_eq!(
        copies.iter().sum::<u64>(),
        (72 * MIB - 4096) as u64,
        "{copies:?}"
    );
    // Full ones but the last: 71.996 MiB in 32 MiB operations is three.
    assert_eq!(copies.len(), 3, "{copies:?}");
    let applied = dir.path().join("out");
    apply_bytes(bytes, Some(&src), &applied).expect("apply");
    assert!(fs::read(&applied).expect("out") == v2, "wrong image");
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
