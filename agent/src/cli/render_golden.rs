//! Golden files for `updatectl status` (text and JSON) and `history`, built through
//! the same status mapping the daemon uses. `UPDATE_GOLDEN=1 cargo test golden`
//! rewrites them; review the diff like code.

use std::path::PathBuf;

use crate::api::pb;
use crate::api::status::{build, Inputs};
use crate::boot::BootStatus;
use crate::history::{Entry, Outcome};
use crate::slots::{Partition, Slot, SlotLayout};
use crate::state::{Staged, Staging, State};

const T0: u64 = 1_795_000_000; // 2026-11-18

fn layout(booted: Slot) -> SlotLayout {
    let part = |label: &str, number: u32| Partition {
        label: label.into(),
        number,
        device: format!("/dev/vda{number}").into(),
        major: 253,
        minor: number,
        disk: "vda".into(),
        size: 2 << 30,
    };
    SlotLayout {
        a: part("root-a", 2),
        b: part("root-b", 3),
        esp: Some(part("esp", 1)),
        booted,
        root_dm: None,
    }
}

fn boot(default: Slot, trial: Option<(Slot, u8)>, bootable: [bool; 2]) -> BootStatus {
    BootStatus {
        default,
        trial,
        bootable,
        default_boots_left: None,
        fell_back_from: None,
        raw: "ua_default=b ua_a_ok=1 ua_b_ok=1".into(),
    }
}

fn staged(version: &str, slot: Slot) -> Staged {
    Staged {
        attempt: "19a7c1f0-3e21".into(),
        version: version.into(),
        slot,
        target_sha256: "ab".repeat(32),
        bytes_fetched: 6_830_000,
        from_version: Some("1.0".into()),
    }
}

fn entry(version: &str, outcome: Outcome, reason: &str, at: u64) -> Entry {
    Entry {
        version: version.into(),
        from_version: Some("1.0".into()),
        slot: Slot::B,
        outcome,
        reason: reason.into(),
        bytes_fetched: 6_830_000,
        at,
        cause: None,
        boot: None,
    }
}

/// A committed entry with how its release booted.
fn booted(version: &str, boot: crate::reboot_method::BootRecord, at: u64) -> Entry {
    Entry {
        boot: Some(boot),
        ..entry(version, Outcome::Committed, "", at)
    }
}

fn by_kexec() -> crate::reboot_method::BootRecord {
    crate::reboot_method::BootRecord {
        method: crate::reboot_method::RebootMethod::Kexec,
        downtime_ms: Some(8_412),
        fallback: None,
    }
}

/// Kexec asked for, refused by a locked-down kernel: the firmware rebooted.
fn kexec_refused() -> crate::reboot_method::BootRecord {
    crate::reboot_method::BootRecord {
        method: crate::reboot_method::RebootMethod::Firmware,
        downtime_ms: Some(21_930),
        fallback: Some(
            "the kernel refused slot b's kernel under lockdown (integrity): kexec needs a \
             kernel signed with a key this kernel trusts: Operation not permitted (os error 1)"
                .into(),
        ),
    }
}

/// 2.0 committed after a kexec boot, or after a firmware boot kexec fell back to.
fn committed_booted() -> Vec<(&'static str, pb::Status)> {
    let committed = |record: crate::reboot_method::BootRecord| {
        let state = State::Committed {
            version: "2.0".into(),
            slot: Slot::B,
            previous: Some((Slot::A, "1.0".into())),
            at: T0,
            bytes_fetched: 0,
            boot: Some(record.clone()),
        };
        status(
            &layout(Slot::B),
            state,
            boot(Slot::B, None, [true, true]),
            Some(booted("2.0", record, T0)),
            "2.0",
            None,
        )
    };
    vec![
        ("committed-kexec", committed(by_kexec())),
        ("committed-kexec-refused", committed(kexec_refused())),
    ]
}

const HEALTH_FAIL: &str = "unit kubelet.service: failed 40 s after start \
    (ExecMainStatus=1, Result=exit-code); last output: E1126 kubelet.go:1480] \
    failed to run Kubelet: running with swap on is not supported";

/// The status the daemon would build from these inputs, on the grub backend with no
/// images and no unattended loop (the scenarios that need one add it).
fn status(
    layout: &SlotLayout,
    state: State,
    boot: BootStatus,
    last: Option<Entry>,
    running: &str,
    operation: Option<pb::Operation>,
) -> pb::Status {
    let mut s = build(&Inputs {
        compatible: "azurelinux-3-x86_64",
        layout,
        backend: "grub",
        state,
        boot,
        last,
        running_version: Some(running.into()),
        operation,
        images: [None, None],
        auto: None,
        trust: pb::Trust::default(),
    });
    s.agent_version = "0.1.0".into();
    s
}

