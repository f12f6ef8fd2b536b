//! The engine's failures: a flipped blob byte, the wrong source slot, cancel.

use super::*;

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
