//! update-agent: A/B atomic updates for immutable Linux hosts.
//!
//! Rooms (see ARCHITECTURE.md): [`payload`] owns the signed delta format and its
//! generator; [`apply`] turns a payload into a slot image; [`file_target`] is the
//! file-backed slot used by the offline tools; [`daemon`] is the daemon itself
//! (operations, status, the unattended loop) and [`api`] serves it over gRPC; [`cli`] is `updatectl`; [`policy`] decides unattended patching and
//! [`fleetlock`] coordinates its reboots, [`halt`] stops them on the fleet's alerts; [`metrics`] renders Prometheus text.

pub mod api;
pub mod apply;
pub mod blockio;
pub mod boot;
pub mod cause;
pub mod channel;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod durable;
pub mod events;
pub mod fetch;
pub mod file_target;
pub mod fleetlock;
pub mod halt;
pub mod hashio;
pub mod health;
pub mod history;
pub mod kexec;
pub mod logging;
pub mod metrics;
pub mod midstate;
pub mod partial;
pub mod payload;
pub mod policy;
pub mod postboot;
pub mod pstore;
pub mod reboot_method;
pub mod slots;
pub mod state;
pub mod timefmt;
pub mod trust;
pub mod update;
pub mod verity;
pub mod version;