fn scenarios() -> Vec<(&'static str, pb::Status)> {
    let mut all = at_rest();
    all.extend(staging());
    all.extend(after_staging());
    all.extend(unattended());
    all.extend(committed_booted());
    all
}

/// 2.0 committed on b and running from its dm-verity tree (the root mounted through
/// the verity device, the tree recorded when the agent built it).
fn committed_verity() -> pb::Status {
    let mut layout = layout(Slot::B);
    layout.root_dm = Some(crate::slots::RootDm {
        device: "/dev/dm-0".into(),
        uuid: "CRYPT-VERITY-6f1e2d3c4b5a69788796a5b4c3d2e1f0-root".into(),
    });
    let image = |version: &str, verity: Option<&str>| {
        Some(crate::state::SlotImage {
            version: version.into(),
            sha256: "ab".repeat(32),
            verity: verity.map(|h| crate::state::SlotVerity {
                root_hash: h.into(),
                hash_offset: 612_368_384,
            }),
        })
    };
    let mut s = build(&Inputs {
        compatible: "azurelinux-3-x86_64",
        layout: &layout,
        backend: "grub",
        state: State::Committed {
            version: "2.0".into(),
            slot: Slot::B,
            previous: Some((Slot::A, "1.0".into())),
            at: T0,
            bytes_fetched: 0,
            boot: None,
        },
        boot: boot(Slot::B, None, [true, true]),
        last: Some(entry("2.0", Outcome::Committed, "", T0)),
        running_version: Some("2.0".into()),
        operation: None,
        images: [image("1.0", None), image("2.0", Some(&"5e".repeat(32)))],
        auto: None,
        trust: root_of_trust(3, 200 * 86_400),
    });
    s.agent_version = "0.1.0".into();
    s
}

/// No update in flight: a fresh node and one that committed an update.
fn at_rest() -> Vec<(&'static str, pb::Status)> {
    vec![
        ("committed-verity", committed_verity()),
        (
            "fresh",
            status(
                &layout(Slot::A),
                State::Idle,
                boot(Slot::A, None, [true, false]),
                None,
                "1.0",
                None,
            ),
        ),
        (
            "committed",
            status(
                &layout(Slot::B),
                State::Committed {
                    version: "2.0".into(),
                    slot: Slot::B,
                    previous: Some((Slot::A, "1.0".into())),
                    at: T0,
                    bytes_fetched: 0,
                    boot: None,
                },
                boot(Slot::B, None, [true, true]),
                Some(entry("2.0", Outcome::Committed, "", T0)),
                "2.0",
                None,
            ),
        ),
    ]
}

/// An operation writing the inactive slot.
fn staging() -> Vec<(&'static str, pb::Status)> {
    vec![(
        "staging",
        status(
            &layout(Slot::A),
            State::Staging(Staging {
                attempt: "19a7c1f0-3e21".into(),
                version: "2.0".into(),
                url: "https://updates.example/azl3/2.0.from-8c1f0e3a9b7d2c45.uap".into(),
                manifest_sha256: "cd".repeat(32),
                slot: Slot::B,
                ops_total: 40,
                ops_done: 12,
                bytes_total: 1 << 30,
                bytes_done: 483_183_820,
                bytes_fetched: 3_100_000,
                started: T0,
                from_version: Some("1.0".into()),
                read_back: None,
            }),
            boot(Slot::A, None, [true, false]),
            None,
            "1.0",
            Some(pb::Operation {
                id: "19a7c1f0-3e21".into(),
                phase: pb::Phase::Writing as i32,
                version: "2.0".into(),
                source: "https://updates.example/azl3/2.0.from-8c1f0e3a9b7d2c45.uap".into(),
                delta: true,
                reboot: pb::RebootPolicy::Immediate as i32,
                bytes_done: 483_183_820,
                bytes_total: 1 << 30,
                bytes_fetched: 3_100_000,
                ops_done: 12,
                ops_total: 40,
                started: Some(crate::api::status::ts(T0)),
            }),
        ),
    )]
}

/// A staged release: armed, in its trial boot, rolled back by the health checks.
fn after_staging() -> Vec<(&'static str, pb::Status)> {
    vec![
        (
            "armed",
            status(
                &layout(Slot::A),
                State::Armed {
                    staged: staged("2.0", Slot::B),
                    tries: 3,
                },
                boot(Slot::A, Some((Slot::B, 3)), [true, true]),
                None,
                "1.0",
                None,
            ),
        ),
        (
            "trial",
            status(
                &layout(Slot::B),
                State::Armed {
                    staged: staged("2.0", Slot::B),
                    tries: 3,
                },
                boot(Slot::A, Some((Slot::B, 2)), [true, true]),
                None,
                "2.0",
                None,
            ),
        ),
        (
            "rolled-back",
            status(
                &layout(Slot::A),
                State::RolledBack {
                    version: "1.4.0".into(),
                    slot: Slot::A,
                    reason: HEALTH_FAIL.into(),
                    at: T0 + 600,
                    cause: Some(crate::history::RollbackCause::HealthCheck),
                },
                boot(Slot::A, None, [true, false]),
                Some(entry("1.4.0", Outcome::RolledBack, HEALTH_FAIL, T0 + 600)),
                "1.0",
                None,
            ),
        ),
    ]
}

