//! Logging: to the journal with structured fields when running under systemd
//! (`JOURNAL_STREAM` is set), readable text on stderr otherwise. `RUST_LOG` filters
//! (default `info`).
//!
//! Fields every event of an attempt carries: `release`, `slot`, `phase`, `attempt`,
//! so `journalctl UPDATE_AGENT_PHASE=rolled_back` finds every rollback. State changes
//! (see [`crate::events`]) go through a second journal layer without the prefix, so
//! their `message_id` is the journal's `MESSAGE_ID`.

use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::prelude::*;
use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let layers = journal
        .then(|| {
            let lines = tracing_journald::layer().ok()?;
            let events = tracing_journald::layer().ok()?;
            Some((lines, events))
        })
        .flatten();
    let registry = tracing_subscriber::registry();
    match layers {
        Some((lines, events)) => {
            // RUST_LOG filters log lines only: state-change events always reach the
            // journal (a fleet alerts on them), whatever the verbosity.
            let is_event = |m: &tracing::Metadata<'_>| m.target() == crate::events::TARGET;
            let _ = registry
                .with(
                    lines
                        .with_field_prefix(Some("UPDATE_AGENT".into()))
                        .with_filter(filter_fn(move |m| !is_event(m)))
                        .with_filter(filter),
                )
                .with(
                    events
                        .with_field_prefix(None)
                        .with_filter(filter_fn(is_event)),
                )
                .try_init();
        }
        None => {
            let _ = registry
                .with(
                    tracing_subscriber::fmt::layer()
                        .with_writer(std::io::stderr)
                        .with_target(false)
                        .with_filter(filter),
                )
                .try_init();
        }
    }
}
