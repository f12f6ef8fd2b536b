//! `[boot]`: the bootloader backend, its tries and guard, and how a release is booted.

use std::path::PathBuf;

use serde::Deserialize;

use super::{bad, ConfigError};

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BootConfig {
    /// `grub` or `systemd-boot`.
    pub backend: String,
    /// Path of the grubenv block (GRUB).
    pub grubenv: PathBuf,
    /// Where the ESP is mounted (systemd-boot: entries and kernels live there).
    pub esp: PathBuf,
    /// Kernel arguments after `root=` and `updateagent.slot=` (systemd-boot entries, and
    /// a kexec's line: with GRUB they must equal the fragment's `ua_cmdline`).
    pub options: String,
    /// Trial boots before the bootloader falls back.
    pub tries: u8,
    /// Boots in a row of the committed default that may fail to reach the agent before
    /// the bootloader boots the other slot (when it holds a release and is not marked
    /// unbootable). 0: no guard. GRUB: `ua_boots`; systemd-boot: a counted
    /// `…@default+N.conf` entry (bootloader-hooks/systemd-boot/README.md).
    pub default_tries: u8,
    /// How a release is booted: `firmware` (default) or `kexec` (docs/kexec.md).
    pub reboot: crate::reboot_method::RebootMethod,
    /// A kexec'd kernel that panics reboots through the firmware after this long.
    pub kexec_panic_secs: u32,
    /// The hardware watchdog armed across a kexec (systemd's KExecWatchdogUSec, set
    /// before `systemctl kexec`): a kexec'd kernel that hangs is reset this long after
    /// systemd's shutdown armed it, unless its own system takes the watchdog over.
    pub kexec_watchdog_secs: u32,
    /// The pstore file system: the kernel's crash records of boots that never reached
    /// the agent, read to say why a slot did not boot (`pstore.rs`).
    pub pstore: PathBuf,
    /// Where systemd-pstore.service moves those records early in boot.
    pub pstore_archive: PathBuf,
}

impl Default for BootConfig {
    fn default() -> Self {
        Self {
            backend: "grub".into(),
            grubenv: "/boot/efi/EFI/BOOT/grubenv".into(),
            esp: "/boot/efi".into(),
            options: "ro".into(),
            tries: 3,
            default_tries: 3,
            reboot: Default::default(),
            kexec_panic_secs: 10,
            kexec_watchdog_secs: 120,
            pstore: "/sys/fs/pstore".into(),
            pstore_archive: "/var/lib/systemd/pstore".into(),
        }
    }
}

impl BootConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.backend != "grub" && self.backend != "systemd-boot" {
            return bad("boot.backend", "must be \"grub\" or \"systemd-boot\"");
        }
        if !(1..=9).contains(&self.tries) {
            return bad("boot.tries", "must be between 1 and 9");
        }
        if self.default_tries > 9 {
            return bad("boot.default_tries", "must be between 0 (off) and 9");
        }
        if !(1..=600).contains(&self.kexec_panic_secs) {
            return bad("boot.kexec_panic_secs", "must be between 1 and 600");
        }
        if !(10..=3600).contains(&self.kexec_watchdog_secs) {
            return bad("boot.kexec_watchdog_secs", "must be between 10 and 3600");
        }
        Ok(())
    }
}
