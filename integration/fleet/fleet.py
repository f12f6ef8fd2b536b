#!/usr/bin/env python3
"""A fleet of real agents on this machine: N `update-agent serve` processes, each on
its own loop-device disk (GPT: esp, root-a, root-b, state) with small slot images, its
own machine id, socket and metrics port; a real Prometheus scraping them with the
example rules; the FleetLock test server with K slots; one payload server.

The story: 2.0 is published with waves; it fails its health check (a health.d script
that fails on 2.0), so the first wave rolls back; Prometheus fires
UpdateAgentReleaseRolledBack; every node that has not started holds. The publisher
ships 3.0; once the alert clears the rest of the fleet rolls through, never more than
K rebooting at once. Reboots are modelled as the disk tests model them: the reboot
command leaves a marker, this script stops the daemon, counts a GRUB try down (the
fragment's rules), points the kernel command line at the booted slot, runs
`update-agent boot-check`, and starts the daemon again.

Usage (root; run.sh builds and sets the paths): fleet.py --agent BIN --updatectl BIN
  [--nodes 50] [--slots 3] [--work DIR]
The last line printed is a JSON object with the measurements."""
import argparse
import concurrent.futures
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

import report
from ports import free_port

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.dirname(HERE)
IMAGE = 8 << 20  # slot image bytes
SLOT_MIB = 10
BLOCK = 4096


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)


def make_images(work):
    """v1, v2 (bad) and v3 (fixed): 8 MiB each, the version in the first block, a few
    hundred KiB changed from one to the next (as a rebuild changes a root image)."""
    rng = random.Random(17)
    base = bytearray(rng.randbytes(IMAGE))
    paths = {}
    for i, v in enumerate(["1.0", "2.0", "3.0"]):
        img = bytearray(base)
        img[:BLOCK] = f"VERSION_ID={v}\n".encode().ljust(BLOCK, b"\0")
        for b in range(i * 64, i * 64 + 64 * i):
            img[(b + 16) * BLOCK:(b + 17) * BLOCK] = rng.randbytes(BLOCK)
        paths[v] = os.path.join(work, f"v{v}.img")
        with open(paths[v], "wb") as f:
            f.write(img)
    return paths


