"""What fleet.py prints when a wait fails: where each node is, so the log says which
one stalled and why, without a rerun."""
import json
import time
import urllib.request


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tail(node, size):
    return open(node.path("daemon.log"), errors="replace").read()[-size:]


def running(node):
    proc = node.proc  # the watch thread may set it to None meanwhile
    return proc.poll() if proc else "not running"


def nodes(f):
    """Each node's state, versions and failed status call; the daemon logs of those not
    held on a release of their own (1.0 or 3.0)."""
    for node in f.nodes:
        st = node.status() or {}
        auto = st.get("auto") or {}
        h = node.history()
        last = h[-1] if isinstance(h, list) and h else {}
        log(f"node{node.i:03d}: daemon {'running' if running(node) is None else 'not running'}, "
            f"state {st.get('state')}, running {st.get('running_version')}, "
            f"halted_by {auto.get('halted_by')}, booted {node.versions}, "
            f"last outcome {last.get('version')} {last.get('outcome')}"
            + ("" if st else f", status: {node.status_error}"))
        if not (auto.get("halted_by") and st.get("running_version") in ("1.0", "3.0")):
            log(f"node{node.i:03d} daemon log ends:\n{tail(node, 1500)}")


def down(f):
    """Names each node Prometheus cannot scrape, with its daemon's last words."""
    q = f"http://127.0.0.1:{f.prom_port}/api/v1/targets"
    try:
        with urllib.request.urlopen(q, timeout=2) as r:
            targets = json.load(r)["data"]["activeTargets"]
    except (OSError, ValueError, KeyError) as e:
        log(f"cannot ask Prometheus for its targets: {e}")
        return
    down = {t["labels"]["instance"]: t.get("lastError", "") for t in targets if t.get("health") != "up"}
    for node in f.nodes:
        err = down.get(f"127.0.0.1:{node.metrics_port}")
        if err is not None:
            log(f"node{node.i:03d} not scraped ({err or 'not yet'}); daemon exit {running(node)}; "
                f"log ends:\n{tail(node, 600)}")
