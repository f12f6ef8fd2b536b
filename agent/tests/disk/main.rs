//! The agent on real disks: a GPT disk image on loop devices, a real HTTP server on
//! 127.0.0.1 that can misbehave, the real `update-agent` binary, and the real GRUB
//! environment block (read back with `grub-editenv`). Needs root (losetup).

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use update_agent::payload::generate::{self, Image, Options};
use update_agent::payload::sign::PublisherKey;

const MIB: u64 = 1 << 20;
const SLOT: u64 = 64 * MIB;
const IMAGE: u64 = 40 * MIB;

fn sh(cmd: &str, args: &[&str]) -> Output {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the disk tests need root (loop devices); run them through integration/test.sh as root"
    );
}

/// A GPT disk image attached to a loop device with partitions esp, root-a, root-b, state.
struct LoopDisk {
    dev: String,
}

impl LoopDisk {
    fn new(file: &Path) -> Self {
        let f = fs::File::create(file).expect("disk file");
        f.set_len(8 * MIB + 2 * SLOT + 16 * MIB + 2 * MIB)
            .expect("size");
        drop(f);
        let script = "label: gpt\n\
             size=8MiB, type=uefi, name=esp\n\
             size=64MiB, type=linux, name=root-a\n\
             size=64MiB, type=linux, name=root-b\n\
             size=16MiB, type=linux, name=state\n";
        let mut c = Command::new("sfdisk")
            .args(["--quiet", file.to_str().expect("path")])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(script.as_bytes())
            .expect("script");
        assert!(c.wait().expect("sfdisk").success());
        let out = sh(
            "losetup",
            &[
                "--find",
                "--show",
                "--partscan",
                file.to_str().expect("path"),
            ],
        );
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let d = Self { dev };
        // Some kernels (this lab's among them) set partscan but do not scan; ask
        // explicitly. "Already there" is fine.
        let _ = Command::new("partx").args(["--add", &d.dev]).output();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(&d.part(3)).exists() {
            assert!(
                Instant::now() < deadline,
                "partitions of {} did not appear",
                d.dev
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn part(&self, n: u32) -> String {
        format!("{}p{n}", self.dev)
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

/// Deterministic image content: text-like blocks, some zero, some random.
fn image(seed: u64, base: Option<&[u8]>) -> Vec<u8> {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let blocks = (IMAGE / 4096) as usize;
    let mut v = Vec::with_capacity(IMAGE as usize);
    for i in 0..blocks {
        let r = next() % 10;
        match (base, r) {
            (Some(b), 0..=6) => v.extend_from_slice(&b[i * 4096..(i + 1) * 4096]),
            (_, 7) => v.extend(std::iter::repeat_n(0u8, 4096)),
            _ => {
                let mut blk = Vec::with_capacity(4096);
                while blk.len() < 4096 {
                    if next() % 4 == 0 {
                        blk.extend_from_slice(&next().to_le_bytes());
                    } else {
                        blk.extend_from_slice(b"slot update payload ");
                    }
                }
                blk.truncate(4096);
                v.extend(blk);
            }
        }
    }
    v
}

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn read_dev(dev: &str, len: u64) -> Vec<u8> {
    let mut f = fs::File::open(dev).expect("open device");
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).expect("read device");
    v
}

// ---- a node: disk, keys, config, bootloader state ----

struct Node {
    dir: tempfile::TempDir,
    disk: LoopDisk,
    config: PathBuf,
    grubenv: PathBuf,
    v1: Vec<u8>,
    v2: Vec<u8>,
    payloads: PathBuf,
    server: Server,
    key: PublisherKey,
}

impl Node {
    fn new() -> Self {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        let disk = LoopDisk::new(&dir.path().join("disk.img"));
        let v1 = image(1, None);
        let v2 = image(2, Some(&v1));
        fs::OpenOptions::new()
            .write(true)
            .open(disk.part(2))
            .and_then(|mut f| f.write_all(&v1).and_then(|()| f.sync_all()))
            .expect("write v1 into root-a");
        let p = |n: &str| dir.path().join(n);
        fs::write(p("v1.img"), &v1).expect("v1");
        fs::write(p("v2.img"), &v2).expect("v2");
        fs::create_dir_all(p("keys.d")).expect("keys");
        let key = PublisherKey::from_seed([3u8; 32]);
        let pem = {
            use ed25519_dalek::pkcs8::EncodePublicKey;
            key.public()
                .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
                .expect("pem")
        };
        fs::write(p("keys.d/publisher.pub"), pem).expect("pub");
        fs::write(p("cmdline"), "console=ttyS0 root=PARTLABEL=root-a ro\n").expect("cmdline");
        fs::write(p("os-release"), "NAME=Test\nVERSION_ID=1.0\n").expect("os-release");
        let grubenv = p("grubenv");
        sh("grub-editenv", &[grubenv.to_str().expect("p"), "create"]);
        sh(
            "grub-editenv",
            &[
                grubenv.to_str().expect("p"),
                "set",
                "ua_default=a",
                "ua_a_ok=1",
                "ua_b_ok=1",
                "saved_entry=0",
            ],
        );
        let payloads = p("payloads");
        fs::create_dir_all(&payloads).expect("payloads");
        let server = Server::start(payloads.clone());
        let config = p("agent.toml");
        fs::write(
            &config,
            format!(
                "compatible = \"test-board\"\nstate_dir = \"{}\"\nkeys_dir = \"{}\"\nos_release = \"{}\"\n\
                 [slots]\ncmdline = \"{}\"\nroot_device = \"{}\"\n\
                 [boot]\ngrubenv = \"{}\"\npstore = \"{}\"\npstore_archive = \"{}\"\n\
                 [fetch]\nretries = 4\nbackoff_ms = 20\nmax_backoff_secs = 1\nrequest_timeout_secs = 2\n\
                 [apply]\ncheckpoint_ms = 100\n\
                 [health]\nscripts_dir = \"{}\"\ndeadline_secs = 4\nsustain_secs = 1\npoll_ms = 50\n\
                 script_timeout_secs = 10\nprobe_timeout_secs = 1\nreboot_on_failure = false\n",
                p("state").display(),
                p("keys.d").display(),
                p("os-release").display(),
                p("cmdline").display(),
                disk.part(2),
                grubenv.display(),
                p("pstore").display(),
                p("pstore-archive").display(),
                p("health.d").display(),
            ),
        )
        .expect("config");
        fs::create_dir_all(p("health.d")).expect("health.d");
        Self {
            dir,
            disk,
            config,
            grubenv,
            v1,
            v2,
            payloads,
            server,
            key,
        }
    }

    fn path(&self, n: &str) -> PathBuf {
        self.dir.path().join(n)
    }

    /// Models a reboot into `slot`: the kernel command line and `/` say so, and when
    /// GRUB boots a trial it counts the try down first, as the fragment does; a boot of
    /// the default counts its guard (`ua_boots`) down the same way.
    /// Boots the trial of 2.0 on slot b and runs the gate, which must commit it; the
    /// gate's output.
    fn boot_b_and_commit(&self) -> std::process::Output {
        self.boot_into("b");
        let o = self.agent(&["boot-check"], &[]);
        assert!(
            text(&o).contains("committed: 2.0 on slot b"),
            "{}",
            text(&o)
        );
        o
    }

    fn boot_into(&self, slot: &str) {
        fs::write(
            self.path("cmdline"),
            format!("root=PARTLABEL=root-{slot} ro\n"),
        )
        .expect("cmdline");
        let part = if slot == "a" {
            self.disk.part(2)
        } else {
            self.disk.part(3)
        };
        let cfg = fs::read_to_string(&self.config).expect("config");
        let line = cfg
            .lines()
            .find(|l| l.starts_with("root_device = "))
            .expect("root_device")
            .to_owned();
        fs::write(
            &self.config,
            cfg.replace(&line, &format!("root_device = \"{part}\"")),
        )
        .expect("config");
        let g = self.grub_vars();
        let count_down = |var: &str| {
            let left: u32 = g.get(var).and_then(|t| t.parse().ok()).unwrap_or(0);
            sh(
                "grub-editenv",
                &[
                    self.grubenv.to_str().expect("p"),
                    "set",
                    &format!("{var}={}", left.saturating_sub(1)),
                ],
            );
        };
        if g.get("ua_trial").map(String::as_str) == Some(slot) {
            count_down("ua_tries");
        } else if g.get("ua_default").map(String::as_str) == Some(slot)
            && g.get("ua_boots").is_some_and(|b| !b.is_empty() && b != "0")
        {
            count_down("ua_boots");
        }
    }

    fn health_script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path("health.d").join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    fn clear_health(&self) {
        let _ = fs::remove_dir_all(self.path("health.d"));
        fs::create_dir_all(self.path("health.d")).expect("health.d");
        let cfg = fs::read_to_string(&self.config).expect("config");
        let kept: Vec<&str> = cfg
            .lines()
            .filter(|l| {
                !l.starts_with("units")
                    && !l.starts_with("systemctl")
                    && !l.starts_with("http")
                    && !l.starts_with("tcp")
            })
            .collect();
        fs::write(&self.config, kept.join("\n") + "\n").expect("config");
    }

    /// Adds `key = value` lines to the [health] table (it is the last table).
    fn health_config(&self, lines: &str) {
        let mut cfg = fs::read_to_string(&self.config).expect("config");
        cfg.push_str(lines);
        cfg.push('\n');
        fs::write(&self.config, cfg).expect("config");
    }

    /// Back to "booted a, nothing staged" between rounds of a test.
    fn reset(&self) {
        let _ = fs::remove_dir_all(self.path("state"));
        sh(
            "grub-editenv",
            &[
                self.grubenv.to_str().expect("p"),
                "set",
                "ua_default=a",
                "ua_trial=",
                "ua_b_ok=1",
            ],
        );
    }

    /// Publishes v2 (or `target`) as full + delta from v1; returns the delta's name.
    fn publish(&self, version: &str, compatible: &str, target: &Path, chunk: u64) -> String {
        self.publish_signed(&self.key, version, compatible, target, chunk)
    }

    /// Checkpoints (and read-back marks) written at every chance instead of every
    /// 100 ms, so a fail point after one fires early.
    fn checkpoint_at_every_chance(&self) {
        let cfg = fs::read_to_string(&self.config).expect("config");
        if cfg.contains("checkpoint_ms = 0\n") {
            return;
        }
        assert!(cfg.contains("checkpoint_ms = 100\n"), "{cfg}");
        fs::write(
            &self.config,
            cfg.replace("checkpoint_ms = 100\n", "checkpoint_ms = 0\n"),
        )
        .expect("config");
    }

    /// [`Node::publish`] signed by `key` instead of the node's publisher key.
    fn publish_signed(
        &self,
        key: &PublisherKey,
        version: &str,
        compatible: &str,
        target: &Path,
        chunk: u64,
    ) -> String {
        self.publish_with(key, version, compatible, target, chunk, &|_, _| {})
    }

    /// [`Node::publish_signed`] with the generator's options changed by `tweak` (which
    /// also sees the target image).
    fn publish_with(
        &self,
        key: &PublisherKey,
        version: &str,
        compatible: &str,
        target: &Path,
        chunk: u64,
        tweak: &dyn Fn(&mut Options, &Image),
    ) -> String {
        let mut o = Options::new(
            compatible,
            version,
            update_agent::timefmt::now() - 60,
            update_agent::timefmt::now() + 86_400,
        );
        o.level = 3;
        o.delta_chunk = chunk;
        o.data_chunk = chunk * 2;
        o.max_reference = chunk * 4;
        let t = Image::open(target).expect("target");
        let s = Image::open(&self.path("v1.img")).expect("source");
        tweak(&mut o, &t);
        generate::create_full(
            &t,
            Some(&s),
            &o,
            key,
            &self.payloads.join(format!("{version}.full.uap")),
        )
        .expect("full");
        let name = format!("{version}.from-{}.uap", &hex::encode(s.sha256())[..16]);
        generate::create_delta(&t, &s, &o, key, &self.payloads.join(&name)).expect("delta");
        name
    }

    fn agent(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_update-agent"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("run update-agent")
    }

    fn grub_vars(&self) -> HashMap<String, String> {
        let o = sh("grub-editenv", &[self.grubenv.to_str().expect("p"), "list"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_slice(&fs::read(self.path("state/state.json")).expect("state.json"))
            .expect("json")
    }

    fn slot_b(&self) -> Vec<u8> {
        read_dev(&self.disk.part(3), self.v2.len() as u64)
    }

    fn assert_booted_untouched(&self) {
        assert_eq!(
            sha(&read_dev(&self.disk.part(2), self.v1.len() as u64)),
            sha(&self.v1),
            "booted slot a changed"
        );
    }

    fn assert_armed_v2(&self) {
        assert_eq!(
            sha(&self.slot_b()),
            sha(&self.v2),
            "slot b does not hold v2"
        );
        let g = self.grub_vars();
        assert_eq!(g.get("ua_trial").map(String::as_str), Some("b"), "{g:?}");
        assert_eq!(g.get("ua_default").map(String::as_str), Some("a"), "{g:?}");
        assert_eq!(g.get("ua_b_ok").map(String::as_str), Some("1"), "{g:?}");
        assert_eq!(
            g.get("saved_entry").map(String::as_str),
            Some("0"),
            "foreign variable kept: {g:?}"
        );
        assert_eq!(self.state()["state"], "armed");
        self.assert_booted_untouched();
    }
}

/// The next number of a xorshift sequence (a kill schedule that a seed replays).
fn xorshift(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Runs `update-agent stage URL` again and again, each run SIGKILLed after `wait()`
/// unless it ends first, until the release is armed; a run that ends must succeed,
/// and the booted slot must be untouched after every run. Returns (runs, kills).
fn stage_under_kills(
    n: &Node,
    url: &str,
    max_runs: usize,
    wait: &mut dyn FnMut() -> Duration,
) -> (usize, usize) {
    let (mut runs, mut kills) = (0, 0);
    loop {
        runs += 1;
        assert!(runs <= max_runs, "no completion after {runs} runs");
        let mut child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
            .arg("--config")
            .arg(&n.config)
            .args(["stage", url])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        let wait = wait();
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break Some(s);
            }
            if started.elapsed() >= wait {
                child.kill().expect("kill");
                child.wait().expect("reap");
                kills += 1;
                break None;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if let Some(s) = status {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = Read::read_to_string(&mut e, &mut err);
            }
            assert!(s.success(), "run {runs} failed after {kills} kills: {err}");
            if n.state()["state"] == "armed" {
                return (runs, kills);
            }
        }
        n.assert_booted_untouched();
    }
}

mod api;
mod auto;
mod halt;
mod journal;
mod kill;
mod reboot;
mod resume;
mod security;
mod server;
mod staging;
mod systemd_boot;
mod trust;
mod verity;

use server::{Faults, Server};

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts that `o` (the health gate's output after the reboot back) reports 2.0
/// rolled back, and why.
fn assert_rolled_back(o: &Output, why: &str) {
    assert!(
        text(o).contains("rolled back: 2.0") && text(o).contains(why),
        "{}",
        text(o)
    );
}

/// O_EXCL on a block device holds it exclusively: the agent's own exclusive open fails.
trait ExclExt {
    fn custom_flags_excl(&mut self) -> &mut Self;
}
impl ExclExt for fs::OpenOptions {
    fn custom_flags_excl(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::libc::O_EXCL)
    }
}
