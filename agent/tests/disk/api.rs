//! The gRPC API end to end: the real `update-agent serve` on a loop-device node, the
//! real Unix socket, our client and `updatectl`, peers with other credentials, and
//! a Python grpcio client generated from the .proto (not our code).

use std::os::unix::fs::PermissionsExt as _;
use std::process::{Child, Stdio};

use tokio_stream::StreamExt as _;
use tonic::Code;
use tonic_types::StatusExt as _;
use update_agent::api::client;
use update_agent::api::pb;

use super::*;

/// A running daemon; killed when dropped.
pub(super) struct Daemon {
    child: Option<Child>,
    socket: PathBuf,
}

impl Daemon {
    pub(super) fn start(n: &Node) -> Self {
        Self::start_with(n, &[])
    }

    pub(super) fn start_with(n: &Node, env: &[(&str, &str)]) -> Self {
        Self::spawn(n, env, Command::new(env!("CARGO_BIN_EXE_update-agent")))
    }

    /// Started with at most `nofile` descriptors (as a unit's `LimitNOFILE=` gives).
    pub(super) fn start_limited(n: &Node, nofile: u32) -> Self {
        let mut c = Command::new("prlimit");
        c.arg(format!("--nofile={nofile}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_update-agent"));
        Self::spawn(n, &[], c)
    }

    pub(super) fn socket(&self) -> &Path {
        &self.socket
    }

    fn spawn(n: &Node, env: &[(&str, &str)], mut cmd: Command) -> Self {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.path("daemon.log"))
            .expect("daemon log");
        let child = cmd
            .arg("--config")
            .arg(&n.config)
            .arg("serve")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn update-agent serve");
        let d = Self {
            child: Some(child),
            socket: n.path("run/agent.sock"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&d.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "daemon did not start: {}",
                fs::read_to_string(n.path("daemon.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Context switches of all the daemon's threads so far (its wake-ups).
    pub(super) fn switches(&self) -> u64 {
        let pid = self.child.as_ref().map(Child::id).unwrap_or_default();
        fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.flatten()
                    .filter_map(|t| fs::read_to_string(t.path().join("status")).ok())
                    .flat_map(|st| {
                        st.lines()
                            .filter(|l| l.contains("ctxt_switches"))
                            .filter_map(|l| l.split_whitespace().last()?.parse::<u64>().ok())
                            .collect::<Vec<_>>()
                    })
                    .sum()
            })
            .unwrap_or_default()
    }

    fn signal(&mut self, sig: nix::sys::signal::Signal) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
    }
}

/// API settings for a node: socket under DIR/run (reachable by other users), group
/// 4242 may read, group 4243 may change things, reboots only leave a mark.
pub(super) fn api_node() -> Node {
    let n = Node::new();
    fs::set_permissions(n.dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let cfg = fs::read_to_string(&n.config).expect("config");
    let api = format!(
        "[api]\nsocket = \"{}\"\nsocket_group = \"4242\"\nadmin_groups = [\"4243\"]\n\
         [releases]\nurl = \"{}\"\n",
        n.path("run/agent.sock").display(),
        n.server.url("").trim_end_matches('/'),
    );
    let cfg = cfg.replace("[health]\n", &format!("{api}[health]\n"));
    fs::write(&n.config, cfg).expect("config");
    n.health_config(&format!(
        "reboot_command = [\"touch\", \"{}\"]",
        n.path("rebooted").display()
    ));
    n
}

/// `updatectl bundle publish --channel stable --version VERSION` over the node's
/// payload directory, signed with the node's publisher key, plus `extra` arguments.
pub(super) fn publish_channel(n: &Node, version: &str, extra: &[&str]) -> Output {
    let pem = {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        ed25519_dalek::SigningKey::from_bytes(&[3u8; 32])
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("pem")
    };
    fs::write(n.path("publisher.key"), pem.as_bytes()).expect("key");
    Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args([
            "bundle",
            "publish",
            "--channel",
            "stable",
            "--version",
            version,
        ])
        .args(extra)
        .arg("--dir")
        .arg(&n.payloads)
        .arg("--key")
        .arg(n.path("publisher.key"))
        .output()
        .expect("publish")
}

pub(super) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

pub(super) fn reason(s: &tonic::Status) -> String {
    s.get_error_details()
        .error_info()
        .map(|i| i.reason.clone())
        .unwrap_or_default()
}

fn start_req(source: pb::start_update_request::Source) -> pb::StartUpdateRequest {
    pb::StartUpdateRequest {
        source: Some(source),
        reboot: pb::RebootPolicy::Never as i32,
        allow_downgrade: false,
    }
}

/// Every event of an operation, to its result.
async fn collect(c: &mut client::Client, id: &str) -> Vec<pb::update_event::Kind> {
    let mut s = c
        .watch_update(pb::WatchUpdateRequest {
            operation_id: id.into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut out = Vec::new();
    while let Some(ev) = s.next().await {
        let kind = ev.expect("event").kind.expect("kind");
        let end = matches!(kind, pb::update_event::Kind::Result(_));
        out.push(kind);
        if end {
            break;
        }
    }
    out
}

fn result_of(events: &[pb::update_event::Kind]) -> pb::Result {
    match events.last() {
        Some(pb::update_event::Kind::Result(r)) => r.clone(),
        other => panic!("no result at the end: {other:?}"),
    }
}

/// Polls status until `ok` holds (at most a minute); `what` names the wait.
pub(super) async fn status_until(
    c: &mut client::Client,
    what: &str,
    ok: impl Fn(&pb::Status) -> bool,
) -> pb::Status {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "never {what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_phase(c: &mut client::Client, phase: pb::Phase) {
    status_until(c, &format!("{phase:?}"), |s| {
        s.operation
            .as_ref()
            .is_some_and(|o| o.phase == phase as i32)
    })
    .await;
}

/// Runs `updatectl` as another user: uid, primary gid, supplementary groups.
pub(super) fn ctl_as(socket: &Path, uid: u32, groups: &[u32], args: &[&str]) -> Output {
    let list = groups
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"));
    if groups.is_empty() {
        c.arg("--clear-groups");
    } else {
        c.arg(format!("--groups={list}"));
    }
    c.arg(env!("CARGO_BIN_EXE_updatectl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("setpriv updatectl")
}

mod access;
mod notify;
mod tls;
mod update;

pub(super) use tls::{tls_node, Pki};
