//! Reboot into the armed slot: by kexec when asked and possible, through the firmware
//! otherwise, and never not at all.
//!
//! ```text
//! reboot(kexec) ─ armed trial with a try left? ─ kexec_load_disabled? ─ the slot's
//!   kernel (GRUB: its /boot, mounted read-only; systemd-boot: the verified copy on
//!   the ESP) ─ kexec_file_load(kernel, initrd, the bootloader's line + panic=N +
//!   updateagent.boot=kexec) ─ one try counted down (BootControl::consume_try) ─
//!   hardware watchdog left running across the kexec (KExecWatchdogUSec) ─
//!   reboot.json ─ systemctl kexec
//!   any refusal ─► KEXEC_REFUSED event with the reason, the try given back, the image
//!                  unloaded ─► firmware reboot
//! ```
//!
//! The order keeps the count honest: everything that can refuse without changing the
//! node runs before the try is counted, and a refusal after it gives the try back, so
//! a firmware reboot that follows costs one try, as it always did.

mod agent;
mod manager_bus;
mod os;
pub mod record;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};

pub use manager_bus::PRIVATE_SOCKET;
pub use os::{KexecOs, LinuxKexec};

use crate::boot::{BootControl, BootError};
use crate::reboot_method::{RebootMethod, KEXEC_MARK};
use crate::slots::Slot;
use crate::state::{State, StateError};

