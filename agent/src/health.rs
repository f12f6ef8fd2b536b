//! Health checks after a trial boot: systemd units that must reach `active` and stay
//! there, executables in a directory, TCP and HTTP probes. All run in parallel, each
//! with its own timeout, under one overall deadline.
//!
//! A unit passes only if it is active continuously for the sustain period: its
//! `ActiveState`, `NRestarts` and `InvocationID` are polled, so a unit that crashes and
//! is restarted between two polls still fails (a new invocation), and one that flaps
//! after first looking healthy is caught.

use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// All checks together must pass within this many seconds.
    pub deadline_secs: u64,
    /// systemd units that must be active and stay active for `sustain_secs`.
    pub units: Vec<String>,
    pub sustain_secs: u64,
    /// How often units are polled.
    pub poll_ms: u64,
    /// Every executable file here is run; exit 0 means healthy.
    pub scripts_dir: PathBuf,
    pub script_timeout_secs: u64,
    /// `host:port` that must accept a TCP connection.
    pub tcp: Vec<String>,
    /// URLs that must answer 2xx.
    pub http: Vec<String>,
    pub probe_timeout_secs: u64,
    /// Kept of each script's output (stdout and stderr each).
    pub output_limit: usize,
    /// The systemctl to ask (tests point this at a stand-in).
    pub systemctl: PathBuf,
    /// The journalctl that gives a failed unit's last lines for the reason.
    pub journalctl: PathBuf,
    /// Reboot into the old slot by itself after a failed trial boot.
    pub reboot_on_failure: bool,
    /// Command that reboots the node.
    pub reboot_command: Vec<String>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            deadline_secs: 300,
            units: Vec::new(),
            sustain_secs: 30,
            poll_ms: 1000,
            scripts_dir: "/etc/update-agent/health.d".into(),
            script_timeout_secs: 60,
            tcp: Vec::new(),
            http: Vec::new(),
            probe_timeout_secs: 10,
            output_limit: 4096,
            systemctl: "systemctl".into(),
            journalctl: "journalctl".into(),
            reboot_on_failure: true,
            reboot_command: vec!["systemctl".into(), "reboot".into()],
        }
    }
}

/// The verdict of one check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// `unit:kubelet.service`, `script:10-disk`, `tcp:127.0.0.1:10250`, `http:…`.
    pub name: String,
    pub ok: bool,
    /// Why it failed, with the (bounded) output of a script.
    pub detail: String,
    pub millis: u64,
}

impl CheckResult {
    /// One line for status and history: "unit kubelet.service: failed 40 s after start".
    pub fn summary(&self) -> String {
        format!("{}: {}", self.name, self.detail)
    }
}

/// Runs `health.reboot_command` (default `systemctl reboot`) and waits for it.
pub fn reboot(cmd: &[String]) -> std::io::Result<()> {
    let (prog, args) = cmd
        .split_first()
        .ok_or_else(|| std::io::Error::other("health.reboot_command is empty"))?;
    let st = Command::new(prog).args(args).status()?;
    if !st.success() {
        return Err(std::io::Error::other(format!("exited with {st}")));
    }
    Ok(())
}

/// Runs every configured check in parallel and returns when all have finished or the
/// deadline has passed (checks still running then fail with "deadline passed").
pub fn run_all(cfg: &HealthConfig) -> Vec<CheckResult> {
    let deadline = Instant::now() + Duration::from_secs(cfg.deadline_secs);
    let mut names: Vec<String> = Vec::new();
    let (tx, rx) = mpsc::channel::<(usize, CheckResult)>();
    let mut spawn = |name: String, f: Box<dyn FnOnce() -> (bool, String) + Send>| {
        let i = names.len();
        names.push(name.clone());
        let tx = tx.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let (ok, detail) = f();
            let _ = tx.send((
                i,
                CheckResult {
                    name,
                    ok,
                    detail,
                    millis: t.elapsed().as_millis() as u64,
                },
            ));
        });
    };
    for unit in &cfg.units {
        let (cfg, unit2) = (cfg.clone(), unit.clone());
        spawn(
            format!("unit {unit}"),
            Box::new(move || check_unit(&cfg, &unit2, deadline)),
        );
    }
    for script in scripts(&cfg.scripts_dir) {
        let cfg = cfg.clone();
        let name = script
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        spawn(
            format!("script {name}"),
            Box::new(move || check_script(&cfg, &script)),
        );
    }
    for addr in &cfg.tcp {
        let (a, t) = (addr.clone(), Duration::from_secs(cfg.probe_timeout_secs));
        spawn(format!("tcp {addr}"), Box::new(move || check_tcp(&a, t)));
    }
    for url in &cfg.http {
        let (u, t) = (url.clone(), Duration::from_secs(cfg.probe_timeout_secs));
        spawn(format!("http {url}"), Box::new(move || check_http(&u, t)));
    }
    drop(tx);
    let mut results: Vec<Option<CheckResult>> = vec![None; names.len()];
    while results.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((i, r)) => {
                // On the console and in the journal: where a trial boot's time goes.
                tracing::info!(check = %r.name, ok = r.ok, millis = r.millis, "health check {} {} after {} ms", r.name, if r.ok { "passed" } else { "failed" }, r.millis);
                results[i] = Some(r);
            }
            Err(_) => break,
        }
    }
    results
        .into_iter()
        .zip(names)
        .map(|(r, name)| {
            r.unwrap_or(CheckResult {
                name,
                ok: false,
                detail: format!(
                    "still running when the {} s deadline passed",
                    cfg.deadline_secs
                ),
                millis: cfg.deadline_secs * 1000,
            })
        })
        .collect()
}

