//! systemd's notify protocol: READY, the watchdog, STOPPING.

use super::*;

/// The daemon speaks systemd's notify protocol: READY once the socket serves, the
/// watchdog fed at half its interval, STOPPING on SIGTERM (what `Type=notify` and
/// `WatchdogSec=` in update-agent.service rely on), read from a real notify socket.
#[test]
fn daemon_notifies_systemd_and_feeds_the_watchdog() {
    let n = api_node();
    let notify = n.path("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    // systemd names the watched process in WATCHDOG_PID: `exec` keeps the shell's pid.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" --config \"$1\" serve")
        .arg(env!("CARGO_BIN_EXE_update-agent"))
        .arg(&n.config)
        .env("NOTIFY_SOCKET", &notify)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 4096];
    let mut recv = || {
        let len = sock.recv(&mut buf).expect("a notification within 20 s");
        String::from_utf8_lossy(&buf[..len]).into_owned()
    };
    let first = recv();
    assert!(first.contains("READY=1"), "{first:?}");
    assert!(first.contains("STATUS=serving on"), "{first:?}");
    // By READY the socket answers.
    assert!(std::os::unix::net::UnixStream::connect(n.path("run/agent.sock")).is_ok());
    let started = Instant::now();
    let mut fed = 0;
    while fed < 3 {
        if recv().contains("WATCHDOG=1") {
            fed += 1;
        }
    }
    // Three feeds at a 100 ms period: well inside the 200 ms watchdog, and not spinning.
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let mut stopping = false;
    for _ in 0..20 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    assert!(
        !n.path("run/agent.sock").exists(),
        "socket removed on a clean stop"
    );
}
