//! The hardening findings (issue 13), each reproduced as an attacker would against
//! the real daemon: the real socket, peers with other credentials (`setpriv`), real
//! TLS, real HTTP listeners on 127.0.0.1, a real FIFO. Each test names its finding.

use std::io::BufRead as _;
use std::os::unix::fs::PermissionsExt as _;

use tonic::Code;
use update_agent::api::client;
use update_agent::api::pb;

use super::api::{api_node, ctl_as, reason, rt, tls_node, Daemon, Pki};
use super::*;

/// A drop-in in `agent.toml.d/`.
fn dropin(n: &Node, name: &str, text: &str) {
    let dir = PathBuf::from(format!("{}.d", n.config.display()));
    fs::create_dir_all(&dir).expect("drop-in dir");
    fs::write(dir.join(format!("{name}.toml")), text).expect("drop-in");
}

/// An HTTP listener on 127.0.0.1 that records what it is asked (path and
/// Authorization header) and answers: `/redirect/PORT/REST` with a 302 to
/// `http://127.0.0.1:PORT/REST`, `/hang/...` never, anything else 404.
struct Recorder {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// A request's path and its Authorization header.
type Seen = (String, Option<String>);

impl Recorder {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&seen);
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let seen = Arc::clone(&s2);
                std::thread::spawn(move || {
                    let mut r = std::io::BufReader::new(c);
                    let mut first = String::new();
                    let mut auth = None;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if first.is_empty() {
                            first = line.clone();
                        } else if let Some((k, v)) = line.split_once(':') {
                            if k.eq_ignore_ascii_case("authorization") {
                                auth = Some(v.trim().to_owned());
                            }
                        }
                    }
                    let path = first.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    seen.lock().expect("seen").push((path.clone(), auth));
                    let mut c = r.into_inner();
                    if path.starts_with("/hang/") {
                        std::thread::sleep(Duration::from_secs(600));
                        return;
                    }
                    let answer = match path.strip_prefix("/redirect/") {
                        Some(rest) => {
                            let (port, rest) = rest.split_once('/').unwrap_or((rest, ""));
                            format!(
                                "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}/{rest}\r\nContent-Length: 0\r\n\r\n"
                            )
                        }
                        None => "HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno".into(),
                    };
                    let _ = c.write_all(answer.as_bytes());
                });
            }
        });
        Self { port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

mod fetch;
mod listeners;

/// Finding 2: a check that hangs (a server that never answers) holds no lock the rest
/// of the daemon needs: GetStatus answers in under 100 ms while two hang; a FIFO is
/// refused at once as not a regular file; a check ends at its deadline.
#[test]
fn finding2_a_hung_check_never_freezes_the_daemon() {
    let n = api_node();
    let blackhole = Recorder::start();
    dropin(
        &n,
        "50-hang",
        &format!(
            "[releases]\nurl = \"{}\"\n[api.limits]\ncheck_timeout_secs = 3\n",
            blackhole.url("hang/rel")
        ),
    );
    let fifo = n.path("fifo.uap");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).expect("mkfifo");
    let d = Daemon::start(&n);
    let rt = rt();
    rt.block_on(async {
        // Two readers' checks on the release server that never answers: the second
        // one took the checker's lock on the runtime's thread before the fix.
        let mut hung = Vec::new();
        for _ in 0..2 {
            let mut c = client::unix(d.socket()).await.expect("connect");
            hung.push(tokio::spawn(async move {
                let t = Instant::now();
                let r = c
                    .check_for_update(pb::CheckForUpdateRequest {
                        source: Some(pb::check_for_update_request::Source::Version("2.0".into())),
                    })
                    .await;
                (r.map(drop), t.elapsed())
            }));
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut c = client::unix(d.socket()).await.expect("connect");
        let mut worst = Duration::ZERO;
        for _ in 0..20 {
            let t = Instant::now();
            c.get_status(pb::GetStatusRequest {}).await.expect("status");
            worst = worst.max(t.elapsed());
        }
        assert!(
            worst < Duration::from_millis(100),
            "GetStatus took {worst:?}"
        );
        for h in hung {
            let (r, took) = h.await.expect("task");
            let e = r.expect_err("never answered");
            assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
            assert!(
                e.message().contains("check_timeout_secs"),
                "{}",
                e.message()
            );
            assert!(took < Duration::from_secs(6), "deadline not kept: {took:?}");
        }
        // A FIFO (an open that would never return) is not a payload.
        let t = Instant::now();
        let e = c
            .check_for_update(pb::CheckForUpdateRequest {
                source: Some(pb::check_for_update_request::Source::Url(format!(
                    "file://{}",
                    fifo.display()
                ))),
            })
            .await
            .expect_err("fifo");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains("not a regular file"),
            "{}",
            e.message()
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    });
}

/// Finding 3: the admin check uses the groups the kernel recorded at connect(2), not
/// whatever the process (or a process that reused its pid) has later. A process
/// connects as a reader, then gains the admin group (it kept the means to: its saved
/// uid is 0); its connection stays a reader's.
#[test]
fn finding3_admin_rights_are_fixed_at_connect() {
    let n = api_node();
    let d = Daemon::start(&n);
    let script = r#"
import os, sys, grpc
# Everything imported while root (the interpreter's files are root's); the connection
# is made at the first call, after the switch to the reader.
ch = grpc.insecure_channel("unix://" + sys.argv[1], options=[("grpc.default_authority", "localhost")])
cancel = ch.unary_unary("/updateagent.v1.UpdateAgent/Cancel",
                        request_serializer=lambda m: m, response_deserializer=lambda b: b)
os.setgroups([4242]); os.setresgid(4242, 4242, 4242); os.setresuid(4242, 4242, 0)
def code():
    try:
        cancel(b"", timeout=10)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name
print("before", code(), flush=True)
os.seteuid(0); os.setgroups([4243]); os.seteuid(4242)
print("groups now", open("/proc/self/status").read().split("Groups:")[1].split("\n")[0].strip(), flush=True)
print("after", code(), flush=True)
"#;
    let py = std::env::var("UPDATE_AGENT_PYTHON").unwrap_or_else(|_| "python3".into());
    let o = Command::new(py)
        .args(["-c", script])
        .arg(d.socket())
        .output()
        .expect("python");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("groups now 4243"), "{out}");
    assert!(out.contains("before PERMISSION_DENIED"), "{out}");
    assert!(
        out.contains("after PERMISSION_DENIED"),
        "a connection made as a reader became an admin's: {out}"
    );
    // The same process connecting anew as an admin may change things.
    let o = ctl_as(d.socket(), 4243, &[4242, 4243], &["cancel"]);
    assert!(text(&o).contains("nothing to cancel"), "{}", text(&o));
}

