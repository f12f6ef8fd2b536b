//! The state machine's transitions (legal and illegal, read-back progress), its file
//! saved and loaded, and the update lock.

use super::*;

fn staging() -> Staging {
    Staging {
        attempt: "t1".into(),
        version: "2.0".into(),
        url: "http://x/2.0.uap".into(),
        manifest_sha256: "00".into(),
        slot: Slot::B,
        ops_total: 3,
        ops_done: 0,
        bytes_total: 10,
        bytes_done: 0,
        bytes_fetched: 0,
        started: 1,
        from_version: Some("1.0".into()),
        read_back: None,
    }
}

#[test]
fn legal_path_and_illegal_moves() {
    let mut s = State::Idle;
    assert!(matches!(
        s.progress(1, 1, 1),
        Err(StateError::Illegal { state: "idle", .. })
    ));
    assert!(s.staged("x".into()).is_err());
    assert!(s.armed(3).is_err());
    s.begin(staging()).expect("begin");
    assert!(matches!(
        s.begin(staging()),
        Err(StateError::Illegal {
            state: "staging",
            ..
        })
    ));
    assert!(s.staged("x".into()).is_err(), "not all operations done");
    assert!(s.progress(4, 1, 1).is_err(), "beyond the operation count");
    s.progress(3, 10, 5).expect("progress");
    assert!(s.armed(3).is_err());
    s.staged("abc".into()).expect("staged");
    s.armed(3).expect("armed");
    assert_eq!(s.name(), "armed");
    assert!(
        s.fail("x".into(), 1).is_err(),
        "an armed release does not fail here"
    );
    s.cancel(2).expect("cancel");
    s.begin(staging()).expect("a new attempt after cancel");
    s.fail("boom".into(), 3).expect("fail");
    assert!(s.cancel(4).is_err());
}

/// A committed release is rolled back without a RollingBack step only when the
/// bootloader already runs the other slot (it gave up on the committed one).
#[test]
fn committed_release_that_stopped_booting_is_rolled_back_to_the_other_slot_only() {
    let mut s = State::Idle;
    s.begin(staging()).expect("begin");
    s.progress(3, 10, 5).expect("progress");
    s.staged("abc".into()).expect("staged");
    s.armed(3).expect("armed");
    s.commit(Some((Slot::A, "1.0".into())), 5).expect("commit");
    assert!(
        matches!(
            s.clone()
                .rolled_back(Slot::B, None, RollbackCause::StoppedBooting, 6),
            Err(StateError::Illegal {
                state: "committed",
                ..
            })
        ),
        "not to the slot it runs on"
    );
    s.rolled_back(Slot::A, None, RollbackCause::StoppedBooting, 6)
        .expect("rolled back");
    match &s {
        State::RolledBack {
            version,
            slot,
            reason,
            cause,
            ..
        } => {
            assert_eq!((version.as_str(), *slot), ("2.0", Slot::A));
            assert_eq!(reason, "the committed slot stopped booting");
            assert_eq!(*cause, Some(RollbackCause::StoppedBooting));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn read_back_progress_needs_every_operation_and_goes_with_a_rewind() {
    let mark = |offset| ReadBack {
        offset,
        sha256_state: "ab".repeat(32),
    };
    let mut s = State::Idle;
    assert!(s.read_back(mark(0)).is_err());
    s.begin(staging()).expect("begin");
    s.progress(2, 8, 1).expect("progress");
    assert!(
        s.read_back(mark(64)).is_err(),
        "operations are left to write"
    );
    s.progress(3, 10, 1).expect("progress");
    assert!(s.read_back(mark(11)).is_err(), "past the image");
    s.read_back(mark(0)).expect("read-back");
    let kept = |s: &State| matches!(s, State::Staging(st) if st.read_back.is_some());
    assert!(kept(&s));
    s.progress(3, 10, 2)
        .expect("progress of the last operation again");
    assert!(kept(&s), "still every operation written");
    s.rewind(1, 4).expect("rewind");
    assert!(!kept(&s), "a rewind drops the read-back");
    assert!(matches!(&s, State::Staging(st) if st.ops_done == 1 && st.bytes_done == 4));
    assert!(s.rewind(2, 8).is_err(), "a rewind never moves forward");
    s.progress(3, 10, 2).expect("progress");
    s.read_back(mark(10)).expect("read-back");
    s.progress(2, 8, 2).expect("progress backwards");
    assert!(!kept(&s), "fewer operations written: the mark says nothing");
}

#[test]
fn save_load_roundtrip_and_lock() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = StateStore::new(d.path());
    assert_eq!(store.load().expect("load"), State::Idle);
    let lock = store.lock().expect("lock");
    assert!(matches!(store.lock(), Err(StateError::Locked { .. })));
    let mut s = State::Idle;
    s.begin(staging()).expect("begin");
    store.save(&lock, &s).expect("save");
    assert_eq!(store.load().expect("load"), s);
    fs::write(store.path(), b"{\"schema\":9,\"state\":\"idle\"}").expect("write");
    assert!(matches!(
        store.load(),
        Err(StateError::Schema { found: 9, .. })
    ));
    fs::write(store.path(), b"{not json").expect("write");
    assert!(matches!(store.load(), Err(StateError::Corrupt { .. })));
}
