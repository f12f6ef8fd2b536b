//! The kexec path on both bootloader labs, with the operating system's answers put
//! where the kernel and systemd would give them.

use std::path::Path;
use std::sync::Mutex;

use super::{reboot, record, KernelFiles, KexecOs, Node, RebootError, Refusal, Settings};
use crate::boot::parity_tests::labs::{GrubLab, Lab, SystemdBootLab};
use crate::reboot_method::RebootMethod;
use crate::slots::Slot;
use crate::state::{Staged, State};

const B: Slot = Slot::B;

/// What the operating system answers; every call is written down.
#[derive(Default)]
struct FakeOs {
    load_errno: Option<i32>,
    watchdog_fails: bool,
    exec_fails: bool,
    firmware_fails: bool,
    calls: Mutex<Vec<String>>,
}

impl FakeOs {
    fn note(&self, s: String) {
        self.calls.lock().expect("calls").push(s);
    }
    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls").clone()
    }
    fn answer(&self, fails: bool) -> std::io::Result<()> {
        if fails {
            Err(std::io::Error::other("exited with exit status: 1"))
        } else {
            Ok(())
        }
    }
}

impl KexecOs for FakeOs {
    fn load(
        &self,
        kernel: &std::fs::File,
        initrd: Option<&std::fs::File>,
        cmdline: &str,
    ) -> std::io::Result<()> {
        let len = |f: &std::fs::File| f.metadata().expect("metadata").len();
        let i = initrd.map_or(0, len);
        self.note(format!("load {} {i} {cmdline}", len(kernel)));
        match self.load_errno {
            Some(e) => Err(std::io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }
    fn unload(&self) -> std::io::Result<()> {
        self.note("unload".into());
        Ok(())
    }
    fn arm_watchdog(&self, secs: u32) -> std::io::Result<()> {
        self.note(format!("watchdog {secs}"));
        self.answer(self.watchdog_fails)
    }
    fn exec(&self) -> std::io::Result<()> {
        self.note("exec".into());
        self.answer(self.exec_fails)
    }
    fn firmware_reboot(&self) -> std::io::Result<()> {
        self.note("firmware".into());
        self.answer(self.firmware_fails)
    }
}

fn armed() -> State {
    State::Armed {
        staged: Staged {
            attempt: "att-1".into(),
            version: "2.0".into(),
            slot: B,
            target_sha256: String::new(),
            bytes_fetched: 0,
            from_version: Some("1.0".into()),
        },
        tries: 3,
    }
}

/// A node: a lab's bootloader armed for b, a slot root with a kernel and an initrd,
/// kexec enabled, no lockdown.
struct Bench {
    lab: Box<dyn Lab>,
    dir: tempfile::TempDir,
    settings: Settings,
    state: State,
}

impl Bench {
    fn new(mut lab: Box<dyn Lab>) -> Self {
        lab.ctl().mark_unbootable(B).expect("mark");
        lab.install(B).expect("install");
        lab.ctl().arm_trial(B, 3).expect("arm");
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("boot")).expect("mkdir");
        std::fs::write(root.join("boot/vmlinuz"), vec![1u8; 1000]).expect("kernel");
        std::fs::write(root.join("boot/initrd.img"), vec![2u8; 300]).expect("initrd");
        let settings = Settings {
            panic_secs: 10,
            watchdog_secs: 120,
            load_disabled: dir.path().join("kexec_load_disabled"),
            lockdown: dir.path().join("lockdown"),
            proc_cmdline: dir.path().join("cmdline"),
        };
        std::fs::write(
            &settings.proc_cmdline,
            "BOOT_IMAGE=/boot/vmlinuz root=PARTLABEL=root-a updateagent.slot=a ro\n",
        )
        .expect("write");
        std::fs::write(&settings.load_disabled, "0\n").expect("write");
        std::fs::write(&settings.lockdown, "[none] integrity confidentiality\n").expect("write");
        Self {
            lab,
            dir,
            settings,
            state: armed(),
        }
    }

    fn root(&self) -> std::path::PathBuf {
        self.dir.path().join("root")
    }

    fn reboot(
        &mut self,
        method: RebootMethod,
        os: &FakeOs,
    ) -> Result<super::Rebooting, RebootError> {
        let root = self.root();
        let kernel = move |slot| KernelFiles::open(slot, &root, Path::new("boot"));
        let settings = &self.settings;
        let grub = self.lab.name() == "grub";
        let cmdline = move |slot| {
            if grub {
                super::check_grub_options(settings, slot, "ro")?;
            }
            Ok(crate::boot::slot_cmdline("root-b", slot, None, "ro"))
        };
        let node = Node {
            boot: self.lab.ctl(),
            state: Ok(self.state.clone()),
            state_dir: self.dir.path(),
            settings: &self.settings,
            kernel: &kernel,
            cmdline: &cmdline,
        };
        reboot(method, node, os)
    }

    fn trial(&mut self) -> Option<(Slot, u8)> {
        self.lab.ctl().status().expect("status").trial
    }
}

fn benches() -> Vec<Bench> {
    vec![
        Bench::new(Box::new(GrubLab::new())),
        Bench::new(Box::new(SystemdBootLab::new())),
    ]
}

#[test]
fn kexec_loads_the_bootloaders_line_and_counts_one_try() {
    for mut b in benches() {
        let name = b.lab.name();
        let os = FakeOs::default();
        let done = b.reboot(RebootMethod::Kexec, &os).expect("reboot");
        assert_eq!(done.method, RebootMethod::Kexec, "{name}");
        assert!(done.fallback.is_none(), "{name}");
        assert_eq!(
            os.calls(),
            [
                "load 1000 300 root=PARTLABEL=root-b updateagent.slot=b ro panic=10 updateagent.boot=kexec",
                "watchdog 120",
                "exec"
            ],
            "{name}"
        );
        assert_eq!(
            b.trial(),
            Some((B, 2)),
            "{name}: one try counted, as the bootloader would"
        );
        let rec = record::load(b.dir.path()).expect("record");
        assert_eq!(rec.method, RebootMethod::Kexec, "{name}");
        assert_eq!(rec.attempt.as_deref(), Some("att-1"), "{name}");
        // The kexec'd trial panics: the firmware boots it with the tries left, once.
        assert_eq!(b.lab.boot(), B, "{name}");
        assert_eq!(b.trial(), Some((B, 1)), "{name}");
    }
}

#[test]
fn firmware_asked_for_is_firmware() {
    for mut b in benches() {
        let os = FakeOs::default();
        let done = b.reboot(RebootMethod::Firmware, &os).expect("reboot");
        assert_eq!(done.method, RebootMethod::Firmware);
        assert!(done.fallback.is_none());
        assert_eq!(os.calls(), ["firmware"]);
        assert_eq!(b.trial(), Some((B, 3)), "the bootloader counts this one");
        let rec = record::load(b.dir.path()).expect("record");
        assert_eq!((rec.method, rec.fallback), (RebootMethod::Firmware, None));
    }
}

/// A refusal: a firmware reboot, the reason in the record, the count as before (the
/// bootloader counts the firmware boot), and the calls the OS saw.
fn refused(b: &mut Bench, os: &FakeOs, calls: &[&str]) -> Refusal {
    let name = b.lab.name();
    let done = b.reboot(RebootMethod::Kexec, os).expect("reboot");
    assert_eq!(done.method, RebootMethod::Firmware, "{name}");
    let mut want: Vec<String> = calls.iter().map(|s| s.to_string()).collect();
    want.push("firmware".into());
    let got = os.calls();
    let got: Vec<String> = got
        .into_iter()
        .map(|c| {
            if c.starts_with("load ") {
                "load".into()
            } else {
                c
            }
        })
        .collect();
    assert_eq!(got, want, "{name}");
    let rec = record::load(b.dir.path()).expect("record");
    assert_eq!(rec.method, RebootMethod::Firmware, "{name}");
    let why = rec.fallback.expect("the reason is recorded");
    let r = done.fallback.expect("a refusal");
    assert_eq!(why, crate::update::error_chain(&r), "{name}");
    r
}

#[test]
fn refusals_before_the_count_leave_it_alone() {
    let errnos = [
        nix::libc::EPERM,
        nix::libc::ENOSYS,
        nix::libc::EBUSY,
        nix::libc::ENOEXEC,
    ];
    for errno in errnos {
        for mut b in benches() {
            let os = FakeOs {
                load_errno: Some(errno),
                ..Default::default()
            };
            let r = refused(&mut b, &os, &["load"]);
            assert!(
                matches!(&r, Refusal::Load { source, .. } if source.raw_os_error() == Some(errno)),
                "{r:?}"
            );
            assert_eq!(b.trial(), Some((B, 3)));
        }
    }
    for mut b in benches() {
        std::fs::write(&b.settings.load_disabled, "1\n").expect("write");
        let r = refused(&mut b, &FakeOs::default(), &[]);
        assert!(matches!(r, Refusal::LoadDisabled { .. }), "{r:?}");
        assert_eq!(b.trial(), Some((B, 3)));
    }
    for mut b in benches() {
        std::fs::remove_file(b.root().join("boot/vmlinuz")).expect("rm");
        let r = refused(&mut b, &FakeOs::default(), &[]);
        assert!(matches!(r, Refusal::NoKernel { slot: B, .. }), "{r:?}");
        assert_eq!(b.trial(), Some((B, 3)));
    }
}

#[test]
fn lockdown_names_the_signature_it_needs() {
    for errno in [nix::libc::EPERM, nix::libc::EKEYREJECTED] {
        for mut b in benches() {
            std::fs::write(&b.settings.lockdown, "none [integrity] confidentiality\n")
                .expect("write");
            let os = FakeOs {
                load_errno: Some(errno),
                ..Default::default()
            };
            let r = refused(&mut b, &os, &["load"]);
            assert!(
                matches!(&r, Refusal::Lockdown { mode, .. } if mode == "integrity"),
                "{r:?}"
            );
            assert!(r.to_string().contains("signed"), "{r}");
        }
    }
    // Under lockdown, another errno is not lockdown's doing.
    let mut b = Bench::new(Box::new(GrubLab::new()));
    std::fs::write(&b.settings.lockdown, "none [integrity] confidentiality\n").expect("write");
    let os = FakeOs {
        load_errno: Some(nix::libc::EBUSY),
        ..Default::default()
    };
    assert!(matches!(
        refused(&mut b, &os, &["load"]),
        Refusal::Load { .. }
    ));
}

#[test]
fn refusals_after_the_count_give_the_try_back() {
    for mut b in benches() {
        let os = FakeOs {
            watchdog_fails: true,
            ..Default::default()
        };
        let r = refused(&mut b, &os, &["load", "watchdog 120", "unload"]);
        assert!(matches!(r, Refusal::Watchdog(_)), "{r:?}");
        assert_eq!(b.trial(), Some((B, 3)), "{}", b.lab.name());
    }
    for mut b in benches() {
        let os = FakeOs {
            exec_fails: true,
            ..Default::default()
        };
        let r = refused(&mut b, &os, &["load", "watchdog 120", "exec", "unload"]);
        assert!(matches!(r, Refusal::Exec(_)), "{r:?}");
        assert_eq!(b.trial(), Some((B, 3)), "{}", b.lab.name());
    }
}

#[test]
fn only_an_armed_trial_with_a_try_left_is_kexeced() {
    for mut b in benches() {
        b.state = State::Idle;
        let r = refused(&mut b, &FakeOs::default(), &[]);
        assert!(matches!(r, Refusal::NotATrial { state: "idle" }), "{r:?}");
    }
    for mut b in benches() {
        // Three firmware boots use the three tries.
        for _ in 0..3 {
            assert_eq!(b.lab.boot(), B);
        }
        assert_eq!(b.trial(), Some((B, 0)));
        let r = refused(&mut b, &FakeOs::default(), &[]);
        assert!(matches!(r, Refusal::NoTryLeft { slot: B }), "{r:?}");
        assert_eq!(b.trial(), Some((B, 0)));
    }
}

#[test]
fn a_failed_firmware_reboot_is_an_error() {
    for mut b in benches() {
        let os = FakeOs {
            firmware_fails: true,
            load_errno: Some(nix::libc::ENOSYS),
            ..Default::default()
        };
        let e = b.reboot(RebootMethod::Kexec, &os).expect_err("no reboot");
        assert!(matches!(e, RebootError::Firmware(_)), "{e:?}");
    }
}

#[test]
fn the_watchdog_is_one_property_write_to_systemd() {
    use super::manager_bus::fake::{serve, Answer};
    let dir = tempfile::tempdir().expect("tmp");
    let sock = dir.path().join("private");
    let server = serve(&sock, Answer::Return);
    let os = super::LinuxKexec {
        systemctl: "/bin/false".into(),
        manager_socket: sock,
        reboot_command: vec![],
    };
    os.arm_watchdog(45).expect("armed");
    let seen = server.join().expect("server");
    assert_eq!(seen.property_arg, "KExecWatchdogUSec");
    assert_eq!(seen.value, 45_000_000);
    // No systemd to answer: an error, which the path makes a refusal (above).
    let os = super::LinuxKexec {
        manager_socket: dir.path().join("none"),
        ..os
    };
    let e = os.arm_watchdog(45).expect_err("no systemd");
    assert!(e.to_string().contains("private socket"), "{e}");
}

#[test]
fn grub_options_that_differ_from_the_running_boot_refuse_the_kexec() {
    let mut b = Bench::new(Box::new(GrubLab::new()));
    std::fs::write(
        &b.settings.proc_cmdline,
        "BOOT_IMAGE=/boot/vmlinuz root=PARTLABEL=root-a updateagent.slot=a ro console=ttyS0\n",
    )
    .expect("write");
    let r = refused(&mut b, &FakeOs::default(), &[]);
    match &r {
        Refusal::OptionsMismatch {
            configured,
            running,
            ..
        } => assert_eq!(
            (configured.as_str(), running.as_str()),
            ("ro", "ro console=ttyS0")
        ),
        other => panic!("{other:?}"),
    }
    let msg = r.to_string();
    assert!(
        msg.contains("\"ro\"") && msg.contains("\"ro console=ttyS0\""),
        "{msg}"
    );
    assert_eq!(b.trial(), Some((B, 3)), "nothing counted");
}

#[test]
fn the_running_boots_options_are_what_grub_gave() {
    let dir = tempfile::tempdir().expect("tmp");
    let s = Settings {
        panic_secs: 1,
        watchdog_secs: 10,
        load_disabled: dir.path().join("x"),
        lockdown: dir.path().join("y"),
        proc_cmdline: dir.path().join("cmdline"),
    };
    let check = |line: &str, configured: &str| {
        std::fs::write(&s.proc_cmdline, line).expect("write");
        super::check_grub_options(&s, B, configured)
    };
    // A kexec'd boot: the words the kexec appended are not GRUB's.
    check(
        "root=/dev/mapper/root roothash=ab updateagent.slot=a ro panic=-1 panic=1 updateagent.boot=kexec",
        " ro  panic=-1 ",
    )
    .expect("same options");
    // Not booted through the fragment: nothing to compare.
    check("root=/dev/sda1 ro quiet", "ro").expect("no slot word");
    assert!(matches!(
        check("root=PARTLABEL=root-a updateagent.slot=a ro", "ro quiet"),
        Err(Refusal::OptionsMismatch { .. })
    ));
    std::fs::remove_file(&s.proc_cmdline).expect("rm");
    assert!(matches!(
        super::check_grub_options(&s, B, "ro"),
        Err(Refusal::Probe { .. })
    ));
}
