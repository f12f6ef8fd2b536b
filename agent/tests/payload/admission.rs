//! What opening a payload refuses, and how it says so: hostile manifests, trust
//! failures, the head verified in place, oversized manifests, ranges, padding.

use super::*;

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
    b[0] = 9;
    assert_eq!(
        manifest_err(open_signed(&b, &baseline().1)),
        ManifestError::UnsupportedVersion(9)
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
