//! The GRUB backend against the real GRUB tools: `grub-editenv` for the block,
//! `grub-script-check` for the script fragment.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::boot::{BootControl, BootError, BootStatus};
use crate::slots::Slot;

mod env;
mod file;
mod fragment;
mod state;

const GRUB_EDITENV: &str = "/usr/bin/grub-editenv";
const GRUB_SCRIPT_CHECK: &str = "/usr/bin/grub-script-check";

/// The real GRUB tools are the reference; their absence is a failure, not a skip.
fn tool(path: &'static str) -> &'static str {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install grub-common (apt-get install -y grub-common); \
         these tests check the grubenv code and the GRUB script against the real GRUB tools"
    );
    path
}

fn editenv(file: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new(tool(GRUB_EDITENV))
        .arg(file)
        .args(args)
        .output()
        .expect("running grub-editenv");
    assert!(
        out.status.success(),
        "grub-editenv {} {args:?} failed: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `grub-editenv create`, then one `set` of `sets` if any.
fn editenv_file(dir: &Path, name: &str, sets: &[&str]) -> PathBuf {
    let file = dir.join(name);
    editenv(&file, &["create"]);
    if !sets.is_empty() {
        let mut args = vec!["set"];
        args.extend_from_slice(sets);
        editenv(&file, &args);
    }
    file
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("creating a temp dir")
}

fn bytes(path: &Path) -> Vec<u8> {
    fs::read(path).expect("reading a test file")
}

fn copy(from: &Path, to: &Path) {
    fs::copy(from, to).expect("copying a test file");
}

/// A block with `content` after the header, padded with '#'.
fn block(content: &[u8]) -> Vec<u8> {
    let mut b = SIGNATURE.to_vec();
    b.extend_from_slice(content);
    b.resize(BLOCK_SIZE, b'#');
    b
}

fn parse(content: &[u8]) -> Result<GrubEnv, EnvError> {
    GrubEnv::parse(&block(content))
}

fn state(content: &[u8]) -> Result<GrubState, EnvError> {
    GrubState::from_env(&parse(content)?)
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches('#').to_string()
}

/// Sets `sets` with grub-editenv on `theirs` and checks it now equals `ours`.
fn same_as_editenv(ours: &Path, theirs: &Path, sets: &[&str]) {
    let mut args = vec!["set"];
    args.extend_from_slice(sets);
    editenv(theirs, &args);
    let (o, t) = (bytes(ours), bytes(theirs));
    assert!(
        o == t,
        "after {sets:?}\nours:\n{}\ngrub-editenv:\n{}",
        show(&o),
        show(&t)
    );
}

fn open(path: &Path) -> Grub {
    Grub::open(path).expect("opening a test grubenv")
}

fn status(grub: &Grub) -> BootStatus {
    grub.status().expect("status of a test grubenv")
}
