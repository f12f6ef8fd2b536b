//! Small helpers of the agent: fail points, attempt ids, the error chain in one line,
//! the publisher's naming of a full payload.

use crate::timefmt;

/// Fail points stop the process at a named step, like a power cut, for the kill tests.
/// Compiled in only with the `failpoints` feature.
pub(crate) fn failpoint(name: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("UPDATE_AGENT_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    let _ = name;
}

/// `…/2.0.from-abcd.uap` → `…/2.0.full.uap`: the publisher's naming (`bundle create`).
pub(super) fn sibling_full(url: &str, version: &str) -> String {
    match url.rfind('/') {
        Some(i) => format!("{}/{version}.full.uap", &url[..i]),
        None => format!("{version}.full.uap"),
    }
}

/// A fresh attempt (operation) id: time and randomness, short enough to type.
pub fn attempt_id() -> String {
    format!("{:x}-{:04x}", timefmt::now(), rand::random::<u16>())
}

/// The whole error chain in one line, for the persistent record.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn sibling_full_url() {
        assert_eq!(
            super::sibling_full("http://h/p/2.0.from-ab.uap", "2.0"),
            "http://h/p/2.0.full.uap"
        );
        assert_eq!(
            super::sibling_full("2.0.from-ab.uap", "2.0"),
            "2.0.full.uap"
        );
    }
}
