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

/// Finding 1: a reader cannot make the root daemon fetch a URL or open a path of its
/// choosing, and the release server's credentials go to its origin only, never to
/// another host, not even through a redirect from the release server.
#[test]
fn finding1_readers_cannot_steer_fetches_and_credentials_stay_home() {
    let n = api_node();
    let home = Recorder::start();
    let elsewhere = Recorder::start();
    dropin(
        &n,
        "50-creds",
        &format!(
            "[releases]\nurl = \"{}\"\n[fetch]\nbearer_token = \"s3cret\"\n",
            home.url("rel")
        ),
    );
    let d = Daemon::start(&n);
    let sock = d.socket().to_owned();

    // A reader: versions and channels only.
    let o = ctl_as(
        &sock,
        4242,
        &[4242],
        &["check", "--url", &elsewhere.url("x.uap")],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("readers may check a version or a channel"),
        "{}",
        text(&o)
    );
    let o = ctl_as(
        &sock,
        4242,
        &[4242],
        &["check", "--url", "file:///root/.bashrc"],
    );
    assert_eq!(
        o.status.code(),
        Some(5),
        "a reader probing files: {}",
        text(&o)
    );
    assert!(elsewhere.seen().is_empty(), "{:?}", elsewhere.seen());
    let o = ctl_as(&sock, 4242, &[4242], &["check", "--version", "9.9"]);
    assert!(text(&o).contains("not published"), "{}", text(&o));
    let at_home = home.seen();
    assert!(
        at_home
            .iter()
            .any(|(p, a)| p == "/rel/9.9.full.uap" && a.as_deref() == Some("Bearer s3cret")),
        "the release server gets the credentials: {at_home:?}"
    );

    // An admin may name any URL, but another origin never gets the credentials,
    // directly or by a redirect from the release server.
    let o = ctl_as(
        &sock,
        4243,
        &[4242, 4243],
        &["check", "--url", &elsewhere.url("x.uap")],
    );
    assert!(text(&o).contains("404"), "{}", text(&o));
    let hop = home.url(&format!("redirect/{}/y.uap", elsewhere.port));
    let o = ctl_as(&sock, 4243, &[4242, 4243], &["check", "--url", &hop]);
    assert!(text(&o).contains("404"), "{}", text(&o));
    let there = elsewhere.seen();
    assert_eq!(there.len(), 2, "{there:?}");
    assert!(
        there.iter().all(|(_, a)| a.is_none()),
        "credentials leaked to another origin: {there:?}"
    );
    assert!(
        home.seen()
            .iter()
            .any(|(p, a)| p.starts_with("/redirect/") && a.is_some()),
        "{:?}",
        home.seen()
    );
}

/// An https server (Python's, with a certificate from `pki`'s fleet CA) that answers
/// every GET with a redirect to `to`; killed when dropped.
struct HttpsRedirector {
    child: std::process::Child,
    port: u16,
}

impl HttpsRedirector {
    fn start(pki: &Pki, to: &str) -> Self {
        let script = r#"
import http.server, ssl, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", sys.argv[3])
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .arg(pki.path("server.crt"))
            .arg(pki.path("server.key"))
            .arg(to)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python https server");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port");
        let port = line.trim().parse().expect("port number");
        Self { child, port }
    }
}

