//! What the kexec path asks of the operating system, behind one trait: the tests put
//! errors where the kernel and systemd would (EPERM, ENOSYS, EBUSY, ...), the rest of
//! the path runs as it does on a node.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;
use std::process::Command;

/// The system calls and commands of a kexec and of its fallback.
pub trait KexecOs: Send + Sync {
    /// `kexec_file_load(2)`: the kernel checks (and under lockdown verifies the
    /// signature of) the image and keeps it until the kexec or an unload.
    fn load(&self, kernel: &File, initrd: Option<&File>, cmdline: &str) -> io::Result<()>;
    /// Forgets a loaded image (a kexec that will not happen must not linger for a
    /// later `systemctl kexec` of someone else).
    fn unload(&self) -> io::Result<()>;
    /// Leaves the hardware watchdog running across the kexec with this timeout, so a
    /// new kernel that hangs is reset by the hardware.
    fn arm_watchdog(&self, secs: u32) -> io::Result<()>;
    /// Goes down through systemd's kexec path (services stopped as for a reboot).
    fn exec(&self) -> io::Result<()>;
    /// The ordinary reboot through the firmware and the bootloader.
    fn firmware_reboot(&self) -> io::Result<()>;
}

/// The real thing: the system call, one property of systemd's manager and
/// `systemctl`.
#[derive(Debug, Clone)]
pub struct LinuxKexec {
    pub systemctl: PathBuf,
    /// PID 1's private D-Bus socket ([`super::manager_bus::PRIVATE_SOCKET`]).
    pub manager_socket: PathBuf,
    pub reboot_command: Vec<String>,
}

/// Flags of `kexec_file_load` (linux/kexec.h).
const KEXEC_FILE_UNLOAD: nix::libc::c_ulong = 1;
const KEXEC_FILE_NO_INITRAMFS: nix::libc::c_ulong = 4;

fn file_load(
    kernel: nix::libc::c_long,
    initrd: nix::libc::c_long,
    cmdline: &[u8],
    flags: nix::libc::c_ulong,
) -> io::Result<()> {
    #[allow(unsafe_code)]
    // SAFETY: the descriptors are open (or -1 with the flags that ignore them) and
    // `cmdline` is a NUL-terminated buffer of the length passed, alive for the call.
    let r = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_kexec_file_load,
            kernel,
            initrd,
            cmdline.len() as nix::libc::c_ulong,
            if cmdline.is_empty() {
                std::ptr::null()
            } else {
                cmdline.as_ptr()
            },
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn run(prog: &std::path::Path, args: &[&str]) -> io::Result<()> {
    let st = Command::new(prog).args(args).status()?;
    if st.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{} exited with {st}",
            prog.display()
        )))
    }
}

impl KexecOs for LinuxKexec {
    fn load(&self, kernel: &File, initrd: Option<&File>, cmdline: &str) -> io::Result<()> {
        let mut line = cmdline.as_bytes().to_vec();
        if line.contains(&0) {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        line.push(0);
        let (fd, flags) = match initrd {
            Some(f) => (nix::libc::c_long::from(f.as_raw_fd()), 0),
            None => (-1, KEXEC_FILE_NO_INITRAMFS),
        };
        file_load(kernel.as_raw_fd().into(), fd, &line, flags)
    }

    fn unload(&self) -> io::Result<()> {
        file_load(-1, -1, &[], KEXEC_FILE_UNLOAD)
    }

    /// systemd's `KExecWatchdogUSec`, set on the running manager over its private
    /// socket: milliseconds, where the earlier drop-in and `systemctl daemon-reload`
    /// took seconds of the downtime (manager_bus.rs says why not `busctl`). It lasts
    /// until the manager exits, which is the kexec itself.
    fn arm_watchdog(&self, secs: u32) -> io::Result<()> {
        let usec = u64::from(secs) * 1_000_000;
        super::manager_bus::set_manager_u64(
            &self.manager_socket,
            "KExecWatchdogUSec",
            usec,
            super::manager_bus::TIMEOUT,
        )
        .map_err(io::Error::other)
    }

    fn exec(&self) -> io::Result<()> {
        run(&self.systemctl, &["kexec"])
    }

    fn firmware_reboot(&self) -> io::Result<()> {
        crate::health::reboot(&self.reboot_command)
    }
}
