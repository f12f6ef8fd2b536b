//! Tests of the systemd-boot backend, by concern.

mod backend;
mod entry;
mod fs;
mod guard;
mod names;
mod order;
mod state;
