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

// ---- a payload server that can misbehave ----

#[derive(Default, Clone, Debug)]
struct Faults {
    /// Answer this many requests with 500 first.
    errors_500: u32,
    /// Cut this many responses off mid-body.
    drops: u32,
    /// Flip a byte in this many range responses (not the first request).
    corrupt: u32,
    /// Sleep before each response.
    delay_ms: u64,
    /// Stall this many range responses (not the first request) for 3 s mid-body.
    stalls: u32,
    /// After this many range responses, answer every further one with 503 (0: never).
    break_after: u64,
    /// Close every connection after this many bytes of a response body (0: never).
    cut_after: u64,
    /// Send range bodies (not the first request's) at this many bytes a second (0: at
    /// once): a slow link.
    rate: u64,
}

struct Server {
    port: u16,
    faults: Arc<Mutex<Faults>>,
    /// Body bytes written to the socket (cut and partial responses included), and
    /// range responses served.
    served: Arc<AtomicU64>,
    ranges: Arc<AtomicU64>,
}

impl Server {
    fn start(dir: PathBuf) -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let faults = Arc::new(Mutex::new(Faults::default()));
        let served = Arc::new(AtomicU64::new(0));
        let ranges = Arc::new(AtomicU64::new(0));
        let (f2, s2, r2) = (
            Arc::clone(&faults),
            Arc::clone(&served),
            Arc::clone(&ranges),
        );
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (dir, f, s, r) = (
                    dir.clone(),
                    Arc::clone(&f2),
                    Arc::clone(&s2),
                    Arc::clone(&r2),
                );
                std::thread::spawn(move || {
                    let _ = serve(c, &dir, &f, &s, &r);
                });
            }
        });
        Self {
            port,
            faults,
            served,
            ranges,
        }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    fn set(&self, f: Faults) {
        *self.faults.lock().expect("faults") = f;
    }
}

