//! What the listeners hand to tonic: connections that carry who is at the other end,
//! fixed when the connection was made, and that count against a cap.
//!
//! Unix socket: the peer's uid, gid and pid (`SO_PEERCRED`) and its supplementary
//! groups (`SO_PEERGROUPS`) are read once, at accept, from the kernel's record of the
//! process that called connect(2); nothing is looked up later by pid, so a pid reused
//! by another process cannot lend its groups to the connection. Connections are capped
//! per uid and in all; root's are never refused, so an admin can always get in.
//!
//! TCP: a permit is taken before each accept, so past the cap new connections wait in
//! the kernel's backlog, costing the daemon no descriptor; the permit lives as long as
//! the connection, TLS handshake (which has its own timeout) included.

use std::io;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::limits::{Place, Places};

/// Who is at the other end of a Unix connection, as the kernel recorded it at
/// connect(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
    /// Supplementary groups of the connecting process.
    pub groups: Vec<u32>,
}

/// A connection and what it holds while open (its place under the cap).
#[derive(Debug)]
pub struct Conn<S, I> {
    io: S,
    info: I,
    _hold: Hold,
}

#[derive(Debug)]
enum Hold {
    Permit { _permit: OwnedSemaphorePermit },
    Uid { _place: Place<u32> },
    None,
}

impl<S: AsyncRead + Unpin, I: Unpin> AsyncRead for Conn<S, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, I: Unpin> AsyncWrite for Conn<S, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<S, I: Clone + Send + Sync + 'static> Connected for Conn<S, I> {
    type ConnectInfo = I;
    fn connect_info(&self) -> I {
        self.info.clone()
    }
}

/// Caps of the Unix listener.
#[derive(Debug, Clone, Copy)]
pub struct UnixCaps {
    pub total: usize,
    pub per_uid: usize,
}

/// A place for a connection of `uid`; root's are never refused (nor counted), so an
/// admin can always get in.
fn admit(places: &Places<u32>, uid: u32) -> Option<Hold> {
    if uid == 0 {
        return Some(Hold::None);
    }
    places.admit(&uid).ok().map(|p| Hold::Uid { _place: p })
}

/// Accepts on the Unix socket, reads each peer's credentials, applies the caps.
pub fn unix_incoming(
    listener: UnixListener,
    caps: UnixCaps,
) -> ReceiverStream<io::Result<Conn<UnixStream, LocalPeer>>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let places = Places::new(caps.total, caps.per_uid);
        let mut pause = AcceptPause::default();
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    pause.after(&e, "API socket").await;
                    continue;
                }
            };
            pause.reset();
            let info = match peer(&stream) {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "API socket: cannot read the peer's credentials; connection closed");
                    continue;
                }
            };
            let Some(hold) = admit(&places, info.uid) else {
                tracing::warn!(uid = info.uid, pid = ?info.pid, "API socket: too many connections (api.limits.max_connections[_per_uid]); connection closed");
                continue;
            };
            let conn = Conn {
                io: stream,
                info,
                _hold: hold,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Accepts on a TCP listener, at most `cap` connections open at once.
pub fn tcp_incoming(
    listener: TcpListener,
    cap: usize,
    what: &'static str,
) -> ReceiverStream<io::Result<Conn<TcpStream, TcpConnectInfo>>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(cap));
        let mut pause = AcceptPause::default();
        loop {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else {
                return;
            };
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    pause.after(&e, what).await;
                    continue;
                }
            };
            pause.reset();
            let info = stream.connect_info();
            let conn = Conn {
                io: stream,
                info,
                _hold: Hold::Permit { _permit: permit },
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Backoff after a failed accept (out of descriptors and the like): wait, don't spin.
#[derive(Debug)]
pub struct AcceptPause(Duration);

impl Default for AcceptPause {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl AcceptPause {
    pub async fn after(&mut self, e: &io::Error, what: &str) {
        tracing::warn!(error = %e, "{what}: accept failed");
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
    }
    pub fn reset(&mut self) {
        self.0 = Duration::from_millis(100);
    }
}

/// The kernel's record of the peer: `SO_PEERCRED` and `SO_PEERGROUPS`.
fn peer(stream: &UnixStream) -> io::Result<LocalPeer> {
    let cred = stream.peer_cred()?;
    Ok(LocalPeer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
        groups: peer_groups(stream.as_raw_fd())?,
    })
}

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups of the process that called
/// connect(2), as the kernel captured them then. The value is 59 on every
/// architecture this agent builds for (x86_64, aarch64); the libc crate does not
/// export it for them.
const SO_PEERGROUPS: nix::libc::c_int = 59;

#[allow(unsafe_code)]
fn peer_groups(fd: std::os::fd::RawFd) -> io::Result<Vec<u32>> {
    let mut groups: Vec<nix::libc::gid_t> = vec![0; 64];
    loop {
        let mut len = nix::libc::socklen_t::try_from(std::mem::size_of_val(groups.as_slice()))
            .map_err(io::Error::other)?;
        // SAFETY: `fd` is an open socket borrowed for this call; the buffer is
        // `groups`, valid and writable for `len` bytes, and the kernel writes at most
        // `len` bytes and stores the length it needs or wrote in `len`.
        let r = unsafe {
            nix::libc::getsockopt(
                fd,
                nix::libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<nix::libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        // ERANGE: the buffer was too small and `len` says how much is needed.
        if e.raw_os_error() == Some(nix::libc::ERANGE) && n > groups.len() {
            groups.resize(n, 0);
            continue;
        }
        return Err(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_uid_and_in_all_but_never_root() {
        let places = Places::new(3, 2);
        let a1 = admit(&places, 1000).expect("first");
        let _a2 = admit(&places, 1000).expect("second");
        assert!(admit(&places, 1000).is_none(), "per uid");
        let _b1 = admit(&places, 1001).expect("other uid");
        assert!(admit(&places, 1002).is_none(), "in all");
        for _ in 0..10 {
            assert!(admit(&places, 0).is_some(), "root is never refused");
        }
        drop(a1);
        assert!(
            admit(&places, 1000).is_some(),
            "a closed one frees its place"
        );
    }

    #[tokio::test]
    async fn peer_groups_are_the_connecting_process_groups() {
        let (a, _b) = UnixStream::pair().expect("pair");
        let p = peer(&a).expect("peer");
        assert_eq!(p.uid, nix::unistd::getuid().as_raw());
        let mut mine: Vec<u32> = nix::unistd::getgroups()
            .expect("getgroups")
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut got = p.groups;
        mine.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, mine);
    }
}
