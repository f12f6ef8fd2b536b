//! Finding 1: fetches a reader cannot steer, credentials that stay at the release
//! server's origin, https never redirected to http.

use super::*;

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
