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

/// The real thing: the system call, a systemd drop-in and `systemctl`.
#[derive(Debug, Clone)]
pub struct LinuxKexec {
    pub systemctl: PathBuf,
    /// Where the `KExecWatchdogSec=` drop-in goes (`/run/systemd/system.conf.d`: it
    /// lasts until the next boot; the package's tmpfiles line creates it).
    pub conf_dir: PathBuf,
    pub reboot_command: Vec<String>,
}

/// The drop-in's name, after the distribution's own (lower numbers).
const DROPIN: &str = "60-update-agent-kexec.conf";

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

    /// systemd's `KExecWatchdogSec` in a drop-in under /run and a daemon-reload,
    /// which re-reads system.conf: through systemctl's private socket, so no D-Bus
    /// daemon is needed (minimal images have none).
    fn arm_watchdog(&self, secs: u32) -> io::Result<()> {
        std::fs::create_dir_all(&self.conf_dir)?;
        let text = format!("[Manager]\nKExecWatchdogSec={secs}s\n");
        crate::durable::replace(&self.conf_dir.join(DROPIN), text.as_bytes())
            .map_err(|(_, e)| e)?;
        run(&self.systemctl, &["daemon-reload"])
    }

    fn exec(&self) -> io::Result<()> {
        run(&self.systemctl, &["kexec"])
    }

    fn firmware_reboot(&self) -> io::Result<()> {
        crate::health::reboot(&self.reboot_command)
    }
}
