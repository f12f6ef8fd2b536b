//! TCP with mutual TLS: certificates from two openssl-made CAs.

use super::*;

/// A CA, and certificates it signs, made with the openssl command line.
pub(crate) struct Pki {
    dir: PathBuf,
}

impl Pki {
    pub(crate) fn new(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).expect("pki dir");
        Self { dir }
    }

    fn openssl(&self, args: &[&str]) {
        let o = Command::new("openssl")
            .current_dir(&self.dir)
            .args(args)
            .output()
            .expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
    }

    pub(crate) fn ca(&self, name: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
            "-subj",
            &format!("/CN={name}"),
            "-days",
            "2",
        ]);
    }

    /// A certificate for `cn` with `san` (e.g. "DNS:node1,IP:127.0.0.1"; "" for none),
    /// signed by `ca`.
    pub(crate) fn cert(&self, ca: &str, name: &str, cn: &str, san: &str, usage: &str) {
        self.openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ]);
        fs::write(
            self.dir.join(format!("{name}.ext")),
            if san.is_empty() {
                format!("extendedKeyUsage={usage}\n")
            } else {
                format!("subjectAltName={san}\nextendedKeyUsage={usage}\n")
            },
        )
        .expect("ext");
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }

    pub(crate) fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

/// The certificates of [`tls_node`]: (CA, file name, CN, SANs, extended key usage).
const IDENTITIES: [(&str, &str, &str, &str, &str); 4] = [
    (
        "fleet-ca",
        "server",
        "node1",
        "DNS:node1,IP:127.0.0.1",
        "serverAuth",
    ),
    (
        "fleet-ca",
        "controller",
        "fleet-controller",
        "URI:spiffe://fleet/controller",
        "clientAuth",
    ),
    (
        "fleet-ca",
        "intruder",
        "intruder",
        "DNS:intruder",
        "clientAuth",
    ),
    (
        "rogue-ca",
        "rogue",
        "fleet-controller",
        "URI:spiffe://fleet/controller",
        "clientAuth",
    ),
];

/// A node with the TCP listener on: a fleet CA and a rogue one, the server's
/// certificate, clients `controller` (URI SAN spiffe://fleet/controller), `intruder`
/// (DNS SAN intruder) and `rogue` (the controller's names, the rogue CA); `allowed`
/// is `tls_allowed_clients`. Returns the PKI and the address to connect to.
pub(crate) fn tls_node(n: &Node, allowed: &[&str]) -> (Pki, String) {
    let pki = Pki::new(n.path("pki"));
    pki.ca("fleet-ca");
    pki.ca("rogue-ca");
    for (ca, name, cn, san, usage) in IDENTITIES {
        pki.cert(ca, name, cn, san, usage);
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let cfg = fs::read_to_string(&n.config).expect("config");
    let list = allowed
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let tls = format!(
        "tcp_listen = \"127.0.0.1:{port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n\
         tls_allowed_clients = [{list}]\n[releases]\n",
        pki.path("server.crt").display(),
        pki.path("server.key").display(),
        pki.path("fleet-ca.crt").display(),
    );
    fs::write(&n.config, cfg.replacen("[releases]\n", &tls, 1)).expect("config");
    (pki, format!("https://127.0.0.1:{port}"))
}

#[test]
fn api_tcp_mutual_tls() {
    let n = api_node();
    let (pki, address) = tls_node(&n, &["spiffe://fleet/controller"]);
    let _d = Daemon::start(&n);

    let files = |name: &str, ca: &str| client::TlsFiles {
        ca: pki.path(&format!("{ca}.crt")),
        cert: pki.path(&format!("{name}.crt")),
        key: pki.path(&format!("{name}.key")),
        server_name: None,
    };
    let rt = rt();
    rt.block_on(async {
        // On the list: reads and changes (cancel gets past access, to "nothing to cancel").
        let mut c = client::tls(
            &address,
            &files("controller", "fleet-ca"),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let s = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect("status over TLS")
            .into_inner();
        assert_eq!(s.state, "idle");
        let e = c
            .cancel(pb::CancelRequest {})
            .await
            .expect_err("nothing to cancel");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

        // A good certificate whose identity is not on the list: refused every call.
        let mut c = client::tls(
            &address,
            &files("intruder", "fleet-ca"),
            Duration::from_secs(10),
        )
        .await
        .expect("connect");
        let e = c
            .get_status(pb::GetStatusRequest {})
            .await
            .expect_err("intruder");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("intruder"), "{}", e.message());

        // Same identity, signed by an unknown CA; and no certificate at all.
        let rogue = match client::tls(
            &address,
            &files("rogue", "fleet-ca"),
            Duration::from_secs(10),
        )
        .await
        {
            Ok(mut c) => c
                .get_status(pb::GetStatusRequest {})
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert!(rogue.is_err(), "a certificate from an unknown CA got in");

        // A listener that completes TCP's handshake (the kernel's backlog) and never
        // speaks TLS, as QEMU's user network does for a guest not up yet: the client
        // gives up when asked to, and says so.
        let silent = TcpListener::bind("127.0.0.1:0").expect("silent listener");
        let silent_at = format!("https://{}", silent.local_addr().expect("addr"));
        match client::tls(
            &silent_at,
            &files("controller", "fleet-ca"),
            Duration::from_millis(300),
        )
        .await
        {
            Err(e @ client::ConnectError::Timeout { .. }) => {
                assert!(e.to_string().contains(&silent_at), "{e}")
            }
            other => panic!("{:?}", other.map(drop)),
        }
        drop(silent);
        let plain = async {
            let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
                tonic::transport::Certificate::from_pem(
                    fs::read(pki.path("fleet-ca.crt")).expect("ca"),
                ),
            );
            let ch = tonic::transport::Endpoint::from_shared(address.clone())
                .expect("uri")
                .tls_config(tls)
                .expect("tls")
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            pb::update_agent_client::UpdateAgentClient::new(ch)
                .get_status(pb::GetStatusRequest {})
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        assert!(
            plain.await.is_err(),
            "a client without a certificate got in"
        );
    });
    // updatectl over TCP, as a fleet operator would run it.
    let o = Command::new(env!("CARGO_BIN_EXE_updatectl"))
        .args(["--address", &address])
        .arg("--tls-ca")
        .arg(pki.path("fleet-ca.crt"))
        .arg("--tls-cert")
        .arg(pki.path("controller.crt"))
        .arg("--tls-key")
        .arg(pki.path("controller.key"))
        .args(["status", "--json"])
        .output()
        .expect("updatectl");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["running_version"], "1.0");
}
