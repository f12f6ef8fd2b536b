//! Logging: to the journal with structured fields when running under systemd
//! (`JOURNAL_STREAM` is set), readable text on stderr otherwise. `RUST_LOG` filters
//! (default `info`).
//!
//! Fields every event of an attempt carries: `release`, `slot`, `phase`, `attempt`,
//! so `journalctl UPDATE_AGENT_PHASE=rolled_back` finds every rollback.

use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM")
        .is_some()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| l.with_field_prefix(Some("UPDATE_AGENT".into())));
    let registry = tracing_subscriber::registry().with(filter);
    match journald {
        Some(j) => {
            let _ = registry.with(j).try_init();
        }
        None => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_target(false),
                )
                .try_init();
        }
    }
}
