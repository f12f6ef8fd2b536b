//! Journal events reach the journal's native protocol with their `MESSAGE_ID`, and
//! ordinary log lines keep the `UPDATE_AGENT_` prefix. The agent runs with
//! `JOURNAL_STREAM` set in a private mount namespace whose `/run` is a fresh tmpfs,
//! where a small listener owns `/run/systemd/journal/socket` and decodes each
//! datagram (both the `KEY=value` and the length-prefixed binary form).

use super::*;

const LISTENER: &str = r#"
import json, os, socket, struct, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
open(sys.argv[2] + ".ready", "w").close()
out = open(sys.argv[2], "a")
while True:
    data = s.recv(1 << 20)
    fields, i = {}, 0
    while i < len(data):
        nl = data.index(b"\n", i)
        line = data[i:nl]
        if b"=" in line:
            k, v = line.split(b"=", 1)
            i = nl + 1
        else:
            k = line
            (n,) = struct.unpack("<Q", data[nl + 1:nl + 9])
            v = data[nl + 9:nl + 9 + n]
            i = nl + 9 + n + 1
        fields[k.decode()] = v.decode("utf-8", "replace")
    out.write(json.dumps(fields) + "\n")
    out.flush()
"#;

/// Runs `update-agent ARGS` as systemd would (journal stream set) and returns every
/// journal entry it sent.
fn journal_of(n: &Node, args: &str, name: &str) -> Vec<HashMap<String, String>> {
    let out = n.path(name);
    fs::write(n.path("listener.py"), LISTENER).expect("listener");
    let script = format!(
        "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/systemd/journal; \
         python3 {listener} /run/systemd/journal/socket {out} >/dev/null 2>&1 & l=$!; \
         while [ ! -e {out}.ready ]; do sleep 0.02; done; \
         rc=0; JOURNAL_STREAM=8:8 {agent} --config {config} {args} || rc=$?; \
         sleep 0.3; kill $l; exit $rc",
        listener = n.path("listener.py").display(),
        out = out.display(),
        agent = env!("CARGO_BIN_EXE_update-agent"),
        config = n.config.display(),
    );
    let o = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare");
    assert!(o.status.success(), "{}", text(&o));
    fs::read_to_string(&out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("entry"))
        .collect()
}

/// The entries with `MESSAGE_ID` `id`.
fn events<'a>(
    entries: &'a [HashMap<String, String>],
    id: &str,
) -> Vec<&'a HashMap<String, String>> {
    entries
        .iter()
        .filter(|e| e.get("MESSAGE_ID").map(String::as_str) == Some(id))
        .collect()
}

/// The first entry with `MESSAGE_ID` `id`.
fn event<'a>(entries: &'a [HashMap<String, String>], id: &str) -> &'a HashMap<String, String> {
    events(entries, id)
        .first()
        .copied()
        .unwrap_or_else(|| panic!("no event {id}: {entries:#?}"))
}

#[test]
fn state_changes_are_journal_events_with_message_ids() {
    let n = Node::new();
    let delta = n.publish("2.0", "test-board", &n.path("v2.img"), 1 << 20);
    let o = n.agent(&["stage", &n.server.url(&delta)], &[]);
    assert!(o.status.success(), "{}", text(&o));
    n.boot_into("b");
    let entries = journal_of(&n, "boot-check", "commit.jsonl");
    let committed = events(&entries, update_agent::events::COMMITTED);
    assert_eq!(committed.len(), 1, "{entries:#?}");
    let c = committed[0];
    assert_eq!(
        c.get("UPDATE_AGENT_RELEASE").map(String::as_str),
        Some("2.0")
    );
    assert_eq!(c.get("UPDATE_AGENT_SLOT").map(String::as_str), Some("b"));
    // tracing-journald maps INFO to notice (5).
    assert_eq!(c.get("PRIORITY").map(String::as_str), Some("5"));
    assert!(c["MESSAGE"].contains("committed 2.0"), "{c:?}");
    // Ordinary lines: prefixed fields, no message id.
    let line = entries
        .iter()
        .find(|e| e.get("UPDATE_AGENT_PHASE").map(String::as_str) == Some("committed"))
        .unwrap_or_else(|| panic!("no committed log line: {entries:#?}"));
    assert!(!line.contains_key("MESSAGE_ID"), "{line:?}");
    assert_eq!(
        line.get("UPDATE_AGENT_RELEASE").map(String::as_str),
        Some("2.0")
    );

    // A manual rollback (ROLLING_BACK), then the boot into the old slot: ROLLED_BACK,
    // cause manual.
    let entries = journal_of(&n, "rollback", "rolling-back.jsonl");
    let rb = event(&entries, update_agent::events::ROLLING_BACK);
    assert_eq!(
        rb.get("UPDATE_AGENT_CAUSE").map(String::as_str),
        Some("manual")
    );
    assert_eq!(rb.get("UPDATE_AGENT_SLOT").map(String::as_str), Some("a"));
    n.boot_into("a");
    let entries = journal_of(&n, "boot-check", "rollback.jsonl");
    let rb = event(&entries, update_agent::events::ROLLED_BACK);
    assert_eq!(
        rb.get("UPDATE_AGENT_CAUSE").map(String::as_str),
        Some("manual")
    );
    assert_eq!(rb.get("PRIORITY").map(String::as_str), Some("3"));
    assert_eq!(
        rb.get("UPDATE_AGENT_RELEASE").map(String::as_str),
        Some("2.0")
    );
    let history: serde_json::Value =
        serde_json::from_slice(&fs::read(n.path("state/history.json")).expect("history"))
            .expect("json");
    let last = history.as_array().and_then(|a| a.last()).expect("entry");
    assert_eq!(last["cause"], "manual", "{last}");
}