fn scripts(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    std::fs::metadata(p)
                        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// What systemd says about a unit right now.
#[derive(Debug, Default, PartialEq, Eq)]
struct UnitState {
    load: String,
    active: String,
    sub: String,
    restarts: String,
    invocation: String,
    result: String,
    exit_status: String,
    /// CLOCK_MONOTONIC µs when the unit last became active (0: unknown).
    active_since_us: u64,
}

fn unit_state(systemctl: &Path, unit: &str) -> Result<UnitState, String> {
    let out = Command::new(systemctl)
        .args([
            "show",
            "--property=LoadState,ActiveState,SubState,NRestarts,InvocationID,Result,ExecMainStatus,ActiveEnterTimestampMonotonic",
            "--",
            unit,
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {}: {e}", systemctl.display()))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl show failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut s = UnitState::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line.split_once('=') {
            Some(("LoadState", v)) => v.clone_into(&mut s.load),
            Some(("ActiveState", v)) => v.clone_into(&mut s.active),
            Some(("SubState", v)) => v.clone_into(&mut s.sub),
            Some(("NRestarts", v)) => v.clone_into(&mut s.restarts),
            Some(("InvocationID", v)) => v.clone_into(&mut s.invocation),
            Some(("Result", v)) => v.clone_into(&mut s.result),
            Some(("ExecMainStatus", v)) => v.clone_into(&mut s.exit_status),
            Some(("ActiveEnterTimestampMonotonic", v)) => {
                s.active_since_us = v.trim().parse().unwrap_or(0);
            }
            _ => {}
        }
    }
    Ok(s)
}

/// How long ago (by CLOCK_MONOTONIC, systemd's clock for these timestamps) a unit
/// became active, when systemd said.
fn active_since(enter_us: u64) -> Option<Duration> {
    if enter_us == 0 {
        return None;
    }
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let now_us =
        u64::try_from(now.tv_sec()).ok()? * 1_000_000 + u64::try_from(now.tv_nsec()).ok()? / 1_000;
    now_us.checked_sub(enter_us).map(Duration::from_micros)
}

/// Why a unit is not healthy, for people: its state, how its main process ended, and
/// its last lines in this boot's journal (bounded by `output_limit`).
fn unit_failure(cfg: &HealthConfig, unit: &str, s: &UnitState, when: &str) -> String {
    let mut why = format!("{} {when}", s.active);
    let how: Vec<String> = [("Result", &s.result), ("ExecMainStatus", &s.exit_status)]
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !how.is_empty() {
        why.push_str(&format!(" ({})", how.join(", ")));
    }
    let journal = Command::new(&cfg.journalctl)
        .args(["-b", "-u", unit, "-n", "5", "-o", "cat", "--no-pager"])
        .stdin(Stdio::null())
        .output();
    if let Some(out) = journal.ok().filter(|o| o.status.success()) {
        let text = String::from_utf8_lossy(&out.stdout);
        // The unit's own lines: systemd's about it ("Started …", "unit: Main process
        // exited …") say what Result and ExecMainStatus already say.
        let own = |l: &&str| {
            !l.is_empty()
                && !l.starts_with(&format!("{unit}: "))
                && ![
                    "Started ",
                    "Starting ",
                    "Stopped ",
                    "Stopping ",
                    "Failed to start ",
                ]
                .iter()
                .any(|p| l.starts_with(p))
        };
        let lines: Vec<&str> = text.lines().map(str::trim).filter(own).collect();
        if !lines.is_empty() {
            let mut tail = lines.join(" | ");
            if tail.len() > cfg.output_limit {
                let mut cut = tail.len() - cfg.output_limit;
                while !tail.is_char_boundary(cut) {
                    cut += 1;
                }
                tail = format!("…{}", &tail[cut..]);
            }
            why.push_str(&format!("; last output: {tail}"));
        }
    }
    why
}

fn check_unit(cfg: &HealthConfig, unit: &str, deadline: Instant) -> (bool, String) {
    let start = Instant::now();
    let poll = Duration::from_millis(cfg.poll_ms.max(10));
    let sustain = Duration::from_secs(cfg.sustain_secs);
    // (since, restarts, invocation) of the current active stretch.
    let mut stretch: Option<(Instant, String, String)> = None;
    let mut ever_active = false;
    let mut polls = 0u32;
    loop {
        polls += 1;
        let s = match unit_state(&cfg.systemctl, unit) {
            Ok(s) => s,
            Err(e) => return (false, e),
        };
        let now = Instant::now();
        // A unit that does not exist will never become active: say so now, not at the deadline.
        if s.load == "not-found" {
            return (false, "no such unit".into());
        }
        if s.active == "active" {
            match &stretch {
                Some((_, r, inv)) if *r != s.restarts || *inv != s.invocation => {
                    return (
                        false,
                        format!(
                            "restarted {:.0} s after start (restarts {} → {})",
                            now.duration_since(start).as_secs_f64(),
                            r,
                            s.restarts
                        ),
                    );
                }
                Some((since, _, _)) if now.duration_since(*since) >= sustain => {
                    return (true, format!("active for {} s", cfg.sustain_secs));
                }
                Some(_) => {}
                None => {
                    // The stretch began when the unit became active, not when this check
                    // first looked: a unit up since early boot has already served part
                    // (or all) of its sustain period, and the trial boot is not made
                    // longer than it must be. Restarts and new invocations still end it.
                    let ago = active_since(s.active_since_us);
                    let since = ago.and_then(|ago| now.checked_sub(ago)).unwrap_or(now);
                    tracing::info!(unit, active_since_us = s.active_since_us, "unit {unit}: active for {:.1} s when first seen ({} poll(s), ActiveEnterTimestampMonotonic={})", now.duration_since(since).as_secs_f64(), polls, s.active_since_us);
                    if now.duration_since(since) >= sustain {
                        return (true, format!("active for {} s", cfg.sustain_secs));
                    }
                    stretch = Some((since, s.restarts.clone(), s.invocation.clone()));
                }
            }
            ever_active = true;
        } else if ever_active {
            let when = format!(
                "{:.0} s into the check",
                now.duration_since(start).as_secs_f64()
            );
            return (false, unit_failure(cfg, unit, &s, &when));
        } else if s.active == "failed" {
            return (
                false,
                unit_failure(cfg, unit, &s, "before the check saw it active"),
            );
        }
        // Look again when the sustain period ends rather than at the next whole poll:
        // polling once a second made a healthy trial boot up to a second longer.
        let wait = match &stretch {
            Some((since, _, _)) => poll
                .min((*since + sustain).saturating_duration_since(now))
                .max(Duration::from_millis(10)),
            None => poll,
        };
        if now + wait > deadline {
            return (
                false,
                if ever_active {
                    "deadline passed before the sustain period ended".into()
                } else {
                    format!("not active by the deadline (state {} {})", s.active, s.sub)
                },
            );
        }
        std::thread::sleep(wait);
    }
}

fn check_script(cfg: &HealthConfig, path: &Path) -> (bool, String) {
    let mut child = match Command::new(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (false, format!("cannot run: {e}")),
    };
    let limit = cfg.output_limit;
    let read_bounded = move |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut r) = r {
                let mut buf = [0u8; 4096];
                // Keep the first `limit` bytes; drain the rest so the child never blocks.
                while let Ok(n) = r.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = limit.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
            String::from_utf8_lossy(&kept).into_owned()
        })
    };
    let out = read_bounded(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = read_bounded(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let limit_t = Duration::from_secs(cfg.script_timeout_secs);
    let t = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if t.elapsed() >= limit_t => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return (false, format!("waiting: {e}")),
        }
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let output = [out.trim(), err.trim()]
        .iter()
        .filter(|s| !s.is_empty())
        .copied()
        .collect::<Vec<_>>()
        .join(" | ");
    match status {
        Some(s) if s.success() => (true, output),
        Some(s) => (false, format!("exited with {s}: {output}")),
        None => (
            false,
            format!("timed out after {} s: {output}", cfg.script_timeout_secs),
        ),
    }
}

fn check_tcp(addr: &str, timeout: Duration) -> (bool, String) {
    let addrs = match addr.to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => return (false, format!("bad address: {e}")),
    };
    let mut last = String::from("no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(_) => return (true, "connected".into()),
            Err(e) => last = e.to_string(),
        }
    }
    (false, last)
}

fn check_http(url: &str, timeout: Duration) -> (bool, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    match agent.get(url).call() {
        Ok(r) if r.status().is_success() => (true, format!("HTTP {}", r.status().as_u16())),
        Ok(r) => (false, format!("HTTP {}", r.status().as_u16())),
        Err(e) => (false, e.to_string()),
    }
}

#[cfg(test)]
mod tests;
