//! Files: directory listing, crash-safe renames and removals, and the verified copy
//! of kernels onto the ESP.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::names::{staged_name, temp_name};
use super::state::{refused, EspState, Op};
use super::{ENTRIES_DIR, INITRD_NAME, KERNEL_DIR, KERNEL_NAME, MAX_ENTRY_READ, TMP};
use crate::boot::BootError;
use crate::durable::sync_renamed;
use crate::hashio::{sha256_of, HashingReader};
use crate::slots::Slot;

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `root/rel/...` as needed, fsyncing each parent that gained a directory.
pub(super) fn ensure_dirs(root: &Path, rel: &[&str]) -> io::Result<PathBuf> {
    let mut dir = root.to_path_buf();
    for part in rel {
        let next = dir.join(part);
        match fs::create_dir(&next) {
            Ok(()) => sync_dir(&dir)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && next.is_dir() => {}
            Err(e) => return Err(e),
        }
        dir = next;
    }
    Ok(dir)
}

pub(super) fn read_bounded(path: &Path) -> io::Result<String> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_ENTRY_READ)
        .read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Regular files in `dir`, names as text. A missing directory lists as empty when
/// `missing_ok`.
pub(super) fn list_files(dir: &Path, missing_ok: bool) -> Result<Vec<String>, BootError> {
    let rerr = |source| BootError::Read {
        path: dir.to_owned(),
        source,
    };
    let iter = match fs::read_dir(dir) {
        Ok(it) => it,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(rerr(e)),
    };
    let mut names = Vec::new();
    for de in iter {
        let de = de.map_err(rerr)?;
        // systemd-boot skips directories; FAT has nothing but files and directories.
        if de.file_type().map_err(rerr)?.is_dir() {
            continue;
        }
        names.push(de.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn remove_in(dir: &Path, name: &str) -> Result<(), BootError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(BootError::Write { path, source }),
    }
}

/// Renames within `dir`, never over an existing file (a name we did not see when we
/// read the directory means someone else is changing it).
fn rename_in(dir: &Path, from: &str, to: &str) -> Result<(), BootError> {
    use nix::fcntl::{renameat2, RenameFlags};
    renameat2(
        None,
        &dir.join(from),
        None,
        &dir.join(to),
        RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|e| BootError::Write {
        path: dir.join(to),
        source: io::Error::from(e),
    })?;
    sync_renamed(&dir.join(to)).map_err(|source| BootError::Write {
        path: dir.join(to),
        source,
    })
}

/// Executes `ops` in order, fsyncing the directory after each (and a renamed file
/// before it, see [`sync_renamed`]), so they reach the disk in the order the
/// crash-safety argument assumes.
pub(super) fn run_ops(dir: &Path, ops: &[Op]) -> Result<(), BootError> {
    for op in ops {
        match op {
            Op::Rename { from, to } => rename_in(dir, from, to)?,
            Op::Remove(name) => remove_in(dir, name)?,
        }
        sync_dir(dir).map_err(|source| BootError::Write {
            path: dir.to_owned(),
            source,
        })?;
    }
    Ok(())
}

/// The real path of `rel` inside the tree at `root`, every symlink on the way resolved
/// as if `root` were `/` (`openat2` with `RESOLVE_IN_ROOT`): a release's
/// `/boot/vmlinuz -> /etc/shadow` names the slot's own `/etc/shadow`, never the host's,
/// and `..` cannot climb out. `Ok(None)` when there is no such file.
pub fn resolve_in_root(root: &Path, rel: &Path) -> io::Result<Option<PathBuf>> {
    use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let dir = File::open(root)?;
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match nix::fcntl::openat2(dir.as_raw_fd(), rel, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(None),
        // systemd's seccomp filters (RestrictSUIDSGID= among them) answer openat2 with
        // ENOSYS, since they cannot look inside its flags: resolve by hand then.
        Err(nix::errno::Errno::ENOSYS | nix::errno::Errno::EPERM) => {
            return resolve_by_hand(root, rel)
        }
        Err(e) => return Err(e.into()),
    };
    #[allow(unsafe_code)]
    // SAFETY: `fd` was just returned by openat2 and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let real = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
    // The kernel guarantees it; checked again because a path outside would be copied
    // onto the ESP and booted.
    let root_real = fs::canonicalize(root)?;
    if !real.starts_with(&root_real) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} resolves outside {}", rel.display(), root.display()),
        ));
    }
    Ok(Some(real))
}