/// Why a kexec was asked for and a firmware reboot happens instead.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("kexec boots armed trials only and the agent is {state}; this reboot goes through the firmware")]
    NotATrial { state: &'static str },
    #[error("reading the state")]
    State(#[source] StateError),
    #[error("reading the bootloader's state")]
    Boot(#[source] BootError),
    #[error("slot {slot} has no trial boot left; the bootloader falls back")]
    NoTryLeft { slot: Slot },
    #[error("kexec is disabled on this kernel ({path} is not 0)")]
    LoadDisabled { path: PathBuf },
    #[error("reading {path}")]
    Probe {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("slot {slot} has no kernel at {path}")]
    NoKernel { slot: Slot, path: PathBuf },
    #[error("reading slot {slot}'s kernel at {path}")]
    Kernel {
        slot: Slot,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting slot {slot} to read its kernel")]
    Mount {
        slot: Slot,
        #[source]
        source: crate::slots::SlotError,
    },
    #[error("the kernel refused slot {slot}'s kernel under lockdown ({mode}): kexec needs a kernel signed with a key this kernel trusts")]
    Lockdown {
        slot: Slot,
        mode: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kexec_file_load of slot {slot}'s kernel failed")]
    Load {
        slot: Slot,
        #[source]
        source: std::io::Error,
    },
    #[error("boot.options is {configured:?} but this boot's command line has {running:?} after updateagent.slot= (GRUB's ua_cmdline): a kexec would start slot {slot} with other kernel arguments than GRUB gives it; make boot.options equal the fragment's ua_cmdline")]
    OptionsMismatch {
        slot: Slot,
        configured: String,
        running: String,
    },
    #[error("counting down a try of slot {slot}")]
    Count {
        slot: Slot,
        #[source]
        source: BootError,
    },
    #[error("arming the hardware watchdog for the kexec")]
    Watchdog(#[source] std::io::Error),
    #[error("writing the reboot record")]
    Record(#[source] std::io::Error),
    #[error("systemctl kexec failed")]
    Exec(#[source] std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum RebootError {
    /// The last resort failed: the node is not going down.
    #[error("the firmware reboot (health.reboot_command) failed")]
    Firmware(#[source] std::io::Error),
}

/// What a reboot request became.
#[derive(Debug)]
pub struct Rebooting {
    pub method: RebootMethod,
    /// Why kexec was not used, when it was asked for.
    pub fallback: Option<Refusal>,
}

/// The knobs of the path; the probe files are fields so tests can write them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub panic_secs: u32,
    pub watchdog_secs: u32,
    pub load_disabled: PathBuf,
    pub lockdown: PathBuf,
    /// The running boot's command line (GRUB: what its fragment gave, to compare).
    pub proc_cmdline: PathBuf,
}

impl Settings {
    pub fn new(boot: &crate::config::BootConfig) -> Self {
        Self {
            panic_secs: boot.kexec_panic_secs,
            watchdog_secs: boot.kexec_watchdog_secs,
            load_disabled: "/proc/sys/kernel/kexec_load_disabled".into(),
            lockdown: "/sys/kernel/security/lockdown".into(),
            proc_cmdline: "/proc/cmdline".into(),
        }
    }
}

/// A slot's kernel and initrd, open, and the mount they were read from (GRUB).
pub struct KernelFiles {
    pub kernel: File,
    pub initrd: Option<File>,
    pub mount: Option<crate::slots::ReadOnlyMount>,
}

impl std::fmt::Debug for KernelFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelFiles")
            .field("initrd", &self.initrd.is_some())
            .finish_non_exhaustive()
    }
}

impl KernelFiles {
    /// `root/dir/vmlinuz` and, when there is one, `root/dir/initrd.img`, each resolved
    /// inside `root` (a release's symlink cannot name a file of the running system).
    pub fn open(slot: Slot, root: &Path, dir: &Path) -> Result<Self, Refusal> {
        let find = |name: &str| -> Result<Option<File>, Refusal> {
            let rel = dir.join(name);
            let err = |source| Refusal::Kernel {
                slot,
                path: root.join(&rel),
                source,
            };
            match crate::boot::systemd_boot::resolve_in_root(root, &rel).map_err(err)? {
                Some(p) => File::open(p).map(Some).map_err(err),
                None => Ok(None),
            }
        };
        let kernel = find("vmlinuz")?.ok_or_else(|| Refusal::NoKernel {
            slot,
            path: root.join(dir).join("vmlinuz"),
        })?;
        Ok(Self {
            kernel,
            initrd: find("initrd.img")?,
            mount: None,
        })
    }

    /// Closes the files, then unmounts; a failed unmount only leaves a read-only
    /// mount behind until the node goes down.
    fn close(self) {
        drop((self.kernel, self.initrd));
        if let Some(m) = self.mount {
            if let Err(e) = m.close() {
                tracing::warn!(error = %crate::update::error_chain(&e), "cannot unmount the slot the kexec kernel was read from");
            }
        }
    }
}

/// What the path needs from the node; the agent fills it in, tests build it on a lab.
pub struct Node<'a> {
    pub boot: &'a mut dyn BootControl,
    pub state: Result<State, StateError>,
    pub state_dir: &'a Path,
    pub settings: &'a Settings,
    /// The slot's kernel as its bootloader entry would load it.
    pub kernel: &'a dyn Fn(Slot) -> Result<KernelFiles, Refusal>,
    /// The slot's command line as its bootloader entry gives it (or why it is not
    /// known for sure).
    pub cmdline: &'a dyn Fn(Slot) -> Result<String, Refusal>,
}

impl std::fmt::Debug for Node<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

/// Reboots as `method` asks, falling back to the firmware with a journal event that
/// says why. Returns once the reboot is under way.
pub fn reboot(
    method: RebootMethod,
    node: Node<'_>,
    os: &dyn KexecOs,
) -> Result<Rebooting, RebootError> {
    let requested_ms = crate::timefmt::now_ms();
    let Node {
        boot,
        state,
        state_dir,
        settings,
        kernel,
        cmdline,
    } = node;
    let attempt = match &state {
        Ok(State::Armed { staged, .. }) => Some(staged.attempt.clone()),
        _ => None,
    };
    let fallback = match method {
        RebootMethod::Firmware => None,
        RebootMethod::Kexec => {
            let slot = match state {
                Ok(State::Armed { staged, .. }) => Ok(staged.slot),
                Ok(other) => Err(Refusal::NotATrial {
                    state: other.name(),
                }),
                Err(e) => Err(Refusal::State(e)),
            };
            let rec = record::Record {
                attempt: attempt.clone(),
                method: RebootMethod::Kexec,
                requested_ms,
                fallback: None,
            };
            let ctx = Kexec {
                settings,
                state_dir,
                kernel,
                cmdline,
                rec,
            };
            match slot.and_then(|slot| ctx.run(boot, slot, os)) {
                Ok(()) => {
                    return Ok(Rebooting {
                        method: RebootMethod::Kexec,
                        fallback: None,
                    })
                }
                Err(r) => Some(r),
            }
        }
    };
    let why = fallback.as_ref().map(|r| crate::update::error_chain(r));
    if let Some(why) = &why {
        crate::emit!(tracing::Level::WARN, crate::events::KEXEC_REFUSED, update_agent_reason = %why, "kexec not used, rebooting through the firmware: {why}");
    }
    let rec = record::Record {
        attempt,
        method: RebootMethod::Firmware,
        requested_ms,
        fallback: why,
    };
    if let Err(e) = record::save(state_dir, &rec) {
        // Only the downtime's measurement depends on it: never a reason not to reboot.
        tracing::warn!(error = %e, "cannot write the reboot record; this boot's downtime will not be known");
    }
    os.firmware_reboot().map_err(RebootError::Firmware)?;
    Ok(Rebooting {
        method: RebootMethod::Firmware,
        fallback,
    })
}

/// One kexec of an armed slot.
struct Kexec<'a> {
    settings: &'a Settings,
    state_dir: &'a Path,
    kernel: &'a dyn Fn(Slot) -> Result<KernelFiles, Refusal>,
    cmdline: &'a dyn Fn(Slot) -> Result<String, Refusal>,
    /// Written just before `systemctl kexec`.
    rec: record::Record,
}

impl Kexec<'_> {
    /// Up to `systemctl kexec`; an error after the try was counted gives it back and
    /// unloads the image.
    fn run(&self, boot: &mut dyn BootControl, slot: Slot, os: &dyn KexecOs) -> Result<(), Refusal> {
        let left = match boot.status().map_err(Refusal::Boot)?.trial {
            Some((s, left)) if s == slot && left > 0 => left,
            _ => return Err(Refusal::NoTryLeft { slot }),
        };
        check_enabled(self.settings)?;
        let line = format!(
            "{} panic={} {KEXEC_MARK}",
            (self.cmdline)(slot)?,
            self.settings.panic_secs
        );
        // Timed: the load is part of the downtime the lab measures (docs/benchmarks.md),
        // and the kernel hashes every byte loaded, once here and again in the purgatory
        // at the jump, so the size is logged with it.
        let started = std::time::Instant::now();
        let files = (self.kernel)(slot)?;
        let opened = started.elapsed();
        let bytes = [Some(&files.kernel), files.initrd.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum::<u64>();
        let loaded = os.load(&files.kernel, files.initrd.as_ref(), &line);
        let (open_ms, load_ms) = (
            opened.as_millis(),
            started.elapsed().saturating_sub(opened).as_millis(),
        );
        files.close();
        loaded.map_err(|source| load_refusal(slot, self.settings, source))?;
        tracing::info!(slot = %slot, cmdline = %line, open_ms, load_ms, bytes, "kexec: slot {slot}'s kernel loaded: files opened in {open_ms} ms, {bytes} bytes loaded in {load_ms} ms");
        if let Err(source) = boot.consume_try(slot) {
            unload(os);
            return Err(Refusal::Count { slot, source });
        }
        let armed = std::time::Instant::now();
        let went = os
            .arm_watchdog(self.settings.watchdog_secs)
            .map_err(Refusal::Watchdog)
            .and_then(|()| {
                let ms = armed.elapsed().as_millis();
                tracing::info!(ms, "kexec: systemd's KExecWatchdogUSec set in {ms} ms");
                record::save(self.state_dir, &self.rec).map_err(Refusal::Record)
            })
            .and_then(|()| os.exec().map_err(Refusal::Exec));
        if let Err(r) = went {
            give_back(boot, slot, left);
            unload(os);
            return Err(r);
        }
        Ok(())
    }
}

/// GRUB builds a slot's line in its own script from `ua_cmdline`, which the agent
/// cannot read; the kexec builds it from `boot.options`. The running boot's line holds
/// what the fragment gave (after `updateagent.slot=`), so a difference is a
/// configuration error found before it boots a release with the wrong arguments (it
/// once did in the VM lab). Words a kexec appended to a kexec'd boot are not GRUB's. A
/// line without `updateagent.slot=` did not come from the fragment: nothing to compare.
pub fn check_grub_options(s: &Settings, slot: Slot, configured: &str) -> Result<(), Refusal> {
    let text = std::fs::read_to_string(&s.proc_cmdline).map_err(|source| Refusal::Probe {
        path: s.proc_cmdline.clone(),
        source,
    })?;
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some(at) = words
        .iter()
        .position(|w| w.starts_with("updateagent.slot="))
    else {
        return Ok(());
    };
    let mut running = &words[at + 1..];
    if let [rest @ .., panic, mark] = running {
        if *mark == KEXEC_MARK && panic.starts_with("panic=") {
            running = rest;
        }
    }
    let running = running.join(" ");
    let configured = configured.split_whitespace().collect::<Vec<_>>().join(" ");
    if running == configured {
        Ok(())
    } else {
        Err(Refusal::OptionsMismatch {
            slot,
            configured,
            running,
        })
    }
}

/// `kexec_load_disabled` is a one-way switch: once 1, no kexec until a reboot.
fn check_enabled(s: &Settings) -> Result<(), Refusal> {
    match std::fs::read_to_string(&s.load_disabled) {
        Ok(v) if v.trim() == "0" => Ok(()),
        Ok(_) => Err(Refusal::LoadDisabled {
            path: s.load_disabled.clone(),
        }),
        // No such file: a kernel built without kexec (the load says ENOSYS).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Refusal::Probe {
            path: s.load_disabled.clone(),
            source,
        }),
    }
}

/// A refused load, named after lockdown when the kernel is locked down (the kernel
/// says EPERM or EKEYREJECTED for an unsigned image then).
fn load_refusal(slot: Slot, s: &Settings, source: std::io::Error) -> Refusal {
    let denied = matches!(
        source.raw_os_error(),
        Some(nix::libc::EPERM | nix::libc::EKEYREJECTED)
    );
    match lockdown_mode(&s.lockdown) {
        Some(mode) if denied => Refusal::Lockdown { slot, mode, source },
        _ => Refusal::Load { slot, source },
    }
}

/// The active mode of `/sys/kernel/security/lockdown` (`none [integrity]
/// confidentiality`), unless it is `none` or unreadable.
fn lockdown_mode(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let start = text.find('[')? + 1;
    let mode = &text[start..start + text[start..].find(']')?];
    (mode != "none").then(|| mode.to_owned())
}

fn give_back(boot: &mut dyn BootControl, slot: Slot, left: u8) {
    if let Err(e) = boot.arm_trial(slot, left) {
        tracing::warn!(slot = %slot, error = %crate::update::error_chain(&e), "cannot give the try counted for the kexec back; the trial has one try fewer");
    }
}

fn unload(os: &dyn KexecOs) {
    if let Err(e) = os.unload() {
        tracing::warn!(error = %e, "cannot unload the kexec image");
    }
}