/// Finding 7: a StartUpdate whose caller goes away while the payload is being checked
/// leaves no phantom: the operation runs to its end (here: its check's deadline), a
/// Cancel meanwhile answers without claiming a slot was touched, and the next
/// StartUpdate is not BUSY.
#[test]
fn finding7_a_caller_that_leaves_leaves_no_phantom_operation() {
    use pb::start_update_request::Source as S;
    let n = api_node();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 64 << 10);
    let blackhole = Recorder::start();
    dropin(&n, "50-deadline", "[api.limits]\ncheck_timeout_secs = 2\n");
    let d = Daemon::start(&n);
    let rt = rt();
    rt.block_on(async {
        let mut c = client::unix(d.socket()).await.expect("connect");
        let hang = blackhole.url("hang/2.0.uap");
        // The caller gives up after 300 ms, while the payload is being opened.
        let mut req = tonic::Request::new(pb::StartUpdateRequest {
            source: Some(S::Url(hang)),
            reboot: pb::RebootPolicy::Never as i32,
            allow_downgrade: false,
        });
        req.set_timeout(Duration::from_millis(300));
        let gone = tokio::time::timeout(Duration::from_millis(300), c.start_update(req)).await;
        assert!(gone.as_ref().map_or(true, |r| r.is_err()), "{gone:?}");
        let mut c = client::unix(d.socket()).await.expect("connect");
        let t = Instant::now();
        let r = c
            .cancel(pb::CancelRequest {})
            .await
            .expect("cancel")
            .into_inner();
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(r.slot, "", "nothing was written, so no slot to name: {r:?}");
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert!(s.operation.is_none(), "{:?}", s.operation);
        let op = c
            .start_update(pb::StartUpdateRequest {
                source: Some(S::Url(n.server.url(&delta))),
                reboot: pb::RebootPolicy::Never as i32,
                allow_downgrade: false,
            })
            .await
            .expect("not BUSY after the caller left")
            .into_inner();
        assert!(!op.already_running);
    });
}

/// Finding 10: WatchUpdate streams are capped per peer and in all, and a stream whose
/// client went away gives its place back.
#[test]
fn finding10_watch_streams_are_capped() {
    let n = api_node();
    dropin(
        &n,
        "50-watch",
        "[api.limits]\nmax_watchers = 6\nmax_watchers_per_peer = 4\n",
    );
    let d = Daemon::start(&n);
    let rt = rt();
    rt.block_on(async {
        let watch = |c: &mut client::Client| {
            let mut c = c.clone();
            async move {
                c.watch_update(pb::WatchUpdateRequest::default())
                    .await
                    .map(tonic::Response::into_inner)
            }
        };
        let mut c = client::unix(d.socket()).await.expect("connect");
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(watch(&mut c).await.expect("within the cap"));
        }
        let e = watch(&mut c).await.expect_err("over the per-peer cap");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert_eq!(reason(&e), "RESOURCE_EXHAUSTED");
        assert!(
            e.message().contains("max_watchers_per_peer"),
            "{}",
            e.message()
        );
        held.truncate(1);
        // The daemon notices the closed streams without any event to send.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match watch(&mut c).await {
                Ok(s) => {
                    held.push(s);
                    break;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "places never came back: {e:?}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}