impl Drop for HttpsRedirector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finding 1, the transport: a release server on https that redirects to plain http
/// is not followed (and the http host never hears from the node). The node trusts the
/// release server's private CA through `fetch.ca_file`.
#[test]
fn finding1_https_is_never_redirected_to_http() {
    let n = api_node();
    let pki = Pki::new(n.path("pki"));
    pki.ca("fleet-ca");
    pki.cert("fleet-ca", "server", "node1", "IP:127.0.0.1", "serverAuth");
    let plain = Recorder::start();
    let https = HttpsRedirector::start(&pki, &plain.url("downgraded.uap"));
    dropin(
        &n,
        "50-https",
        &format!(
            "[releases]\nurl = \"https://127.0.0.1:{}/rel\"\n[fetch]\nca_file = \"{}\"\nbearer_token = \"s3cret\"\n",
            https.port,
            pki.path("fleet-ca.crt").display()
        ),
    );
    let d = Daemon::start(&n);
    let o = ctl_as(d.socket(), 4242, &[4242], &["check", "--version", "2.0"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("https only"), "{}", text(&o));
    assert!(
        plain.seen().is_empty(),
        "followed https -> http: {:?}",
        plain.seen()
    );
}

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

/// Findings 4 and 8 and 9: a flood of silent TCP connections (no TLS handshake) never
/// stops the Unix socket or the descriptors, and frees its places at the handshake
/// timeout; health and reflection answer only allowed clients; a certificate's CN
/// does not count when it has SANs.
#[test]
fn finding4_8_9_tls_listener_flood_policy_and_identities() {
    let n = api_node();
    let (pki, address) = tls_node(&n, &["fleet-controller", "spiffe://fleet/controller"]);
    // CN on the list, SANs not: no identity. CN on the list and no SAN at all: in.
    pki.cert(
        "fleet-ca",
        "cn-with-san",
        "fleet-controller",
        "DNS:intruder",
        "clientAuth",
    );
    pki.cert("fleet-ca", "cn-only", "fleet-controller", "", "clientAuth");
    dropin(
        &n,
        "50-limits",
        "[api.limits]\nmax_connections = 32\nhandshake_timeout_secs = 1\n",
    );
    // Few descriptors, as a unit's LimitNOFILE would give: before the fix 150 silent
    // connections took them all.
    let d = Daemon::start_limited(&n, 128);
    let port: u16 = address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let silent: Vec<TcpStream> = (0..150)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    assert!(silent.len() >= 100, "only {} connected", silent.len());
    let files = |name: &str| client::TlsFiles {
        ca: pki.path("fleet-ca.crt"),
        cert: pki.path(&format!("{name}.crt")),
        key: pki.path(&format!("{name}.key")),
        server_name: None,
    };
    let rt = rt();
    rt.block_on(async {
        let mut c = client::unix(d.socket()).await.expect("unix connect");
        let t = Instant::now();
        c.get_status(pb::GetStatusRequest {})
            .await
            .expect("the Unix socket answers during the flood");
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // The silent ones are dropped at the handshake timeout; an allowed client gets
        // in while the rest of the flood still waits in the backlog.
        let mut c = client::tls(&address, &files("controller"), Duration::from_secs(30))
            .await
            .expect("TLS connect during the flood");
        c.get_status(pb::GetStatusRequest {})
            .await
            .expect("TLS status during the flood");

        for (who, allowed) in [
            ("controller", true),
            ("cn-only", true),
            ("cn-with-san", false),
        ] {
            let ch = client::tls_channel(&address, &files(who), Duration::from_secs(30))
                .await
                .expect("channel");
            let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "updateagent.v1.UpdateAgent".into(),
                })
                .await;
            let status = pb::update_agent_client::UpdateAgentClient::new(ch)
                .get_status(pb::GetStatusRequest {})
                .await;
            if allowed {
                health.unwrap_or_else(|e| panic!("{who}: health {e:?}"));
                status.unwrap_or_else(|e| panic!("{who}: status {e:?}"));
            } else {
                let e = health.expect_err("health answered a client not on the list");
                assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
                let e = status.expect_err("status");
                assert_eq!(e.code(), Code::PermissionDenied, "{who}: {e:?}");
                assert!(e.message().contains("intruder"), "{}", e.message());
            }
        }
    });
    drop(silent);
}

/// Finding 5: clients of the metrics endpoint that send requests and never read, or
/// never finish a request, are cut off at `metrics.timeout_secs` and are capped; a
/// scrape still works. Finding 6 on the same daemon: a symlink planted at the
/// textfile's temporary name is not written through.
#[test]
fn finding5_6_metrics_endpoint_and_textfile() {
    let n = api_node();
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let textdir = n.path("textfile");
    fs::create_dir_all(&textdir).expect("textfile dir");
    fs::set_permissions(&textdir, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let victim = n.path("victim");
    fs::write(&victim, "precious").expect("victim");
    std::os::unix::fs::symlink(&victim, textdir.join(".update_agent.prom.tmp")).expect("plant");
    dropin(
        &n,
        "50-metrics",
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\ntextfile = \"{}\"\nmax_connections = 4\ntimeout_secs = 2\n",
            textdir.join("update_agent.prom").display()
        ),
    );
    let _d = Daemon::start(&n);
    // The socket answers before the first textfile write: wait for it, so the check
    // on the victim comes after the write it guards against.
    let textfile = textdir.join("update_agent.prom");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !textfile.exists() {
        assert!(Instant::now() < deadline, "no textfile written");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fs::read_to_string(&victim).expect("victim"), "precious");
    let prom = fs::read_to_string(&textfile).expect("textfile");
    assert!(prom.contains("update_agent_"), "{prom}");

    // Pipelining clients that never read, and clients that never finish a request.
    let mut hogs = Vec::new();
    for i in 0..12 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        if i % 2 == 0 {
            let req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
            let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
            let _ = s.write_all(req.as_bytes());
        } else {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n");
        }
        hogs.push(s);
    }
    std::thread::sleep(Duration::from_millis(3500));
    // The hogs the daemon took (at most max_connections at a time) have been closed.
    let closed = hogs.iter_mut().map(closed_by_peer).filter(|c| *c).count();
    assert!(closed >= 4, "only {closed} of 12 hogs were cut off");
    let scrape = || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("send");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    drop(hogs);
    let out = scrape();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("update_agent_"), "{out}");
    // One request a connection: the daemon closes it after the answer.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out)
        .expect("closed by the daemon, not timed out");
    assert_eq!(out.matches("HTTP/1.1 200").count(), 1, "{out}");
}

/// Whether the other end has closed `s` (after draining what it sent).
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let until = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 64 << 10];
    while Instant::now() < until {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
    false
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
