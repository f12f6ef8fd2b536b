//! One property write to systemd's manager, spoken over PID 1's private socket.
//!
//! The kexec path must tell systemd how long the hardware watchdog may run across the
//! kexec (`KExecWatchdogUSec`), and it must do so while the node's downtime is already
//! counting. The first way, a drop-in under /run plus `systemctl daemon-reload`, cost
//! 4-5 s of that downtime in the VM lab (the reload re-reads every unit). The manager's
//! property is writable at run time (systemd 243 and later, Debian 12's 252 included),
//! and setting it costs one message. It is set here rather than with `busctl`:
//! minimal images run no D-Bus daemon, and `busctl --address=` always greets a bus
//! daemon (`Hello`), which PID 1's private socket does not answer. The private socket
//! is a direct D-Bus connection to PID 1 (what `systemctl` uses as root): SASL
//! EXTERNAL, then one method call, `org.freedesktop.DBus.Properties.Set`, and its
//! reply. Only the little of the wire format that this needs is here.
//!
//! Not zbus (tried with 6.2.1, the latest, in issue 16): PID 1 marks everything it
//! sends on this socket with the sender `org.freedesktop.systemd1`, and zbus's parser
//! takes that field for a unique name and rejects the reply ("Invalid unique name";
//! z-galaxy/zbus#1497, open). When that is fixed, this file can become one
//! `Properties.Set` over a zbus peer-to-peer connection.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// PID 1's private D-Bus socket (root only).
pub const PRIVATE_SOCKET: &str = "/run/systemd/private";

const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_INTERFACE: &str = "org.freedesktop.systemd1.Manager";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
const DESTINATION: &str = "org.freedesktop.systemd1";

/// How long PID 1 may take to answer: it is busy but not wedged on a node that is
/// about to reboot; a wedged one makes this a refusal (and a firmware reboot).
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Larger messages are not an answer to a property write.
const MAX_PART: u32 = 1 << 20;
/// Messages that are not our reply (signals) are skipped, up to this many.
const MAX_SKIPPED: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("connecting to systemd's private socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("talking to systemd over its private socket")]
    Io(#[source] io::Error),
    #[error("systemd refused the authentication: {0:?}")]
    Auth(String),
    #[error("systemd refused to set {property}: {name}: {message}")]
    Refused {
        property: String,
        name: String,
        message: String,
    },
    #[error("systemd's answer is not the D-Bus message expected: {0}")]
    Protocol(&'static str),
}

impl From<io::Error> for BusError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

/// Sets the manager's `property` (D-Bus type `t`) to `value`; returns once systemd has
/// answered that it is set.
pub fn set_manager_u64(
    socket: &Path,
    property: &str,
    value: u64,
    timeout: Duration,
) -> Result<(), BusError> {
    let stream = UnixStream::connect(socket).map_err(|source| BusError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);

    // SASL: a NUL byte, EXTERNAL with our uid (hex of its decimal digits), OK, BEGIN.
    let uid = nix::unistd::geteuid().as_raw().to_string();
    writer.write_all(format!("\0AUTH EXTERNAL {}\r\n", hex::encode(uid)).as_bytes())?;
    let line = read_line(&mut reader)?;
    if !line.starts_with("OK ") {
        return Err(BusError::Auth(line));
    }
    let serial = 1;
    let mut out = b"BEGIN\r\n".to_vec();
    out.extend(set_property_call(serial, property, value));
    writer.write_all(&out)?;

    for _ in 0..MAX_SKIPPED {
        let msg = Message::read(&mut reader)?;
        if msg.reply_serial != Some(serial) {
            continue;
        }
        return match msg.kind {
            METHOD_RETURN => Ok(()),
            ERROR => Err(BusError::Refused {
                property: property.to_owned(),
                message: msg.first_string().unwrap_or_default(),
                name: msg.error_name.unwrap_or_default(),
            }),
            _ => Err(BusError::Protocol(
                "a reply that is neither a return nor an error",
            )),
        };
    }
    Err(BusError::Protocol(
        "no reply among the messages systemd sent",
    ))
}

/// A SASL line, without its CR LF.
fn read_line(r: &mut impl BufRead) -> Result<String, BusError> {
    let mut line = Vec::new();
    r.take(4096).read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(BusError::Protocol(
            "the authentication line does not end in CR LF",
        ));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line).map_err(|_| BusError::Protocol("the authentication line is not text"))
}

// Message types and header field codes (D-Bus specification, "Message Format").
pub(super) const METHOD_CALL: u8 = 1;
pub(super) const METHOD_RETURN: u8 = 2;
pub(super) const ERROR: u8 = 3;
const F_PATH: u8 = 1;
const F_INTERFACE: u8 = 2;
const F_MEMBER: u8 = 3;
const F_ERROR_NAME: u8 = 4;
const F_REPLY_SERIAL: u8 = 5;
const F_DESTINATION: u8 = 6;
const F_SIGNATURE: u8 = 8;

/// Little-endian marshalling; offsets count from the start of the buffer, which is
/// where alignment is measured (the header and the body each start 8-aligned).
#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn pad(&mut self, align: usize) {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.pad(4);
        self.0.extend(v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.pad(8);
        self.0.extend(v.to_le_bytes());
    }
    /// `s` and `o`: length, bytes, NUL.
    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.0.extend(s.as_bytes());
        self.0.push(0);
    }
    /// `g`: one-byte length, bytes, NUL.
    fn signature(&mut self, s: &str) {
        self.u8(s.len() as u8);
        self.0.extend(s.as_bytes());
        self.0.push(0);
    }
    /// A header field (a `(yv)` struct) holding a string-like value.
    fn field(&mut self, code: u8, sig: &str, value: &str) {
        self.pad(8);
        self.u8(code);
        self.signature(sig);
        if sig == "g" {
            self.signature(value);
        } else {
            self.string(value);
        }
    }
}

