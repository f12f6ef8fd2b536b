//! The labs: each backend in a temporary directory (a grubenv, an ESP tree) with a
//! simulation of what its bootloader does at each firmware boot.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::boot::grub::{
    Grub, GrubEnv, VAR_A_OK, VAR_BOOTS, VAR_B_OK, VAR_DEFAULT, VAR_FALLEN, VAR_TRIAL, VAR_TRIES,
};
use crate::boot::systemd_boot::test_util;
use crate::boot::systemd_boot::{BootFile, EntryConfig, SystemdBoot};
use crate::boot::{BootControl, BootError};
use crate::slots::Slot;

use super::{tmp, A, B};

/// One backend over its own temporary state, with a simulated bootloader.
pub(crate) trait Lab {
    fn name(&self) -> &'static str;
    fn ctl(&mut self) -> &mut dyn BootControl;
    /// What the backend needs once a new release has been written into `slot`, before
    /// it can be armed.
    fn install(&mut self, slot: Slot) -> Result<(), BootError>;
    /// One firmware boot, as the bootloader chooses and counts; the slot it boots.
    fn boot(&mut self) -> Slot;
    /// Every file of the backend's state, for "a refused call changes nothing".
    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>>;
}

/// GRUB over a grubenv made by [`Grub::create`]; boots as
/// `bootloader-hooks/grub/update-agent.cfg` does.
pub(crate) struct GrubLab {
    dir: tempfile::TempDir,
    grub: Grub,
}

impl GrubLab {
    pub(crate) fn new() -> Self {
        let dir = tmp();
        let grub = Grub::create(dir.path().join("grubenv"), A).expect("creating the grubenv");
        Self { dir, grub }
    }
}

/// A variable as the script sees it after `load_env`: missing reads as empty.
pub(crate) fn grub_var(env: &GrubEnv, name: &str) -> String {
    env.get(name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// `save_env`: the block written over the same file, in place.
pub(crate) fn save_env(path: &Path, env: &GrubEnv) {
    let block = env.to_bytes().expect("the block fits");
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("opening the grubenv");
    file.write_all_at(&block, 0).expect("writing the grubenv");
}

/// One boot as `bootloader-hooks/grub/update-agent.cfg` decides it, on the grubenv at
/// `path`: the default is `b` only if `ua_default=b`; a trial runs only on the
/// non-default slot and only if that slot is not marked `0`; `ua_tries` 1..9 is counted
/// down and saved before the trial boots; anything else (0, empty) clears the trial
/// and boots the default. Before the default boots, its guard `ua_boots` 1..9 is
/// counted down; at `0` the other slot boots instead when it is not marked `0`
/// (`ua_fallen` set, `ua_boots=1`). The default boots even when marked `0` (last resort).
pub(crate) fn grub_boot(path: &Path) -> Slot {
    let mut env = GrubEnv::parse(&fs::read(path).expect("reading the grubenv"))
        .expect("a block GRUB can load");
    let default = if grub_var(&env, VAR_DEFAULT) == "b" {
        B
    } else {
        A
    };
    let trial = match grub_var(&env, VAR_TRIAL).as_str() {
        "a" => Some(A),
        "b" => Some(B),
        _ => None,
    };
    let oks = [VAR_A_OK, VAR_B_OK].map(|v| grub_var(&env, v) != "0");
    let ok = |slot: Slot| oks[usize::from(slot == B)];
    let digit_down = |v: String| match v.as_bytes() {
        &[d @ b'1'..=b'9'] => Some((d - b'1').to_string()),
        _ => None,
    };
    if let Some(trial) = trial.filter(|&t| t != default && ok(t)) {
        if let Some(left) = digit_down(grub_var(&env, VAR_TRIES)) {
            env.set(VAR_TRIES, &left).expect("valid");
            save_env(path, &env);
            return trial;
        }
        env.set(VAR_TRIAL, "").expect("valid");
        env.set(VAR_TRIES, "0").expect("valid");
        save_env(path, &env);
    }
    // The default boots: its guard is counted down, and at 0 the other slot boots
    // instead (unless marked 0), with ua_boots=1 so the next boot tries the default.
    let alt = default.other();
    let boots = grub_var(&env, VAR_BOOTS);
    if boots == "0" && ok(alt) {
        env.set(VAR_FALLEN, default.letter()).expect("valid");
        env.set(VAR_BOOTS, "1").expect("valid");
        save_env(path, &env);
        return alt;
    }
    if let Some(left) = digit_down(boots) {
        env.set(VAR_BOOTS, &left).expect("valid");
        save_env(path, &env);
    }
    default
}

impl Lab for GrubLab {
    fn name(&self) -> &'static str {
        "grub"
    }

    fn ctl(&mut self) -> &mut dyn BootControl {
        &mut self.grub
    }

    fn install(&mut self, _slot: Slot) -> Result<(), BootError> {
        // GRUB boots whatever the slot's partition holds: nothing to put anywhere.
        Ok(())
    }

    fn boot(&mut self) -> Slot {
        grub_boot(self.grub.path())
    }

    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        test_util::snapshot(self.dir.path())
    }
}

/// systemd-boot over an ESP made by [`SystemdBoot::create`]; boots as the loader does
/// ([`test_util::boot`]: first entry in its order, counter renamed one try down).
pub(crate) struct SystemdBootLab {
    dir: tempfile::TempDir,
    sb: SystemdBoot,
    /// Releases made so far; each gets its own version and kernel.
    releases: u32,
}

impl SystemdBootLab {
    fn esp(dir: &Path) -> PathBuf {
        dir.join("esp")
    }

    /// A small fake kernel for release `n`, outside the ESP.
    fn kernel(dir: &Path, n: u32) -> (PathBuf, [u8; 32]) {
        let src = dir.join("src");
        fs::create_dir_all(&src).expect("mkdir");
        let path = src.join(format!("vmlinuz-{n}"));
        let bytes = format!("kernel of release {n}\n");
        fs::write(&path, &bytes).expect("writing a fake kernel");
        (path, Sha256::digest(bytes.as_bytes()).into())
    }

    pub(crate) fn new() -> Self {
        let dir = tmp();
        // The ESP is a mount point: it exists.
        fs::create_dir(Self::esp(dir.path())).expect("mkdir esp");
        let (path, sha256) = Self::kernel(dir.path(), 1);
        let kernel = BootFile {
            path: &path,
            sha256,
        };
        let sb = SystemdBoot::create(
            Self::esp(dir.path()),
            EntryConfig::default(),
            A,
            "1",
            &kernel,
            None,
        )
        .expect("creating the ESP");
        Self {
            dir,
            sb,
            releases: 1,
        }
    }
}

impl Lab for SystemdBootLab {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn ctl(&mut self) -> &mut dyn BootControl {
        &mut self.sb
    }

    fn install(&mut self, slot: Slot) -> Result<(), BootError> {
        self.releases += 1;
        let n = self.releases;
        let (path, sha256) = Self::kernel(self.dir.path(), n);
        let kernel = BootFile {
            path: &path,
            sha256,
        };
        self.sb.stage(slot, &n.to_string(), &kernel, None)
    }

    fn boot(&mut self) -> Slot {
        test_util::boot(&Self::esp(self.dir.path()))
    }

    fn snapshot(&self) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
        test_util::snapshot(&Self::esp(self.dir.path()))
    }
}