class Node:
    def __init__(self, fleet, i):
        self.fleet, self.i = fleet, i
        self.dir = os.path.join(fleet.work, f"node{i:03d}")
        os.makedirs(os.path.join(self.dir, "health.d"))
        os.makedirs(os.path.join(self.dir, "state"))
        self.metrics_port = free_port()
        self.status_error = None
        self.proc = None
        self.loop = None
        self.reboots = []  # (start, end) of each modelled reboot
        self.rebooting = False
        self.versions = []  # versions booted, in order

    def path(self, n):
        return os.path.join(self.dir, n)

    def make_disk(self, v1):
        disk = self.path("disk.img")
        with open(disk, "wb") as f:
            f.truncate((2 * SLOT_MIB + 4) << 20)
        spec = (f"label: gpt\nsize=1MiB, type=uefi, name=esp\nsize={SLOT_MIB}MiB, name=root-a\n"
                f"size={SLOT_MIB}MiB, name=root-b\nsize=1MiB, name=state\n")
        subprocess.run(["sfdisk", "--quiet", disk], input=spec, text=True, check=True)
        self.loop = run("losetup", "--find", "--show", "--partscan", disk).stdout.strip()
        subprocess.run(["partx", "--add", self.loop], capture_output=True)
        for _ in range(200):
            if os.path.exists(self.loop + "p3"):
                break
            time.sleep(0.05)
        with open(v1, "rb") as src, open(self.loop + "p2", "r+b") as dst:
            dst.write(src.read())
            dst.flush()
            os.fsync(dst.fileno())

    def configure(self, f):
        with open(self.path("machine-id"), "w") as m:
            m.write(random.Random(f"fleet-{self.i}").randbytes(16).hex() + "\n")
        with open(self.path("cmdline"), "w") as c:
            c.write("root=PARTLABEL=root-a ro\n")
        with open(self.path("os-release"), "w") as o:
            o.write("VERSION_ID=1.0\n")
        # The release's own health check: 2.0 breaks the workloads.
        script = self.path("health.d/10-workloads")
        with open(script, "w") as s:
            s.write(f"#!/bin/sh\nif grep -qx 'VERSION_ID=2.0' {self.path('os-release')}; then\n"
                    "  echo 'workloads crash on 2.0' >&2; exit 1\nfi\necho ok\n")
        os.chmod(script, 0o755)
        g = self.path("grubenv")
        run("grub-editenv", g, "create")
        run("grub-editenv", g, "set", "ua_default=a", "ua_a_ok=1", "ua_b_ok=1")
        with open(self.path("agent.toml"), "w") as c:
            c.write(f"""compatible = "fleet-board"
state_dir = "{self.path('state')}"
keys_dir = "{f.keys}"
os_release = "{self.path('os-release')}"
[slots]
cmdline = "{self.path('cmdline')}"
root_device = "{self.loop}p2"
[boot]
grubenv = "{g}"
[api]
socket = "{self.path('agent.sock')}"
socket_group = ""
[releases]
url = "http://127.0.0.1:{f.payload_port}"
[fetch]
request_timeout_secs = 10
[health]
scripts_dir = "{self.path('health.d')}"
deadline_secs = 20
reboot_on_failure = true
reboot_command = ["touch", "{self.path('rebooted')}"]
[auto]
enabled = true
channel = "stable"
check_interval = "1m"
check_jitter = "10s"
reboot = "fleetlock"
machine_id = "{self.path('machine-id')}"
[auto.fleetlock]
url = "http://127.0.0.1:{f.lock_port}"
group = "fleet"
backoff = "1s"
max_backoff = "3s"
[auto.halt]
prometheus = "http://127.0.0.1:{f.prom_port}"
alerts = "UpdateAgentReleaseRolledBack"
timeout = "3s"
recheck = "2s"
[metrics]
listen = "127.0.0.1:{self.metrics_port}"
""")

    def start(self):
        self.err = open(self.path("daemon.log"), "a")
        self.proc = subprocess.Popen(
            [self.fleet.agent, "--config", self.path("agent.toml"), "serve"],
            stdout=subprocess.DEVNULL, stderr=self.err)

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def grub(self):
        out = run("grub-editenv", self.path("grubenv"), "list").stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def boot(self):
        """What the GRUB fragment does at boot: a trial of the non-default slot counts
        a try down first; tries used up clear the trial."""
        g, genv = self.grub(), self.path("grubenv")
        default = "b" if g.get("ua_default") == "b" else "a"
        trial, slot = g.get("ua_trial", ""), default
        if trial in ("a", "b") and trial != default and g.get(f"ua_{trial}_ok") != "0":
            tries = int(g.get("ua_tries") or 0)
            if tries > 0:
                run("grub-editenv", genv, "set", f"ua_tries={tries - 1}")
                slot = trial
            else:
                run("grub-editenv", genv, "set", "ua_trial=", "ua_tries=0")
        part = self.loop + ("p2" if slot == "a" else "p3")
        with open(part, "rb") as p:
            version = p.read(64).split(b"\n")[0].decode(errors="replace")
        with open(self.path("cmdline"), "w") as c:
            c.write(f"root=PARTLABEL=root-{slot} ro\n")
        with open(self.path("os-release"), "w") as o:
            o.write(version + "\n")
        cfg = open(self.path("agent.toml")).read()
        cfg = re.sub(r'root_device = ".*"', f'root_device = "{part}"', cfg)
        open(self.path("agent.toml"), "w").write(cfg)
        self.versions.append(version.removeprefix("VERSION_ID="))

    def reboot(self):
        """The daemon asked for a reboot: model one, with the health gate."""
        t0 = time.monotonic()
        self.rebooting = True
        self.fleet.reboot_started(self)
        self.stop()
        while True:
            os.unlink(self.path("rebooted"))
            self.boot()
            r = subprocess.run([self.fleet.agent, "--config", self.path("agent.toml"), "boot-check"],
                               capture_output=True, text=True)
            with open(self.path("boot-check.log"), "a") as f:
                f.write(r.stdout + r.stderr)
            if not os.path.exists(self.path("rebooted")):
                break
            # The gate rolled back and asked for the rollback's reboot.
            self.fleet.rolled_back(self)
        self.start()
        self.rebooting = False
        self.reboots.append((t0, time.monotonic()))
        self.fleet.reboot_ended(self)

    def status(self):
        r = subprocess.run([self.fleet.updatectl, "--socket", self.path("agent.sock"), "status", "--json"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            self.status_error = f"exit {r.returncode}: {r.stderr.strip()[-300:]}"
            return None
        return json.loads(r.stdout)

    def history(self):
        p = self.path("state/history.json")
        try:
            return json.load(open(p))
        except (OSError, ValueError):
            return None

    def cpu_rss(self):
        """(CPU seconds, RSS KiB) of the daemon now."""
        if not self.proc:
            return None
        try:
            stat = open(f"/proc/{self.proc.pid}/stat").read().rsplit(")", 1)[1].split()
            rss = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{self.proc.pid}/status").read())[1])
        except (OSError, TypeError):
            return None
        return (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK"), rss


def position(machine_id):
    """policy::wave::position: the node's place in the rollout, in [0, 100)."""
    import hashlib
    d = hashlib.sha256(b"update-agent rollout position\0" + machine_id.encode()).digest()
    return (int.from_bytes(d[:8], "big") >> 11) / (1 << 53) * 100


def machine_ids(n, first_wave):
    """n machine ids, exactly `first_wave` of them in the first wave (position < 10)
    and none between 10 and 12, so a small fleet still has a canary wave."""
    rng, first, rest = random.Random(1717), [], []
    while len(first) < first_wave or len(rest) < n - first_wave:
        mid = rng.randbytes(16).hex()
        p = position(mid)
        if p < 10 and len(first) < first_wave:
            first.append(mid)
        elif p >= 12 and len(rest) < n - first_wave:
            rest.append(mid)
    return first + rest


class Fleet:
    def __init__(self, a):
        self.agent, self.updatectl = a.agent, a.updatectl
        self.n, self.k = a.nodes, a.slots
        self.work = a.work
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.procs, self.nodes = [], []
        self.lock = threading.Lock()
        self.rebooting = self.max_rebooting = 0
        self.first_rollback = None
        self.events = []

    def path(self, n):
        return os.path.join(self.work, n)

    def reboot_started(self, node):
        with self.lock:
            self.rebooting += 1
            self.max_rebooting = max(self.max_rebooting, self.rebooting)

    def reboot_ended(self, node):
        with self.lock:
            self.rebooting -= 1

    def rolled_back(self, node):
        with self.lock:
            if self.first_rollback is None:
                self.first_rollback = time.monotonic()
                log(f"first rollback: node {node.i}")

    def spawn(self, cmd, env=None, out=None):
        p = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=out or subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, text=True)
        self.procs.append(p)
        return p

    def servers(self):
        os.makedirs(self.path("payloads"))
        self.payload_port = free_port()
        self.spawn(["python3", f"{INTEGRATION}/range-server.py", self.path("payloads"), str(self.payload_port)],
                   {"RANGE_SERVER_LOG": self.path("range.log")})
        p = self.spawn(["python3", f"{INTEGRATION}/fleetlock-server.py", "0", str(self.k)],
                       {"FLEETLOCK_LOG": self.path("fleetlock.log")}, subprocess.PIPE)
        self.lock_port = int(p.stdout.readline().strip().rsplit(":", 1)[1])
        self.prom_port = free_port()

    def prometheus(self, alert_range):
        rules = open(f"{INTEGRATION}/prometheus/rules.yml").read().replace("[1h]", f"[{alert_range}]")
        open(self.path("rules.yml"), "w").write(rules)
        targets = ", ".join(f'"127.0.0.1:{n.metrics_port}"' for n in self.nodes)
        open(self.path("prometheus.yml"), "w").write(
            "global:\n  scrape_interval: 2s\n  evaluation_interval: 2s\n"
            f"rule_files: [\"{self.path('rules.yml')}\"]\n"
            f"scrape_configs:\n  - job_name: agents\n    static_configs:\n      - targets: [{targets}]\n")
        run("promtool", "check", "config", self.path("prometheus.yml"))
        self.spawn(["prometheus", f"--config.file={self.path('prometheus.yml')}",
                    f"--storage.tsdb.path={self.path('tsdb')}",
                    f"--web.listen-address=127.0.0.1:{self.prom_port}"])
        wait_for(lambda: http_ok(f"http://127.0.0.1:{self.prom_port}/-/ready"), 60, "prometheus ready")

    def all_up(self):
        q = f"http://127.0.0.1:{self.prom_port}/api/v1/query?query=sum(up)"
        try:
            with urllib.request.urlopen(q, timeout=2) as r:
                res = json.load(r)["data"]["result"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(res) and float(res[0]["value"][1]) == self.n

    def firing(self):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.prom_port}/api/v1/alerts", timeout=2) as r:
                alerts = json.load(r)["data"]["alerts"]
        except (OSError, ValueError, KeyError):
            return None
        return [a for a in alerts if a["state"] == "firing"]

    def publish(self, version, waves):
        key = self.path("keys/update-agent.key")
        run(self.updatectl, "bundle", "create", "--target", self.images[version],
            *([] if version == "1.0" else ["--source", self.images["1.0"]]),
            "--version", version, "--compatible", "fleet-board", "--key", key, "--out", self.path("payloads"))
        run(self.updatectl, "bundle", "publish", "--channel", "stable", "--dir", self.path("payloads"),
            "--version", version, "--key", key, *sum((["--wave", w] for w in waves), []))
        log(f"published {version} (waves {' '.join(waves) or 'none'})")

    def setup(self):
        self.images = make_images(self.work)
        import hashlib
        self.v1_sha256 = hashlib.sha256(open(self.images["1.0"], "rb").read()).hexdigest()
        run(self.updatectl, "bundle", "keygen", "--out", self.path("keys"))
        self.keys = self.path("keys.d")
        os.makedirs(self.keys)
        shutil.copy(self.path("keys/update-agent.pub"), self.keys)
        self.servers()
        first = max(1, round(self.n / 10))
        self.first_wave = first
        for i, mid in enumerate(machine_ids(self.n, first)):
            node = Node(self, i)
            node.make_disk(self.images["1.0"])
            node.configure(self)
            open(node.path("machine-id"), "w").write(mid + "\n")
            # What an agent records when it commits a release: slot a holds 1.0 with
            # this sha256, so the node asks for the delta from it (a node provisioned
            # from an image without this record takes the full payload, reusing blocks).
            json.dump({"a": {"version": "1.0", "sha256": self.v1_sha256}},
                      open(node.path("state/images.json"), "w"))
            self.nodes.append(node)
        log(f"{self.n} nodes on loop devices, {first} in the first wave")

    def watch(self):
        """Reboots nodes whose daemon asked for one, each on a thread of its own."""
        while not self.done:
            for node in self.nodes:
                if not node.rebooting and node.proc and os.path.exists(node.path("rebooted")):
                    node.rebooting = True
                    threading.Thread(target=node.reboot, daemon=True).start()
            time.sleep(0.1)

    def cleanup(self):
        self.done = True
        for node in self.nodes:
            node.stop()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for node in self.nodes:
            if node.loop:
                subprocess.run(["losetup", "-d", node.loop], capture_output=True)


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(cond, secs, what):
    end = time.monotonic() + secs
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"fleet: timed out after {secs}s waiting for {what}")


def sampler(f, out):
    """Every 0.25 s: each daemon's RSS (the peak is kept) and CPU time (summed over the
    processes a node ran: every modelled reboot starts a new one)."""
    while not f.done:
        for node in f.nodes:
            s, proc = node.cpu_rss(), node.proc
            if s and proc:
                u = out.setdefault(node.i, {"rss": 0, "cpu": {}})
                u["rss"] = max(u["rss"], s[1])
                u["cpu"][proc.pid] = s[0]
        time.sleep(0.25)


def idle(f, secs=10):
    """Per agent: RSS (KiB) and CPU share (%) over `secs` with nothing to do."""
    before = {n.i: n.cpu_rss() for n in f.nodes}
    time.sleep(secs)
    after = {n.i: n.cpu_rss() for n in f.nodes}
    cpu = [(after[i][0] - before[i][0]) / secs * 100 for i in before if before[i] and after[i]]
    rss = [after[i][1] for i in after if after[i]]
    return cpu, rss


def history_versions(node):
    h = node.history()
    return {(e.get("version"), e.get("outcome")) for e in (h if isinstance(h, list) else [])}


def served_bytes(f):
    total = 0
    for line in open(f.path("range.log")):
        p, _, _, sent = line.split()
        if p.endswith(".uap") and sent != "-":
            total += int(sent)
    return total


def delta_size(f, version):
    names = [n for n in os.listdir(f.path("payloads")) if n.startswith(f"{version}.from-")]
    return os.path.getsize(f.path(f"payloads/{names[0]}"))


def scenario(f, a):
    f.setup()
    f.done = False
    f.prometheus(a.alert_range)
    t0 = time.monotonic()
    # The first wave starts 20 s after publication: Prometheus must have scraped each
    # node's rollback counter at 0 before it can see it grow (increase() needs two
    # samples). The later waves leave time for the canaries to fail and the alert to
    # fire.
    f.publish("2.0", ["20s:10", "60s:12", "100s:100"])
    for node in f.nodes:
        node.start()
    threading.Thread(target=f.watch, daemon=True).start()
    t_started = time.monotonic()
    try:
        wait_for(lambda: f.all_up(), 15, "Prometheus to scrape every node")
    except SystemExit:
        report.down(f)
        raise
    log(f"Prometheus scraped every node {time.monotonic() - t_started:.1f}s after they started")
    usage = {}
    threading.Thread(target=sampler, args=(f, usage), daemon=True).start()
    first = f.nodes[:f.first_wave]
    wait_for(lambda: all(("2.0", "rolled_back") in history_versions(n) for n in first), 180,
             "the first wave to roll back 2.0")
    fired = wait_for(lambda: f.firing(), 120, "UpdateAgentReleaseRolledBack to fire")
    t_fired = time.monotonic()
    log(f"alert firing ({len(fired)} instances), {t_fired - f.first_rollback:.1f}s after the first rollback")
    # Every later node reaches its wave (by 90 s) and holds there.
    rest = f.nodes[f.first_wave:]

    # A node counts once it was seen held (whether it later took 2.0 anyway is counted
    # at the end): one pass over 45 nodes, one `updatectl status` each, takes seconds,
    # and requiring every node in the same pass let one slow or failed call make the
    # whole fleet miss the alert's window (its 2 m range) now and then.
    held, failed_calls = set(), {}

    def all_held():
        todo = [n for n in rest if n.i not in held]
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            for n, s in zip(todo, pool.map(lambda n: n.status(), todo)):
                if s is None:
                    failed_calls[n.i] = n.status_error
                elif (s.get("auto") or {}).get("halted_by"):
                    held.add(n.i)
        return len(held) == len(rest)
    wait_for(all_held, 150, "every node that has not started to be held")
    t_held = time.monotonic()
    log(f"all {len(rest)} later nodes held, {t_held - f.first_rollback:.1f}s after the first rollback")
    for i, err in sorted(failed_calls.items()):
        log(f"node{i:03d}: a status call failed meanwhile ({err})")
    took_bad = sum(1 for n in f.nodes if "2.0" in n.versions)
    f.publish("3.0", [])
    t_fix = time.monotonic()
    wait_for(lambda: not f.firing(), a.timeout, "the alert to clear")
    t_clear = time.monotonic()
    log(f"alert cleared {t_clear - t_fix:.1f}s after 3.0 was published")
    wait_for(lambda: all(n.versions[-1:] == ["3.0"] and ("3.0", "committed") in history_versions(n)
                         for n in f.nodes), a.timeout, "the whole fleet on 3.0")
    t_done = time.monotonic()
    log(f"whole fleet on 3.0, {t_done - t_clear:.1f}s after the alert cleared")
    # Let the last slots go back, then measure an idle fleet.
    time.sleep(3)
    cpu, rss = idle(f)
    holders = [json.loads(line)["holders"] for line in open(f.path("fleetlock.log"))]
    served = served_bytes(f)
    ideal = delta_size(f, "2.0") * took_bad + delta_size(f, "3.0") * f.n
    peak = [u["rss"] for u in usage.values()]
    cpu_run = [sum(u["cpu"].values()) for u in usage.values()]
    result = {
        "nodes": f.n,
        "first_wave_nodes": f.first_wave,
        "took_bad_release": took_bad,
        "fleetlock_slots": f.k,
        "max_concurrent_reboots": f.max_rebooting,
        "max_fleetlock_holders": max((len(h) for h in holders), default=0),
        "served_bytes": served,
        "ideal_bytes": ideal,
        "served_over_ideal": round(served / ideal, 4) if ideal else None,
        "first_rollback_to_alert_s": round(t_fired - f.first_rollback, 1),
        "first_rollback_to_fleet_held_s": round(t_held - f.first_rollback, 1),
        "fix_to_alert_clear_s": round(t_clear - t_fix, 1),
        "alert_clear_to_fleet_done_s": round(t_done - t_clear, 1),
        "total_s": round(t_done - t0, 1),
        "idle_rss_kib_median": statistics.median(rss),
        "idle_cpu_percent_mean": round(statistics.mean(cpu), 4),
        "peak_rss_kib_median": statistics.median(peak),
        "peak_rss_kib_max": max(peak),
        "rollout_cpu_s_per_agent_median": round(statistics.median(cpu_run), 2),
    }
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agent", required=True)
    ap.add_argument("--updatectl", required=True)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--work", default="/var/tmp/update-agent-fleet")
    ap.add_argument("--alert-range", default="2m",
                    help="the rule's [1h] range, shortened so a run clears the alert in minutes")
    ap.add_argument("--timeout", type=int, default=600)
    a = ap.parse_args()
    f = Fleet(a)
    try:
        result = scenario(f, a)
    except SystemExit:
        report.nodes(f)
        raise
    finally:
        f.cleanup()
    ok = (result["took_bad_release"] == result["first_wave_nodes"]
          and result["max_concurrent_reboots"] <= result["fleetlock_slots"]
          and result["max_fleetlock_holders"] <= result["fleetlock_slots"])
    print(json.dumps(result), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
