//! How a node reboots into a release, and what one such boot cost: below config,
//! state, history and the API, so each names it without naming the others.

use serde::{Deserialize, Serialize};

/// `[boot] reboot`: through the firmware and the bootloader, or straight into the
/// armed slot's kernel with kexec (the firmware and the bootloader skipped).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebootMethod {
    #[default]
    Firmware,
    Kexec,
}

impl RebootMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Firmware => "firmware",
            Self::Kexec => "kexec",
        }
    }
}

/// The word a kexec'd kernel's command line carries beyond the bootloader's, so the
/// next start can tell the boot it runs came through kexec (a kexec'd kernel that
/// panics comes back through the firmware, without it).
pub const KEXEC_MARK: &str = "updateagent.boot=kexec";

/// Whether the kernel command line `cmdline` came from the agent's kexec.
pub fn booted_by_kexec(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == KEXEC_MARK)
}

/// One update's boot into its release, as status and history show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// How the release's kernel was actually started.
    pub method: RebootMethod,
    /// From the reboot request to the health gate's commit, when the agent knows when
    /// the reboot was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// Why kexec was asked for but not used (the firmware rebooted instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mark_is_a_whole_word() {
        assert!(booted_by_kexec(
            "root=PARTLABEL=root-b updateagent.slot=b ro panic=10 updateagent.boot=kexec"
        ));
        assert!(!booted_by_kexec(
            "root=PARTLABEL=root-b updateagent.slot=b ro"
        ));
        assert!(!booted_by_kexec("updateagent.boot=kexecx"));
    }

    #[test]
    fn names_are_the_config_words() {
        for m in [RebootMethod::Firmware, RebootMethod::Kexec] {
            let v: RebootMethod =
                serde_json::from_str(&format!("\"{}\"", m.name())).expect("parse");
            assert_eq!(v, m);
        }
    }
}