/// The unattended loop's view: staged, waiting for the maintenance window; halted by
/// an alert; committed and soaking.
fn unattended() -> Vec<(&'static str, pb::Status)> {
    let waiting = waiting_for_window();
    let mut halted = waiting.clone();
    if let Some(a) = halted.auto.as_mut() {
        a.next_step = "halted before rebooting into 2.0: alert UpdateAgentReleaseRolledBack{instance=\"n7:9469\"} is firing (3 matching alerts); asking again at 2026-11-18T11:07:40Z".into();
        a.halted_by = "alert UpdateAgentReleaseRolledBack{instance=\"n7:9469\",team=\"a\\nb\"} is firing (3 matching alerts)".into();
    }
    let mut soaking = waiting.clone();
    if let Some(a) = soaking.auto.as_mut() {
        a.next_step =
            "2.0 is committed; soaking: the FleetLock slot goes back at 2026-11-18T11:36:40Z"
                .into();
        a.fleetlock = "unknown".into();
        a.held_version.clear();
        a.held_reason.clear();
        a.soak_end = Some(crate::api::status::ts(T0 + 1800));
    }
    // Its root ran out: nothing new is accepted until the next one is followed.
    soaking.trust = Some(root_of_trust(7, -3 * 86_400 - 60));
    vec![
        ("armed-waiting-for-window", waiting),
        ("armed-halted-by-alert", halted),
        ("soaking", soaking),
    ]
}

fn waiting_for_window() -> pb::Status {
    {
        let mut s = status(
            &layout(Slot::A),
            State::Armed {
                staged: staged("2.0", Slot::B),
                tries: 3,
            },
            boot(Slot::A, Some((Slot::B, 3)), [true, true]),
            None,
            "1.0",
            None,
        );
        let t = |secs: u64| Some(crate::api::status::ts(secs));
        s.auto = Some(pb::Auto {
            enabled: true,
            channel: "stable".into(),
            reboot: "fleetlock".into(),
            last_check: t(T0),
            last_check_error: String::new(),
            next_check: t(T0 + 6 * 3600),
            next_step: "2.0 is staged; rebooting in the window that opens at 2026-11-28T01:00:00Z"
                .into(),
            offered_version: "2.0".into(),
            wave_start: t(T0 - 600),
            held_version: "1.9".into(),
            held_reason: format!("it was rolled back on this node: {HEALTH_FAIL}"),
            window_start: t(T0 + 86_400),
            window_end: t(T0 + 86_400 + 3 * 3600),
            in_window: false,
            time_zone: "Europe/Berlin".into(),
            fleetlock: "released".into(),
            halted_by: String::new(),
            soak_end: None,
        });
        s.trust = Some(root_of_trust(7, 12 * 86_400 + 3600));
        s
    }
}

/// Root `version` of the trust, expiring `left` seconds after T0 (the status's time).
fn root_of_trust(version: u64, left: i64) -> pb::Trust {
    let expires = T0.saturating_add_signed(left);
    crate::api::status::trust(Some(crate::trust::node::RootFacts { version, expires }), T0)
}

fn golden(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("mkdir golden");
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 creates it)", path.display()));
    assert_eq!(
        actual,
        want,
        "{} differs (UPDATE_GOLDEN=1 to accept)",
        path.display()
    );
}

#[test]
fn status_golden_text_and_json() {
    for (name, s) in scenarios() {
        let text = super::status_text(&s);
        for l in text.lines() {
            assert!(
                l.chars().count() <= 80,
                "{name}: line over 80 columns: {l:?}"
            );
        }
        golden(&format!("status-{name}.txt"), &text);
        let json = super::status_json(&s);
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(v["schema"], super::STATUS_SCHEMA);
        golden(&format!("status-{name}.json"), &json);
    }
}

#[test]
fn history_golden_text_and_json() {
    let entries: Vec<pb::HistoryEntry> = [
        entry("1.4.0", Outcome::RolledBack, HEALTH_FAIL, T0 + 600),
        booted("2.0", by_kexec(), T0),
        booted("1.10", kexec_refused(), T0 - 3_600),
        entry(
            "1.9",
            Outcome::Failed,
            "fetching the payload: https://updates.example/azl3/1.9.full.uap: HTTP 503",
            T0 - 86_400,
        ),
    ]
    .iter()
    .map(crate::api::status::history_entry)
    .collect();
    golden("history.txt", &super::history_text(&entries));
    golden("history.json", &super::history_json(&entries));
}
