//! systemd-boot end to end on loop devices, and a delta applied while the booted slot
//! is mounted.

use super::*;

/// A root file system image with a kernel in /boot, made with mkfs.ext4 -d (fixed
/// UUID, seed and time, so only content differs between releases).
fn ext4_image(dir: &Path, name: &str, kernel: &[u8], release: &str) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    fs::create_dir_all(root.join("boot")).expect("boot");
    fs::create_dir_all(root.join("etc")).expect("etc");
    fs::write(root.join("boot/vmlinuz"), kernel).expect("kernel");
    fs::write(root.join("etc/release"), release).expect("release");
    fs::write(root.join("etc/data"), &image(7, None)[..(4 << 20)]).expect("data");
    let img = dir.join(format!("{name}.img"));
    let f = fs::File::create(&img).expect("img");
    f.set_len(IMAGE).expect("size");
    drop(f);
    let o = Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args([
            "-q",
            "-b",
            "4096",
            "-U",
            "6d1b3c2e-0000-4000-8000-000000000001",
        ])
        .args(["-E", "hash_seed=6d1b3c2e-0000-4000-8000-000000000002", "-d"])
        .arg(&root)
        .arg(&img)
        .output()
        .expect("mkfs.ext4");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    img
}

/// systemd-boot end to end on loop devices: staging copies the new slot's kernel onto
/// the ESP and arms a counted entry; the trial boot commits by blessing it.
/// 1.0 as the node's running release: the image kept for deltas, and written into
/// root-a.
fn install_v1(n: &Node, v1: &Path) {
    fs::copy(v1, n.path("v1.img")).expect("v1");
    let v1_bytes = fs::read(v1).expect("read v1");
    fs::OpenOptions::new()
        .write(true)
        .open(n.disk.part(2))
        .and_then(|mut f| f.write_all(&v1_bytes).and_then(|()| f.sync_all()))
        .expect("v1 into root-a");
}

/// A node on systemd-boot: 1.0 in root-a and its entry on the ESP, 2.0 staged and
/// armed in b (delta from 1.0). `extra` goes into `[boot]`.
struct SdNode {
    n: Node,
    esp: PathBuf,
    /// The armed trial's entry name.
    trial: String,
}

impl SdNode {
    fn new(extra: &str) -> Self {
        use update_agent::boot::systemd_boot::{BootFile, EntryConfig, SystemdBoot};
        let n = Node::new();
        let d = n.dir.path();
        let k1 = b"kernel one ".repeat(4000);
        let k2 = b"kernel two ".repeat(4100);
        let v1 = ext4_image(d, "sb-v1", &k1, "1.0");
        let v2 = ext4_image(d, "sb-v2", &k2, "2.0");
        install_v1(&n, &v1);
        // The ESP (a directory: this kernel has no vfat; the VM lab uses a real one).
        let esp = n.path("esp");
        fs::create_dir_all(&esp).expect("esp");
        let kfile = n.path("k1");
        fs::write(&kfile, &k1).expect("k1");
        SystemdBoot::create(
            &esp,
            EntryConfig::default(),
            update_agent::slots::Slot::A,
            "1.0",
            &BootFile {
                path: &kfile,
                sha256: Sha256::digest(&k1).into(),
            },
            None,
        )
        .expect("create ESP");
        let cfg = fs::read_to_string(&n.config).expect("config");
        fs::write(
            &n.config,
            cfg.replace(
                "[boot]\n",
                &format!(
                    "[boot]\nbackend = \"systemd-boot\"\nesp = \"{}\"\n{extra}",
                    esp.display()
                ),
            ),
        )
        .expect("config");
        let delta = n.publish("2.0", "test-board", &v2, 1 << 20);
        let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
        assert!(o.status.success(), "{}", text(&o));
        let mut sd = Self {
            n,
            esp,
            trial: String::new(),
        };
        sd.trial = sd
            .entries()
            .into_iter()
            .find(|e| e.contains("-b-2.0+3.conf"))
            .unwrap_or_else(|| panic!("no counted entry for b: {:?}", sd.entries()));
        assert_eq!(
            fs::read(sd.esp.join("update-agent/b/vmlinuz")).expect("kernel b"),
            k2,
            "v2's kernel on the ESP"
        );
        sd
    }