/// `Properties.Set(MANAGER_INTERFACE, property, <t value>)` as bytes.
fn set_property_call(serial: u32, property: &str, value: u64) -> Vec<u8> {
    let mut body = Out::default();
    body.string(MANAGER_INTERFACE);
    body.string(property);
    body.signature("t");
    body.u64(value);

    let mut fields = Out::default();
    fields.field(F_PATH, "o", MANAGER_PATH);
    fields.field(F_INTERFACE, "s", PROPERTIES);
    fields.field(F_MEMBER, "s", "Set");
    fields.field(F_DESTINATION, "s", DESTINATION);
    fields.field(F_SIGNATURE, "g", "ssv");

    let mut m = Out::default();
    m.u8(b'l');
    m.u8(METHOD_CALL);
    m.u8(0);
    m.u8(1);
    m.u32(body.0.len() as u32);
    m.u32(serial);
    // The fields start at offset 16, 8-aligned, so their own offsets hold.
    m.u32(fields.0.len() as u32);
    m.0.extend(fields.0);
    m.pad(8);
    m.0.extend(body.0);
    m.0
}

/// What the path reads of a message.
#[derive(Debug, Default)]
pub(super) struct Message {
    pub kind: u8,
    pub reply_serial: Option<u32>,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub error_name: Option<String>,
    pub signature: Option<String>,
    pub little_endian: bool,
    pub body: Vec<u8>,
}

/// Unmarshalling from one buffer, alignment measured from its start.
pub(super) struct In<'a> {
    buf: &'a [u8],
    pos: usize,
    le: bool,
}