/// What `RESOLVE_IN_ROOT` does, in user space: each component looked at with lstat,
/// a symlink's target followed from `root` (absolute) or from where it sits
/// (relative), `..` never above `root`, at most 40 links. The slot is mounted
/// read-only after its every byte was verified, so nothing changes under the walk.
pub fn resolve_by_hand(root: &Path, rel: &Path) -> io::Result<Option<PathBuf>> {
    use std::path::Component;
    let mut pending: Vec<PathBuf> = rel
        .components()
        .rev()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut at = PathBuf::new();
    let mut links = 0;
    while let Some(next) = pending.pop() {
        match next.components().next() {
            Some(Component::RootDir) => at = PathBuf::new(),
            Some(Component::ParentDir) => {
                at.pop();
            }
            Some(Component::Normal(name)) => {
                let here = root.join(&at).join(name);
                let meta = match fs::symlink_metadata(&here) {
                    Ok(m) => m,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e),
                };
                if meta.file_type().is_symlink() {
                    links += 1;
                    if links > 40 {
                        return Err(io::Error::from_raw_os_error(nix::libc::ELOOP));
                    }
                    let target = fs::read_link(&here)?;
                    pending.extend(
                        target
                            .components()
                            .rev()
                            .map(|c| PathBuf::from(c.as_os_str())),
                    );
                } else {
                    at.push(name);
                }
            }
            _ => {}
        }
    }
    Ok(Some(root.join(at)))
}

/// A kernel or initrd to copy onto the ESP, and the sha256 it must have.
#[derive(Debug, Clone, Copy)]
pub struct BootFile<'a> {
    pub path: &'a Path,
    pub sha256: [u8; 32],
}

fn mismatch(what: &str, got: &[u8], want: &[u8; 32]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{what} has sha256 {}, expected {}",
            hex::encode(got),
            hex::encode(want)
        ),
    )
}

/// Copies `src` to `dir/name` through `dir/name.tmp`: hashed on the way (a wrong source
/// is refused before anything is renamed), fsynced, read back past the page cache and
/// hashed again, then renamed into place. The caller fsyncs `dir`.
fn copy_verified(src: &BootFile<'_>, dir: &Path, name: &str) -> Result<(), BootError> {
    let tmp = dir.join(format!("{name}{TMP}"));
    let dst = dir.join(name);
    let result = (|| {
        let werr = |source| BootError::Write {
            path: tmp.clone(),
            source,
        };
        let rerr = |source| BootError::Read {
            path: src.path.to_owned(),
            source,
        };
        let mut input = HashingReader::new(File::open(src.path).map_err(rerr)?);
        let mut out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(werr)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf).map_err(rerr)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(werr)?;
        }
        let got = input.finalize();
        if got != src.sha256 {
            return Err(rerr(mismatch("the source", &got, &src.sha256)));
        }
        out.sync_all().map_err(werr)?;
        // Clean pages can be dropped after the fsync, so the read-back below comes from
        // the device. Advice only: where it is ignored we still read what was written.
        let _ = nix::fcntl::posix_fadvise(
            out.as_raw_fd(),
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
        drop(out);
        let back = File::open(&tmp).and_then(sha256_of).map_err(werr)?;
        if back != src.sha256 {
            return Err(werr(mismatch("the copy read back", &back, &src.sha256)));
        }
        fs::rename(&tmp, &dst)
            .and_then(|()| sync_renamed(&dst))
            .map_err(|source| BootError::Write {
                path: dst.clone(),
                source,
            })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies `slot`'s kernel (and initrd, if any) to `$ESP/update-agent/<slot>/` and checks
/// each against its sha256 after copying. Refused while `slot` has a boot entry (its
/// files may be in use: [`BootControl::mark_unbootable`] first). Drops the slot's
/// staged entry first, since it describes the files being replaced, and the old files
/// (to make room: an ESP is small). A release without an initrd leaves none behind.
///
/// [`BootControl::mark_unbootable`]: crate::boot::BootControl::mark_unbootable
pub fn install_kernel(
    esp: &Path,
    slot: Slot,
    kernel: &BootFile<'_>,
    initrd: Option<&BootFile<'_>>,
) -> Result<(), BootError> {
    let entries = esp.join(ENTRIES_DIR);
    let names = list_files(&entries, true)?;
    let state =
        EspState::from_names(names.iter().map(String::as_str)).map_err(|e| e.at(&entries))?;
    if state.entry(slot).is_some() {
        return Err(refused(
            "install a kernel for",
            slot,
            "it has a boot entry: mark it unbootable first",
        ));
    }
    let mut stale = Vec::new();
    if let Some(v) = state.staged(slot) {
        stale.push(staged_name(slot, v));
    }
    if state.has_temp(slot) {
        stale.push(temp_name(slot));
    }
    if !stale.is_empty() {
        run_ops(
            &entries,
            &stale.into_iter().map(Op::Remove).collect::<Vec<_>>(),
        )?;
    }

    let slot_dir =
        ensure_dirs(esp, &[KERNEL_DIR, slot.letter()]).map_err(|source| BootError::Write {
            path: esp.join(KERNEL_DIR).join(slot.letter()),
            source,
        })?;
    let werr = |source| BootError::Write {
        path: slot_dir.clone(),
        source,
    };
    for name in list_files(&slot_dir, false)? {
        remove_in(&slot_dir, &name)?;
    }
    sync_dir(&slot_dir).map_err(werr)?;
    copy_verified(kernel, &slot_dir, KERNEL_NAME)?;
    if let Some(initrd) = initrd {
        copy_verified(initrd, &slot_dir, INITRD_NAME)?;
    }
    sync_dir(&slot_dir).map_err(werr)
}
