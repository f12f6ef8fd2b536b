//! State changes as journal events with stable message ids, so a fleet can alert on
//! them (`journalctl MESSAGE_ID=…`, or any journal shipper) without parsing text.
//! The ids never change meaning; new events get new ids. They are listed in
//! docs/events.md.
//!
//! Events go to the journal through a layer of their own (see `logging`) whose fields
//! are not prefixed, so `message_id` becomes the journal's own `MESSAGE_ID`; their
//! other fields are named `update_agent_*` to match the prefixed fields of ordinary
//! log lines.

/// The tracing target of events; `logging` routes it.
pub const TARGET: &str = "update_agent::event";

pub const UPDATE_STARTED: &str = "6fa1e72d7b3545c2858d703458ad19dc";
pub const UPDATE_STAGED: &str = "b07cf97f379e47a7bf055931f4441282";
pub const UPDATE_FAILED: &str = "f566b2a3dcde4ae19ebc07022cf83308";
pub const REBOOTING: &str = "94a7d1162e94424a8fe2de42fdf20e03";
pub const COMMITTED: &str = "bf282ea120214d37941cf64cf8c7ff83";
pub const ROLLED_BACK: &str = "a227d5f3e90c46ce814ad496fce2d7ab";
pub const RELEASE_HELD: &str = "387f9c8cc868470a900e8994f73c8a78";
pub const LOCK_TAKEN: &str = "9f871ac0da894a4a87566106d79a16fa";
pub const LOCK_RELEASED: &str = "2b4c1d0b41584ce29b92c7e791bce9d1";
pub const CHECK_FAILED: &str = "332320ea91b44b89aa3fb8bd4076bb73";
pub const UPDATE_CANCELLED: &str = "b7c4bc55fc32402f9d603f9fae4bac91";
pub const ROLLING_BACK: &str = "4319aa8d50f64d16b86014ec6df865ef";
pub const ROLLOUT_HALTED: &str = "864455e0c056499184d8c2dc64df1421";
pub const ROLLOUT_RESUMED: &str = "e6570f0d9a634c5b9184f709ba1322c1";

pub const KEXEC_REFUSED: &str = "5d0c2a8e4b7f4e61a3c9f1d27e8b6a40";

/// Every event id with its name, for the docs test and `updatectl`.
pub const ALL: [(&str, &str); 15] = [
    ("UPDATE_STARTED", UPDATE_STARTED),
    ("UPDATE_STAGED", UPDATE_STAGED),
    ("UPDATE_FAILED", UPDATE_FAILED),
    ("REBOOTING", REBOOTING),
    ("COMMITTED", COMMITTED),
    ("ROLLED_BACK", ROLLED_BACK),
    ("RELEASE_HELD", RELEASE_HELD),
    ("LOCK_TAKEN", LOCK_TAKEN),
    ("LOCK_RELEASED", LOCK_RELEASED),
    ("CHECK_FAILED", CHECK_FAILED),
    ("UPDATE_CANCELLED", UPDATE_CANCELLED),
    ("ROLLING_BACK", ROLLING_BACK),
    ("ROLLOUT_HALTED", ROLLOUT_HALTED),
    ("ROLLOUT_RESUMED", ROLLOUT_RESUMED),
    ("KEXEC_REFUSED", KEXEC_REFUSED),
];

/// Emits an event: `emit!(LEVEL, ID, field = value, ...; "message")`.
#[macro_export]
macro_rules! emit {
    ($level:expr, $id:expr, $($rest:tt)+) => {
        ::tracing::event!(target: "update_agent::event", $level, message_id = $id, $($rest)+)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_distinct_128_bit_hex_and_documented() {
        let mut seen = std::collections::HashSet::new();
        let doc = include_str!("../../docs/events.md");
        for (name, id) in ALL {
            assert_eq!(id.len(), 32, "{name}");
            assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{name}");
            assert!(seen.insert(id), "{name} reuses an id");
            assert!(
                doc.contains(id) && doc.contains(name),
                "docs/events.md must list {name} {id}"
            );
        }
    }

    /// Captures events to check they carry a message id.
    #[derive(Default, Clone)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>);

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct V(Option<String>);
            impl tracing::field::Visit for V {
                fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                    if f.name() == "message_id" {
                        self.0 = Some(format!("{v:?}").trim_matches('"').to_owned());
                    }
                }
                fn record_str(&mut self, f: &tracing::field::Field, v: &str) {
                    if f.name() == "message_id" {
                        self.0 = Some(v.to_owned());
                    }
                }
            }
            let mut v = V(None);
            event.record(&mut v);
            if let Ok(mut all) = self.0.lock() {
                all.push((
                    event.metadata().target().to_owned(),
                    v.0.unwrap_or_default(),
                ));
            }
        }
    }

    #[test]
    fn emit_sets_the_target_and_the_id() {
        use tracing_subscriber::prelude::*;
        let cap = Capture::default();
        let sub = tracing_subscriber::registry().with(cap.clone());
        tracing::subscriber::with_default(sub, || {
            crate::emit!(
                tracing::Level::ERROR,
                ROLLED_BACK,
                update_agent_release = "3.0",
                "rolled back"
            );
        });
        let got = cap.0.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(got, vec![(TARGET.to_owned(), ROLLED_BACK.to_owned())]);
    }
}
