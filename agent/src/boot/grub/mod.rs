//! GRUB backend: the A/B state lives in GRUB's environment block (`grubenv`), which
//! the script `bootloader-hooks/grub/update-agent.cfg` reads with `load_env` at every
//! boot and updates with `save_env` while it counts trial boots down.
//!
//! ```text
//! env.rs    the block: bytes ⇄ GrubEnv (every line kept), exactly as grub-editenv
//! state.rs  the A/B rules: GrubState (the five ua_* variables) and its transitions
//! file.rs   Grub, the BootControl over one grubenv file, written in place
//! tests/    each against the real grub-editenv; fragment.rs: the GRUB script
//!           fragment and the /etc/grub.d helper
//! ```

mod env;
mod file;
mod state;
#[cfg(test)]
mod tests;

pub use env::{EnvError, GrubEnv, BLOCK_SIZE, EDITENV_WARNING, SIGNATURE};
pub use file::Grub;
pub use state::{
    GrubState, MAX_TRIES, OWNED_VARS, VAR_A_OK, VAR_BOOTS, VAR_B_OK, VAR_DEFAULT, VAR_FALLEN,
    VAR_TRIAL, VAR_TRIES,
};