impl<'a> In<'a> {
    pub(super) fn new(buf: &'a [u8], le: bool) -> Self {
        Self { buf, pos: 0, le }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], BusError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or(BusError::Protocol(
            "a value runs past the end of its message",
        ))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn align(&mut self, a: usize) -> Result<(), BusError> {
        let pad = (a - self.pos % a) % a;
        self.take(pad).map(|_| ())
    }
    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }
    pub(super) fn u8(&mut self) -> Result<u8, BusError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> Result<u32, BusError> {
        self.align(4)?;
        let b: [u8; 4] = self
            .take(4)?
            .try_into()
            .map_err(|_| BusError::Protocol("u32"))?;
        Ok(if self.le {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    }
    #[cfg(test)]
    pub(super) fn u64(&mut self) -> Result<u64, BusError> {
        self.align(8)?;
        let b: [u8; 8] = self
            .take(8)?
            .try_into()
            .map_err(|_| BusError::Protocol("u64"))?;
        Ok(if self.le {
            u64::from_le_bytes(b)
        } else {
            u64::from_be_bytes(b)
        })
    }
    fn text(&mut self, len: usize) -> Result<String, BusError> {
        let s = self.take(len)?;
        if self.u8()? != 0 {
            return Err(BusError::Protocol("a string without its NUL"));
        }
        String::from_utf8(s.to_vec()).map_err(|_| BusError::Protocol("a string that is not UTF-8"))
    }
    pub(super) fn string(&mut self) -> Result<String, BusError> {
        let n = self.u32()? as usize;
        self.text(n)
    }
    pub(super) fn signature(&mut self) -> Result<String, BusError> {
        let n = self.u8()? as usize;
        self.text(n)
    }
}

impl Message {
    /// Reads one message from `r`.
    pub(super) fn read(r: &mut impl Read) -> Result<Self, BusError> {
        let mut fixed = [0u8; 16];
        r.read_exact(&mut fixed)?;
        let le = match fixed[0] {
            b'l' => true,
            b'B' => false,
            _ => return Err(BusError::Protocol("an unknown byte order")),
        };
        if fixed[3] != 1 {
            return Err(BusError::Protocol("an unknown protocol version"));
        }
        let mut head = In::new(&fixed, le);
        head.take(4)?;
        let body_len = head.u32()?;
        let _serial = head.u32()?;
        let fields_len = head.u32()?;
        if body_len > MAX_PART || fields_len > MAX_PART {
            return Err(BusError::Protocol(
                "a message larger than any answer to a property write",
            ));
        }
        // The fields, then padding up to 8 (counted from the message's start).
        let padded = (16 + fields_len as usize).div_ceil(8) * 8 - 16;
        let mut rest = vec![0u8; padded + body_len as usize];
        r.read_exact(&mut rest)?;
        let mut all = fixed.to_vec();
        all.extend(&rest[..fields_len as usize]);
        let mut msg = Self {
            kind: fixed[1],
            little_endian: le,
            body: rest[padded..].to_vec(),
            ..Default::default()
        };
        let mut f = In::new(&all, le);
        f.take(16)?;
        while !f.at_end() {
            f.align(8)?;
            let code = f.u8()?;
            let sig = f.signature()?;
            match sig.as_str() {
                "s" | "o" => {
                    let v = f.string()?;
                    match code {
                        F_PATH => msg.path = Some(v),
                        F_INTERFACE => msg.interface = Some(v),
                        F_MEMBER => msg.member = Some(v),
                        F_ERROR_NAME => msg.error_name = Some(v),
                        _ => {}
                    }
                }
                "g" => {
                    let v = f.signature()?;
                    if code == F_SIGNATURE {
                        msg.signature = Some(v);
                    }
                }
                "u" => {
                    let v = f.u32()?;
                    if code == F_REPLY_SERIAL {
                        msg.reply_serial = Some(v);
                    }
                }
                _ => return Err(BusError::Protocol("a header field of an unexpected type")),
            }
        }
        Ok(msg)
    }

    /// The first argument when it is a string (an error's message).
    fn first_string(&self) -> Option<String> {
        if !self.signature.as_deref()?.starts_with('s') {
            return None;
        }
        In::new(&self.body, self.little_endian).string().ok()
    }
}

#[cfg(test)]
pub(super) mod fake {
    //! A stand-in for PID 1's end of the private socket.
    use super::*;
    use std::os::unix::net::UnixListener;

    /// What the fake systemd answers to the one call it takes.
    pub enum Answer {
        Return,
        Error(&'static str, &'static str),
        /// Closes the connection instead of answering.
        Hangup,
    }

    /// What the fake saw: the SASL line and the call.
    pub struct Seen {
        pub auth: String,
        pub call: Message,
        pub interface_arg: String,
        pub property_arg: String,
        pub variant_sig: String,
        pub value: u64,
    }

    /// Serves one connection on `path` in a thread; the handle returns what it saw.
    pub fn serve(path: &Path, answer: Answer) -> std::thread::JoinHandle<Seen> {
        let listener = UnixListener::bind(path).expect("bind");
        std::thread::spawn(move || {
            let (conn, _) = listener.accept().expect("accept");
            let mut w = conn.try_clone().expect("clone");
            let mut r = BufReader::new(conn);
            let mut nul = [0u8; 1];
            r.read_exact(&mut nul).expect("nul");
            assert_eq!(nul, [0]);
            let auth = read_line(&mut r).expect("auth");
            w.write_all(b"OK 0123456789abcdef0123456789abcdef\r\n")
                .expect("ok");
            assert_eq!(read_line(&mut r).expect("begin"), "BEGIN");
            let call = Message::read(&mut r).expect("call");
            let mut b = In::new(&call.body, call.little_endian);
            let interface_arg = b.string().expect("interface");
            let property_arg = b.string().expect("property");
            let variant_sig = b.signature().expect("variant");
            let value = b.u64().expect("value");
            // The client's first (and only) call is serial 1, which the replies name.
            // A signal first: the client must skip what is not its reply.
            w.write_all(&reply(4, 7, None, None)).expect("signal");
            match answer {
                Answer::Return => w.write_all(&reply(METHOD_RETURN, 8, Some(1), None)),
                Answer::Error(name, text) => {
                    w.write_all(&reply(ERROR, 8, Some(1), Some((name, text))))
                }
                Answer::Hangup => Ok(()),
            }
            .expect("answer");
            Seen {
                auth,
                call,
                interface_arg,
                property_arg,
                variant_sig,
                value,
            }
        })
    }

    /// The sender field (D-Bus specification, "Message Format").
    const F_SENDER: u8 = 7;

    fn reply(kind: u8, serial: u32, to: Option<u32>, error: Option<(&str, &str)>) -> Vec<u8> {
        let mut fields = Out::default();
        let mut body = Out::default();
        // As PID 1 does on its private socket: a well-known name where a bus would put
        // a unique one (what zbus rejects, above).
        fields.field(F_SENDER, "s", DESTINATION);
        if let Some(to) = to {
            fields.pad(8);
            fields.u8(F_REPLY_SERIAL);
            fields.signature("u");
            fields.u32(to);
        }
        if let Some((name, text)) = error {
            fields.field(F_ERROR_NAME, "s", name);
            fields.field(F_SIGNATURE, "g", "s");
            body.string(text);
        }
        if kind == 4 {
            fields.field(F_PATH, "o", MANAGER_PATH);
            fields.field(F_INTERFACE, "s", PROPERTIES);
            fields.field(F_MEMBER, "s", "PropertiesChanged");
        }
        let mut m = Out::default();
        m.0.extend([b'l', kind, 0, 1]);
        m.u32(body.0.len() as u32);
        m.u32(serial);
        m.u32(fields.0.len() as u32);
        m.0.extend(fields.0);
        m.pad(8);
        m.0.extend(body.0);
        m.0
    }
}

#[cfg(test)]
mod tests {
    use super::fake::{serve, Answer};
    use super::*;

    #[test]
    fn sets_the_property_with_one_call() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("private");
        let server = serve(&sock, Answer::Return);
        set_manager_u64(&sock, "KExecWatchdogUSec", 45_000_000, TIMEOUT).expect("set");
        let seen = server.join().expect("server");
        let uid = nix::unistd::geteuid().as_raw().to_string();
        assert_eq!(seen.auth, format!("AUTH EXTERNAL {}", hex::encode(uid)));
        assert_eq!(seen.call.kind, METHOD_CALL);
        assert_eq!(seen.call.path.as_deref(), Some(MANAGER_PATH));
        assert_eq!(seen.call.interface.as_deref(), Some(PROPERTIES));
        assert_eq!(seen.call.member.as_deref(), Some("Set"));
        assert_eq!(seen.call.signature.as_deref(), Some("ssv"));
        assert_eq!(seen.interface_arg, MANAGER_INTERFACE);
        assert_eq!(seen.property_arg, "KExecWatchdogUSec");
        assert_eq!(seen.variant_sig, "t");
        assert_eq!(seen.value, 45_000_000);
    }

    #[test]
    fn a_refusal_names_systemds_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("private");
        let server = serve(
            &sock,
            Answer::Error(
                "org.freedesktop.DBus.Error.PropertyReadOnly",
                "Property 'KExecWatchdogUSec' is not writable.",
            ),
        );
        let e = set_manager_u64(&sock, "KExecWatchdogUSec", 1, TIMEOUT).expect_err("refused");
        server.join().expect("server");
        match e {
            BusError::Refused { name, message, .. } => {
                assert_eq!(name, "org.freedesktop.DBus.Error.PropertyReadOnly");
                assert!(message.contains("not writable"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn no_answer_and_no_socket_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let sock = dir.path().join("private");
        let server = serve(&sock, Answer::Hangup);
        let e = set_manager_u64(&sock, "KExecWatchdogUSec", 1, TIMEOUT).expect_err("hung up");
        server.join().expect("server");
        assert!(matches!(e, BusError::Io(_)), "{e:?}");
        let e = set_manager_u64(&dir.path().join("none"), "KExecWatchdogUSec", 1, TIMEOUT)
            .expect_err("no socket");
        assert!(matches!(e, BusError::Connect { .. }), "{e:?}");
    }

    #[test]
    fn a_big_endian_message_reads_the_same() {
        let mut fields = Out::default();
        fields.pad(8);
        fields.u8(F_REPLY_SERIAL);
        fields.signature("u");
        fields.u32(0);
        let mut m = fields.0.clone();
        // Turn the little-endian reply serial (5 at offset 4 of the field) big-endian.
        m[4..8].copy_from_slice(&5u32.to_be_bytes());
        let mut bytes = vec![b'B', METHOD_RETURN, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9];
        bytes.extend((m.len() as u32).to_be_bytes());
        bytes.extend(&m);
        while !bytes.len().is_multiple_of(8) {
            bytes.push(0);
        }
        let msg = Message::read(&mut bytes.as_slice()).expect("read");
        assert_eq!((msg.kind, msg.reply_serial), (METHOD_RETURN, Some(5)));
    }
}
