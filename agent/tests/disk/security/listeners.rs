//! Findings 4, 5, 6, 8, 9: the TCP and metrics listeners under a flood, the policy
//! for health and reflection, identities, the metrics textfile.

use super::*;

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
    // The hogs the daemon took (at most max_connections at a time) are closed at the
    // 2 s timeout: wait for the first four, with room for a slow machine.
    let mut closed = vec![false; hogs.len()];
    let deadline = Instant::now() + Duration::from_secs(15);
    while closed.iter().filter(|c| **c).count() < 4 {
        assert!(
            Instant::now() < deadline,
            "only {} of 12 hogs were cut off",
            closed.iter().filter(|c| **c).count()
        );
        for (s, c) in hogs.iter_mut().zip(&mut closed) {
            *c = *c || closed_by_peer(s);
        }
    }
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