fn serve(
    mut c: TcpStream,
    dir: &Path,
    faults: &Mutex<Faults>,
    served: &AtomicU64,
    ranges: &AtomicU64,
) -> std::io::Result<()> {
    loop {
        let mut req = Vec::new();
        let mut b = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") {
            if c.read(&mut b)? == 0 {
                return Ok(());
            }
            req.push(b[0]);
        }
        let text = String::from_utf8_lossy(&req).into_owned();
        let path = text
            .split_whitespace()
            .nth(1)
            .unwrap_or("/")
            .trim_start_matches('/')
            .to_owned();
        let headers: HashMap<String, String> = text
            .lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut f = faults.lock().expect("faults").clone();
        std::thread::sleep(Duration::from_millis(f.delay_ms));
        let respond = |c: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
            write!(
                c,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n",
                body.len()
            )?;
            c.write_all(body)
        };
        if f.break_after > 0 && ranges.load(Ordering::Relaxed) >= f.break_after {
            respond(&mut c, "503 Service Unavailable", "", b"down")?;
            continue;
        }
        if f.errors_500 > 0 {
            f.errors_500 -= 1;
            *faults.lock().expect("faults") = f;
            respond(&mut c, "500 Internal Server Error", "", b"oops")?;
            continue;
        }
        let Ok(data) = fs::read(dir.join(&path)) else {
            respond(&mut c, "404 Not Found", "", b"no")?;
            continue;
        };
        let Some((a, z)) = headers
            .get("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split_once('-'))
            .and_then(|(a, z)| Some((a.parse::<usize>().ok()?, z.parse::<usize>().ok()?)))
        else {
            respond(&mut c, "200 OK", "", &data)?;
            continue;
        };
        let z = z.min(data.len() - 1);
        let mut body = data[a..=z].to_vec();
        let cr = format!("Content-Range: bytes {a}-{z}/{}\r\n", data.len());
        if f.drops > 0 {
            f.drops -= 1;
            *faults.lock().expect("faults") = f;
            write!(
                c,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n",
                body.len()
            )?;
            c.write_all(&body[..body.len() / 2])?;
            served.fetch_add(body.len() as u64 / 2, Ordering::Relaxed);
            return Ok(());
        }
        if f.stalls > 0 && a > 0 {
            f.stalls -= 1;
            *faults.lock().expect("faults") = f;
            write!(
                c,
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n",
                body.len()
            )?;
            c.write_all(&body[..body.len() / 2])?;
            served.fetch_add(body.len() as u64 / 2, Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
        if f.corrupt > 0 && a > 0 {
            f.corrupt -= 1;
            *faults.lock().expect("faults") = f.clone();
            let mid = body.len() / 2;
            body[mid] ^= 0x55;
        }
        ranges.fetch_add(1, Ordering::Relaxed);
        write!(
            c,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\n{cr}\r\n",
            body.len()
        )?;
        let rate = if a > 0 { f.rate } else { 0 };
        let cut = f.cut_after > 0 && body.len() as u64 > f.cut_after;
        let end = if cut {
            f.cut_after as usize
        } else {
            body.len()
        };
        send_body(&mut c, &body[..end], rate, served)?;
        if cut {
            return Ok(());
        }
    }
}

/// Writes `body`, at `rate` bytes a second when not 0 (20 slices a second), counting
/// what reached the socket.
fn send_body(c: &mut TcpStream, body: &[u8], rate: u64, served: &AtomicU64) -> std::io::Result<()> {
    let slice = if rate == 0 {
        body.len().max(1)
    } else {
        (rate as usize / 20).max(1)
    };
    let started = Instant::now();
    let mut sent = 0usize;
    for piece in body.chunks(slice) {
        if rate > 0 {
            // Paced from the start, so a slow reader does not slow the link further.
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        c.write_all(piece)?;
        sent += piece.len();
        served.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    Ok(())
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
                 [boot]\ngrubenv = \"{}\"\n\
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
    /// GRUB boots a trial it counts the try down first, as the fragment does.
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
        if g.get("ua_trial").map(String::as_str) == Some(slot) {
            let left: u32 = g.get("ua_tries").and_then(|t| t.parse().ok()).unwrap_or(0);
            sh(
                "grub-editenv",
                &[
                    self.grubenv.to_str().expect("p"),
                    "set",
                    &format!("ua_tries={}", left.saturating_sub(1)),
                ],
            );
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
        generate::create_full(
            &t,
            Some(&s),
            &o,
            &self.key,
            &self.payloads.join(format!("{version}.full.uap")),
        )
        .expect("full");
        let name = format!("{version}.from-{}.uap", &hex::encode(s.sha256())[..16]);
        generate::create_delta(&t, &s, &o, &self.key, &self.payloads.join(&name)).expect("delta");
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

mod api;
mod auto;
mod journal;
mod resume;
mod security;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn stage_over_http_with_faults_then_hostile_inputs() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 256 << 10);

    // Flaky server: two 500s and a connection cut mid-body, all retried.
    n.server.set(Faults {
        errors_500: 2,
        drops: 1,
        stalls: 1,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("armed: slot b holds 2.0"), "{}", text(&o));
    n.assert_armed_v2();
    let fetched = n.state()["staged"]["bytes_fetched"]
        .as_u64()
        .expect("bytes_fetched");
    let size = fs::metadata(n.payloads.join(&delta)).expect("meta").len();
    assert!(fetched <= size, "fetched {fetched} of a {size}-byte delta");

    // A 404 fails at once and names the URL.
    let o = n.agent(&["stage", &n.server.url("3.0.from-nothing.uap")], &[]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("HTTP 404") && text(&o).contains("3.0.from-nothing.uap"),
        "{}",
        text(&o)
    );

    // A corrupted range: the operation's hash catches it; slot b is left unbootable.
    n.server.set(Faults {
        corrupt: 1,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(!o.status.success(), "{}", text(&o));
    // Which check sees it depends on where the byte lands: zstd's own, or the hash.
    assert!(
        text(&o).contains("does not match the manifest")
            || text(&o).contains("zstd frame is corrupt"),
        "{}",
        text(&o)
    );
    assert_eq!(n.state()["state"], "failed");
    assert!(n.state()["reason"]
        .as_str()
        .expect("reason")
        .contains("operation"));
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.assert_booted_untouched();
    n.server.set(Faults::default());

    // Wrong product line.
    let other = n.publish("2.1", "other-board", &n.path("v2.img"), 1 << 20);
    let o = n.agent(&["stage", &n.server.url(&other)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("other-board"),
        "{}",
        text(&o)
    );
    // Downgrade below the running 1.0.
    let old = n.publish("0.9", "test-board", &n.path("v2.img"), 1 << 20);
    let o = n.agent(&["stage", &n.server.url(&old)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("older than the running release 1.0"),
        "{}",
        text(&o)
    );
    // Untrusted key.
    let stranger = PublisherKey::from_seed([8u8; 32]);
    let mut opts = Options::new(
        "test-board",
        "2.2",
        update_agent::timefmt::now() - 60,
        update_agent::timefmt::now() + 86_400,
    );
    opts.level = 3;
    let t = Image::open(&n.path("v2.img")).expect("t");
    generate::create_full(&t, None, &opts, &stranger, &n.payloads.join("2.2.full.uap"))
        .expect("full");
    let o = n.agent(&["stage", &n.server.url("2.2.full.uap")], &[]);
    assert!(
        !o.status.success() && text(&o).contains("does not trust"),
        "{}",
        text(&o)
    );
    // Expired manifest.
    let opts = Options {
        version: "2.3".into(),
        created: 1_000,
        expires: 2_000,
        ..opts
    };
    generate::create_full(&t, None, &opts, &n.key, &n.payloads.join("2.3.full.uap")).expect("full");
    let o = n.agent(&["stage", &n.server.url("2.3.full.uap")], &[]);
    assert!(
        !o.status.success() && text(&o).contains("expired"),
        "{}",
        text(&o)
    );
    // A target larger than the slot is refused before anything is written.
    let big = n.path("big.img");
    let mut b = n.v2.clone();
    b.resize((SLOT + MIB) as usize, 7);
    fs::write(&big, &b).expect("big");
    let mut o2 = Options::new(
        "test-board",
        "2.4",
        update_agent::timefmt::now() - 60,
        update_agent::timefmt::now() + 86_400,
    );
    o2.level = 1;
    generate::create_full(
        &Image::open(&big).expect("big"),
        None,
        &o2,
        &n.key,
        &n.payloads.join("2.4.full.uap"),
    )
    .expect("full");
    let o = n.agent(&["stage", &n.server.url("2.4.full.uap")], &[]);
    assert!(
        !o.status.success() && text(&o).contains("holds only"),
        "{}",
        text(&o)
    );
    n.assert_booted_untouched();
}

#[test]
fn delta_for_another_image_falls_back_to_the_full_payload() {
    let n = Node::new();
    // Publish against a different "v1", so the delta's source hash is wrong for slot a.
    let fake = n.path("fake-v1.img");
    // A delta built from v2 itself is all COPYs of blocks slot a does not have. (A
    // delta whose differing source blocks are never read, or only where zstd chose
    // literals, still yields the exact, verified target and is accepted.)
    let f = n.v2.clone();
    fs::write(&fake, &f).expect("fake");
    let mut o = Options::new(
        "test-board",
        "2.0",
        update_agent::timefmt::now() - 60,
        update_agent::timefmt::now() + 86_400,
    );
    o.level = 3;
    let t = Image::open(&n.path("v2.img")).expect("t");
    let s = Image::open(&fake).expect("s");
    generate::create_delta(&t, &s, &o, &n.key, &n.payloads.join("2.0.from-fake.uap"))
        .expect("delta");
    // No full payload yet: a clear error.
    let out = n.agent(&["stage", &n.server.url("2.0.from-fake.uap")], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("different image than the booted slot"),
        "{}",
        text(&out)
    );
    // With a full payload beside it, the agent uses that (reusing slot a's blocks).
    generate::create_full(
        &t,
        Some(&Image::open(&n.path("v1.img")).expect("v1")),
        &o,
        &n.key,
        &n.payloads.join("2.0.full.uap"),
    )
    .expect("full");
    let out = n.agent(&["stage", &n.server.url("2.0.from-fake.uap")], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("staging full payload 2.0"),
        "{}",
        text(&out)
    );
    n.assert_armed_v2();
}

#[test]
fn busy_slot_and_readonly_state_are_refused() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 1 << 20);
    // Someone holds slot b open exclusively.
    let holder = fs::OpenOptions::new()
        .read(true)
        .custom_flags_excl()
        .open(n.disk.part(3))
        .expect("hold slot b");
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("in use"),
        "{}",
        text(&o)
    );
    drop(holder);
    // A read-only state directory: the error names it; nothing is written to slot b's boot flag.
    let state = n.path("state");
    fs::create_dir_all(&state).expect("mkdir");
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "ro,size=1m",
            "tmpfs",
            state.to_str().expect("p"),
        ],
    );
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    sh("umount", &[state.to_str().expect("p")]);
    assert!(
        !o.status.success() && text(&o).contains("state"),
        "{}",
        text(&o)
    );
    // A full state file system.
    sh(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=64k",
            "tmpfs",
            state.to_str().expect("p"),
        ],
    );
    fs::write(state.join("filler"), vec![1u8; 60 << 10]).ok();
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    sh("umount", &[state.to_str().expect("p")]);
    assert!(!o.status.success(), "{}", text(&o));
    n.assert_booted_untouched();
    let g = n.grub_vars();
    assert_eq!(g.get("ua_default").map(String::as_str), Some("a"));
    assert!(g.get("ua_trial").is_none_or(|t| t.is_empty()), "{g:?}");
}

#[test]
fn cancel_and_missing_slot() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    // SIGTERM mid-write: the agent stops, says cancelled, and slot b stays unbootable.
    n.server.set(Faults {
        delay_ms: 30,
        ..Faults::default()
    });
    let child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
        .arg("--config")
        .arg(&n.config)
        .args(["stage", &n.server.url(&delta)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read(n.path("state/state.json"))
        .map_or(true, |b| !String::from_utf8_lossy(&b).contains("staging"))
    {
        assert!(Instant::now() < deadline, "staging never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let o = child.wait_with_output().expect("wait");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("cancelled"), "{}", text(&o));
    assert_eq!(n.state()["state"], "cancelled");
    let g = n.grub_vars();
    assert_eq!(g.get("ua_default").map(String::as_str), Some("a"), "{g:?}");
    assert_eq!(g.get("ua_b_ok").map(String::as_str), Some("0"), "{g:?}");
    n.assert_booted_untouched();
    n.server.set(Faults::default());

    // The network gives out half-way: the written part is kept, resume finishes it.
    let _ = fs::remove_dir_all(n.path("state"));
    n.server.set(Faults {
        break_after: n.server.ranges.load(Ordering::Relaxed) + 12,
        ..Faults::default()
    });
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("staging stopped after operation"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("HTTP 503"), "{}", text(&o));
    assert_eq!(n.state()["state"], "staging");
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    n.server.set(Faults::default());
    let o = n.agent(&["resume"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("resuming delta 2.0 at operation"),
        "{}",
        text(&o)
    );
    n.assert_armed_v2();
    // An armed release can be dropped: the trial is disarmed, the slot unbootable.
    let o = n.agent(&["cancel"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(n.state()["state"], "cancelled");
    let g = n.grub_vars();
    assert_eq!(g.get("ua_b_ok").map(String::as_str), Some("0"), "{g:?}");
    assert!(g.get("ua_trial").is_none_or(|t| t.is_empty()), "{g:?}");
    let o = n.agent(&["cancel"], &[]);
    assert!(
        !o.status.success() && text(&o).contains("nothing to cancel"),
        "{}",
        text(&o)
    );

    // The slot's partition is not there (a relabelled or replaced disk): named, refused.
    let cfg = fs::read_to_string(&n.config).expect("config");
    fs::write(
        &n.config,
        cfg.replace("[slots]\n", "[slots]\nlabel_b = \"root-x\"\n"),
    )
    .expect("config");
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(
        !o.status.success() && text(&o).contains("no partition labelled \"root-x\""),
        "{}",
        text(&o)
    );
    fs::write(&n.config, cfg).expect("config");
    // The kernel command line and / disagree: an error, never a guess.
    fs::write(n.path("cmdline"), "root=PARTLABEL=root-b\n").expect("cmdline");
    let o = n.agent(&["status"], &[]);
    assert!(
        !o.status.success() && text(&o).contains("says slot b booted"),
        "{}",
        text(&o)
    );
}

/// Every reboot scenario of the after-boot issue, on one node, each starting from a
/// fresh staging of v2 into slot b while a runs.
#[test]
fn trial_boots_commit_or_roll_back() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 1 << 20);
    let url = n.server.url(&delta);
    let stage = |n: &Node| {
        n.reset();
        n.boot_into("a");
        n.clear_health();
        let o = n.agent(&["stage", &url], &[]);
        assert!(o.status.success(), "{}", text(&o));
        n.assert_armed_v2();
    };
    let check = |n: &Node, env: &[(&str, &str)]| n.agent(&["boot-check"], env);
    let history = |n: &Node| -> Vec<serde_json::Value> {
        serde_json::from_slice(&fs::read(n.path("state/history.json")).expect("history"))
            .expect("json")
    };

    // 1. Healthy trial: committed, b is the default, the trial is over.
    stage(&n);
    n.health_script("10-ok", "echo fine");
    n.boot_into("b");
    assert_eq!(n.grub_vars().get("ua_tries").map(String::as_str), Some("2"));
    let o = check(&n, &[]);
    assert!(
        o.status.success() && text(&o).contains("committed: 2.0 on slot b"),
        "{}",
        text(&o)
    );
    let g = n.grub_vars();
    assert_eq!(g.get("ua_default").map(String::as_str), Some("b"), "{g:?}");
    assert!(g.get("ua_trial").is_none_or(|t| t.is_empty()), "{g:?}");
    assert_eq!(n.state()["state"], "committed");
    let last = history(&n).last().expect("entry").clone();
    assert_eq!(last["outcome"], "committed");
    assert_eq!(last["version"], "2.0");
    assert_eq!(last["from_version"], "1.0");
    assert!(last["bytes_fetched"].as_u64().expect("bytes") > 0, "{last}");
    // A second start is a normal boot.
    let o = check(&n, &[]);
    assert!(text(&o).contains("normal boot"), "{}", text(&o));

    // 2. Manual rollback to the previous release, then the reboot finishes it.
    let o = n.agent(&["rollback"], &[]);
    assert!(
        o.status.success() && text(&o).contains("rolling back from 2.0 to slot a"),
        "{}",
        text(&o)
    );
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("rolled back: 2.0") && text(&o).contains("manual rollback"),
        "{}",
        text(&o)
    );
    assert_eq!(
        n.grub_vars().get("ua_b_ok").map(String::as_str),
        Some("1"),
        "a manual rollback keeps b bootable"
    );

    // 3. A failing health script: its name and output are the reason; a is the default again.
    stage(&n);
    n.health_script("20-disk", "echo 'disk /var is 100% full' >&2; exit 3");
    n.boot_into("b");
    let o = check(&n, &[]);
    // The health gate fails, so boot-complete.target (and systemd-bless-boot) is not reached.
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("rolling back from 2.0 to slot a: script 20-disk: exited with exit status: 3: disk /var is 100% full"), "{}", text(&o));
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("rolled back: 2.0") && text(&o).contains("20-disk"),
        "{}",
        text(&o)
    );
    assert_eq!(n.state()["state"], "rolled_back");
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));
    let last = history(&n).last().expect("entry").clone();
    assert_eq!(last["outcome"], "rolled_back");
    assert!(
        last["reason"]
            .as_str()
            .expect("reason")
            .contains("100% full"),
        "{last}"
    );

    // 4. The bootloader fell back by itself (a kernel that never reached user space).
    stage(&n);
    sh(
        "grub-editenv",
        &[
            n.grubenv.to_str().expect("p"),
            "set",
            "ua_trial=",
            "ua_tries=0",
        ],
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("rolled back: 2.0") && text(&o).contains("the new slot did not boot"),
        "{}",
        text(&o)
    );
    assert_eq!(n.grub_vars().get("ua_b_ok").map(String::as_str), Some("0"));

    // 5. A probe that times out, and 6. the overall deadline.
    stage(&n);
    n.server.set(Faults {
        delay_ms: 3000,
        ..Faults::default()
    });
    n.health_config(&format!("http = [\"{}\"]", n.server.url("healthz")));
    n.boot_into("b");
    let o = check(&n, &[]);
    n.server.set(Faults::default());
    assert!(
        text(&o).contains("rolling back") && text(&o).contains("http "),
        "{}",
        text(&o)
    );
    stage(&n);
    n.health_script("30-slow", "sleep 8");
    n.boot_into("b");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("script 30-slow: still running when the 4 s deadline passed"),
        "{}",
        text(&o)
    );

    // 7. A unit that looks active, then restarts: caught. (A stand-in systemctl
    //    reports what systemd would: the restart counter and invocation change.)
    stage(&n);
    let fake = n.path("systemctl");
    fs::write(
        &fake,
        format!(
            "#!/bin/sh\nc=$(cat {0} 2>/dev/null || echo 0); c=$((c+1)); echo $c > {0}\n\
             if [ $c -lt 4 ]; then r=0; else r=1; fi\n\
             printf 'ActiveState=active\\nSubState=running\\nNRestarts=%s\\nInvocationID=inv%s\\n' $r $r\n",
            n.path("calls").display()
        ),
    )
    .expect("fake systemctl");
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    n.health_config(&format!(
        "units = [\"kubelet.service\"]\nsystemctl = \"{}\"",
        fake.display()
    ));
    n.boot_into("b");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("unit kubelet.service: restarted"),
        "{}",
        text(&o)
    );

    // 8. Killed during the commit, and 9. during the rollback: the next start finishes.
    stage(&n);
    n.boot_into("b");
    let o = check(&n, &[("UPDATE_AGENT_FAILPOINT", "after-boot-commit")]);
    assert!(!o.status.success());
    let o = check(&n, &[]);
    assert!(text(&o).contains("committed: 2.0"), "{}", text(&o));
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("b")
    );
    // 8b. Killed between the commit's state and its history entry (VM lab scenario 5
    // once cut there): the next start records the commit, once, with its bytes.
    n.reset();
    stage(&n);
    n.boot_into("b");
    let o = check(&n, &[("UPDATE_AGENT_FAILPOINT", "after-commit-state")]);
    assert!(!o.status.success());
    let commits = || -> Vec<serde_json::Value> {
        let all: Vec<serde_json::Value> = fs::read(n.path("state/history.json"))
            .map(|b| serde_json::from_slice(&b).expect("history"))
            .unwrap_or_default();
        all.into_iter()
            .filter(|e| e["outcome"] == "committed" && e["version"] == "2.0")
            .collect()
    };
    assert!(commits().is_empty(), "{:?}", commits());
    let o = check(&n, &[]);
    assert!(text(&o).contains("recorded it"), "{}", text(&o));
    let _ = check(&n, &[]);
    let c = commits();
    assert_eq!(c.len(), 1, "{c:?}");
    assert!(c[0]["bytes_fetched"].as_u64() > Some(0), "{c:?}");
    n.reset();
    stage(&n);
    n.health_script("40-bad", "exit 1");
    n.boot_into("b");
    let o = check(
        &n,
        &[("UPDATE_AGENT_FAILPOINT", "after-rolling-back-state")],
    );
    assert!(!o.status.success());
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("rolling back from 2.0 to slot a"),
        "{}",
        text(&o)
    );
    assert_eq!(
        n.grub_vars().get("ua_default").map(String::as_str),
        Some("a")
    );
    n.boot_into("a");
    let o = check(&n, &[]);
    assert!(
        text(&o).contains("rolled back: 2.0") && text(&o).contains("40-bad"),
        "{}",
        text(&o)
    );

    // 10. mark-good commits a trial without waiting; refused when there is none.
    stage(&n);
    n.boot_into("b");
    let o = n.agent(&["mark-good"], &[]);
    assert!(
        o.status.success() && text(&o).contains("committed: 2.0"),
        "{}",
        text(&o)
    );
    let o = n.agent(&["mark-good"], &[]);
    assert!(
        !o.status.success() && text(&o).contains("no trial boot to mark good"),
        "{}",
        text(&o)
    );
    n.boot_into("a");
}