    fn dir(&self) -> PathBuf {
        self.esp.join("loader/entries")
    }

    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir())
            .expect("entries")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// systemd-boot's rename before it boots a counted entry (`+L[-D]` to
    /// `+(L-1)-(D+1)`), as the firmware boots `name`.
    fn loader_counts(&self, name: &str) -> String {
        let stem = name.strip_suffix(".conf").expect("conf");
        let (prefix, counter) = stem.rsplit_once('+').expect("counted");
        let (left, done) = counter.split_once('-').unwrap_or((counter, "0"));
        let (left, done): (u32, u32) = (left.parse().expect("l"), done.parse().expect("d"));
        let next = format!("{prefix}+{}-{}.conf", left - 1, done + 1);
        fs::rename(self.dir().join(name), self.dir().join(&next)).expect("loader renames");
        next
    }
}

/// systemd-boot end to end on loop devices: staging copies the new slot's kernel onto
/// the ESP and arms a counted entry; the trial boot commits by blessing it. (Without
/// the default's guard, whose renames have their own test below.)
#[test]
fn systemd_boot_stage_trial_and_commit() {
    let sd = SdNode::new("default_tries = 0\n");
    let (n, esp, trial) = (&sd.n, &sd.esp, &sd.trial);
    let entries = || sd.entries();
    assert!(
        !n.path("state/release-mnt").join("boot").exists(),
        "the slot is unmounted again"
    );

    // The firmware boots b: systemd-boot counts the try in the file name.
    sd.loader_counts(trial);
    let o = n.boot_b_and_commit();
    assert!(o.status.success(), "{}", text(&o));
    let blessed = entries();
    assert!(
        blessed.iter().any(|e| e.contains("-b-2.0.conf")),
        "the trial entry is blessed (counter dropped): {blessed:?}"
    );
    let o = n.agent(&["status"], &[]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(s["boot"]["default"], "b", "{s}");

    // A power cut tore the commit's rename (both names, shared clusters), fsck.vfat at
    // the next boot emptied the blessed name, and systemd-boot then booted the counted
    // one as a trial again. The gate finds the committed release counted and commits
    // it again, taking the emptied name away first.
    let blessed_name = blessed
        .iter()
        .find(|e| e.contains("-b-2.0.conf"))
        .expect("blessed")
        .clone();
    let dir = esp.join("loader/entries");
    let recounted = blessed_name.replace(".conf", "+1-2.conf");
    fs::copy(dir.join(&blessed_name), dir.join(&recounted)).expect("the torn rename");
    fs::write(dir.join(&blessed_name), "").expect("fsck empties one name");
    let o = n.agent(&["boot-check"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("committing it again"),
        "the gate says what it found: {}",
        text(&o)
    );
    assert_eq!(entries(), blessed, "blessed again, the emptied name gone");
    assert!(
        fs::read_to_string(dir.join(&blessed_name))
            .expect("entry")
            .contains("linux"),
        "the blessed entry has its text"
    );

    // A manual rollback to a whose rename a power cut tore, and fsck.vfat emptied the
    // new name: a boots (the rollback's reboot), but b is the default again. The gate
    // points the bootloader at a again instead of recording a rollback the next
    // reboot would undo.
    let o = n.agent(&["rollback"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let a_entries: Vec<String> = entries()
        .into_iter()
        .filter(|e| e.contains("-a-1.0"))
        .collect();
    let [a_new] = a_entries.as_slice() else {
        panic!("one entry for a: {a_entries:?}")
    };
    let a_old = "update-agent-1-a-1.0.conf";
    assert_ne!(a_new, a_old, "the rollback ranked a's entry up");
    fs::copy(dir.join(a_new), dir.join(a_old)).expect("the torn rename");
    fs::write(dir.join(a_new), "").expect("fsck empties the new name");
    n.boot_into("a");
    let o = n.agent(&["boot-check"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("pointing it at slot a again"),
        "{}",
        text(&o)
    );
    let o = n.agent(&["status"], &[]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(s["boot"]["default"], "a", "{s}");
    assert_eq!(s["state"]["state"], "rolled_back", "{s}");
}

/// The committed default's guard on systemd-boot, through the agent: the commit's
/// boot guards the new default (`@default+3`), each boot that reaches the gate sets it
/// back, and three boots that do not make systemd-boot boot the other slot, where the
/// gate rolls the committed release back with cause stopped_booting.
#[test]
fn systemd_boot_committed_slot_that_stops_booting_falls_back() {
    let sd = SdNode::new("");
    let n = &sd.n;
    sd.loader_counts(&sd.trial);
    n.boot_b_and_commit();
    let guarded = sd
        .entries()
        .into_iter()
        .find(|e| e.contains("-b-2.0@default+3.conf"))
        .unwrap_or_else(|| panic!("the commit's boot guards b: {:?}", sd.entries()));
    // A boot of b that reaches the gate: counted by the loader, set back by the gate.
    let counted = sd.loader_counts(&guarded);
    let o = n.agent(&["boot-check"], &[]);
    assert!(text(&o).contains("normal boot"), "{}", text(&o));
    assert!(sd.entries().contains(&guarded), "{:?}", sd.entries());
    assert!(!sd.entries().contains(&counted));
    // Three boots of b that never reach the agent; then the loader boots a.
    let mut name = guarded;
    for _ in 0..3 {
        name = sd.loader_counts(&name);
    }
    assert!(name.ends_with("@default+0-3.conf"), "{name}");
    n.boot_into("a");
    let o = n.agent(&["boot-check"], &[]);
    let t = text(&o);
    assert!(
        o.status.success()
            && t.contains("rolled back: 2.0")
            && t.contains("slot b stopped booting"),
        "{t}"
    );
    let st = n.state();
    assert_eq!(
        (st["state"].as_str(), st["cause"].as_str()),
        (Some("rolled_back"), Some("stopped_booting")),
        "{st}"
    );
    // a is the guarded default now, b is gone.
    let left = sd.entries();
    assert!(
        left.len() == 1 && left[0].contains("-a-1.0@default+3.conf"),
        "{left:?}"
    );
    let o = n.agent(&["status"], &[]);
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status json");
    assert_eq!(
        (&s["boot"]["default"], &s["boot"]["default_boots_left"]),
        (&serde_json::json!("a"), &serde_json::json!(3)),
        "{s}"
    );
}

/// The booted slot is a mounted file system, and ext4 changes its superblock in the
/// page cache even when mounted read-only (never written back): a buffered read of the
/// device sees bytes that are not on it, and no delta made from the release image
/// would apply. Found by the VM lab; the agent reads the booted slot with O_DIRECT.
#[test]
fn delta_applies_while_the_booted_slot_is_mounted() {
    let n = Node::new();
    let d = n.dir.path();
    let v1 = ext4_image(d, "ro-v1", &b"kernel one ".repeat(1000), "1.0");
    let v2 = ext4_image(d, "ro-v2", &b"kernel two ".repeat(1000), "2.0");
    install_v1(&n, &v1);
    let v1_bytes = fs::read(&v1).expect("read v1");
    let delta = n.publish("2.0", "test-board", &v2, 1 << 20);
    // No full payload to fall back to: the delta itself must apply.
    fs::remove_file(n.payloads.join("2.0.full.uap")).expect("rm full");
    let mnt = n.path("root");
    fs::create_dir_all(&mnt).expect("mnt");
    sh(
        "mount",
        &["-o", "ro", &n.disk.part(2), mnt.to_str().expect("p")],
    );
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    sh("umount", &[mnt.to_str().expect("p")]);
    assert!(o.status.success(), "{}", text(&o));
    let v2_bytes = fs::read(&v2).expect("read v2");
    assert_eq!(
        sha(&read_dev(&n.disk.part(3), v2_bytes.len() as u64)),
        sha(&v2_bytes),
        "slot b does not hold 2.0"
    );
    assert_eq!(
        sha(&read_dev(&n.disk.part(2), v1_bytes.len() as u64)),
        sha(&v1_bytes),
        "root-a changed"
    );
}