trait ExclExt {
    fn custom_flags_excl(&mut self) -> &mut Self;
}
impl ExclExt for fs::OpenOptions {
    fn custom_flags_excl(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(nix::libc::O_EXCL)
    }
}

#[test]
fn killed_at_every_phase_and_at_random_points_still_completes() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let url = n.server.url(&delta);
    // Slow enough that a checkpoint (every 100 ms) happens before the end.
    n.server.set(Faults {
        delay_ms: 5,
        ..Faults::default()
    });
    // Every phase boundary: abort there, then a plain restart finishes the job.
    for fp in [
        "after-mark-unbootable",
        "after-begin",
        "after-checkpoint",
        "after-apply",
        "after-staged",
        "after-arm",
    ] {
        n.reset();
        let o = n.agent(&["stage", &url], &[("UPDATE_AGENT_FAILPOINT", fp)]);
        assert!(
            !o.status.success(),
            "{fp}: the fail point did not fire: {}",
            text(&o)
        );
        assert!(
            text(&o).contains(&format!("failpoint {fp}")),
            "{fp}: {}",
            text(&o)
        );
        n.assert_booted_untouched();
        let o = n.agent(&["stage", &url], &[]);
        assert!(o.status.success(), "{fp}: restart failed: {}", text(&o));
        n.assert_armed_v2();
    }

    // Random SIGKILLs during a slow download, each followed by a restart, over as
    // many complete updates as it takes to land at least 50 kills.
    n.server.set(Faults {
        delay_ms: 8,
        ..Faults::default()
    });
    let payload_size = fs::metadata(n.payloads.join(&delta)).expect("meta").len();
    let mut seed = 0x9e37_79b9_u64;
    let mut kills = 0;
    let mut rounds = 0;
    while kills < 50 {
        rounds += 1;
        n.reset();
        // Old content in slot b that matches nothing, so nothing passes by accident.
        fs::OpenOptions::new()
            .write(true)
            .open(n.disk.part(3))
            .and_then(|mut f| f.write_all(&vec![0xa5u8; n.v2.len()]))
            .expect("scribble slot b");
        n.server.served.store(0, Ordering::Relaxed);
        let mut runs = 0;
        loop {
            runs += 1;
            assert!(
                runs < 200,
                "round {rounds}: no completion after {runs} runs"
            );
            let mut child = Command::new(env!("CARGO_BIN_EXE_update-agent"))
                .arg("--config")
                .arg(&n.config)
                .args(["stage", &url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn");
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Up to half a second: a run must be able to get past its first checkpoint
            // even on a loaded machine (the booted slot is read with O_DIRECT, uncached).
            let wait = Duration::from_millis(20 + seed % 480);
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
                assert!(
                    s.success(),
                    "round {rounds} run {runs} failed after {kills} kills"
                );
                if n.state()["state"] == "armed" {
                    break;
                }
            }
            n.assert_booted_untouched();
        }
        n.assert_armed_v2();
        let served = n.server.served.load(Ordering::Relaxed);
        eprintln!("round {rounds}: {runs} runs, {kills} kills so far, served {served} bytes for a {payload_size}-byte payload");
        // Verified operations are not fetched again: allow for the work lost since
        // each run's last checkpoint, never a full re-download per kill.
        assert!(
            served < payload_size * (2 + runs as u64 / 4),
            "round {rounds}: served {served}"
        );
    }
    assert!(kills >= 50);
}

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
#[test]
fn systemd_boot_stage_trial_and_commit() {
    use update_agent::boot::systemd_boot::{BootFile, EntryConfig, SystemdBoot};
    let n = Node::new();
    let d = n.dir.path();
    let k1 = b"kernel one ".repeat(4000);
    let k2 = b"kernel two ".repeat(4100);
    let v1 = ext4_image(d, "sb-v1", &k1, "1.0");
    let v2 = ext4_image(d, "sb-v2", &k2, "2.0");
    fs::copy(&v1, n.path("v1.img")).expect("v1");
    let v1_bytes = fs::read(&v1).expect("read v1");
    fs::OpenOptions::new()
        .write(true)
        .open(n.disk.part(2))
        .and_then(|mut f| f.write_all(&v1_bytes).and_then(|()| f.sync_all()))
        .expect("v1 into root-a");
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
                "[boot]\nbackend = \"systemd-boot\"\nesp = \"{}\"\n",
                esp.display()
            ),
        ),
    )
    .expect("config");
    let delta = n.publish("2.0", "test-board", &v2, 1 << 20);
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let entries = || -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(esp.join("loader/entries"))
            .expect("entries")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let trial = entries()
        .into_iter()
        .find(|e| e.contains("-b-2.0+3.conf"))
        .unwrap_or_else(|| panic!("no counted entry for b: {:?}", entries()));
    assert_eq!(
        fs::read(esp.join("update-agent/b/vmlinuz")).expect("kernel b"),
        k2,
        "v2's kernel on the ESP"
    );
    assert!(
        !n.path("state/release-mnt").join("boot").exists(),
        "the slot is unmounted again"
    );

    // The firmware boots b: systemd-boot counts the try in the file name.
    fs::rename(
        esp.join("loader/entries").join(&trial),
        esp.join("loader/entries")
            .join(trial.replace("+3.conf", "+2-1.conf")),
    )
    .expect("loader renames");
    n.boot_into("b");
    let o = n.agent(&["boot-check"], &[]);
    assert!(
        o.status.success() && text(&o).contains("committed: 2.0 on slot b"),
        "{}",
        text(&o)
    );
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
    fs::copy(&v1, n.path("v1.img")).expect("v1");
    let v1_bytes = fs::read(&v1).expect("read v1");
    fs::OpenOptions::new()
        .write(true)
        .open(n.disk.part(2))
        .and_then(|mut f| f.write_all(&v1_bytes).and_then(|()| f.sync_all()))
        .expect("v1 into root-a");
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
