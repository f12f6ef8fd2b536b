#!/usr/bin/env python3
"""A FleetLock server (the reboot-manager protocol Zincati speaks), for the tests, the
demo and the VM lab: a counting semaphore per group, locks owned by client id, both
operations recursive, as the protocol describes.

Usage: fleetlock-server.py PORT [SLOTS]     (SLOTS: reboot slots per group, default 1)
Environment: FLEETLOCK_LOG=FILE appends one JSON line per request:
  {"op": "pre-reboot", "id": ..., "group": ..., "ok": true, "holders": [...]}
Prints "listening on 127.0.0.1:PORT" once it accepts connections (PORT 0 picks one).
Refusals follow the protocol: a non-200 status and {"kind": ..., "value": ...}."""
import http.server
import json
import os
import sys
import threading

LOG = os.environ.get("FLEETLOCK_LOG")
SLOTS = int(sys.argv[2]) if len(sys.argv) > 2 else 1
lock = threading.Lock()
holders = {}  # group -> list of ids


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def refuse(self, status, kind, value):
        body = json.dumps({"kind": kind, "value": value}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        op = {"/v1/pre-reboot": "pre-reboot", "/v1/steady-state": "steady-state"}.get(self.path)
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        if op is None:
            return self.refuse(404, "unknown_endpoint", self.path)
        if self.headers.get("fleet-lock-protocol") != "true":
            return self.refuse(400, "missing_header", "fleet-lock-protocol: true is required")
        try:
            params = json.loads(raw)["client_params"]
            cid, group = params["id"], params["group"]
            assert isinstance(cid, str) and cid and isinstance(group, str) and group
        except Exception:
            return self.refuse(400, "bad_body", "client_params.id and .group must be non-empty strings")
        with lock:
            held = holders.setdefault(group, [])
            if op == "pre-reboot":
                ok = cid in held or len(held) < SLOTS
                if ok and cid not in held:
                    held.append(cid)
            else:
                ok = True
                if cid in held:
                    held.remove(cid)
            if LOG:
                with open(LOG, "a") as f:
                    f.write(json.dumps({"op": op, "id": cid, "group": group, "ok": ok, "holders": list(held)}) + "\n")
            snapshot = list(held)
        if not ok:
            return self.refuse(409, "failed_lock", f"group {group}: all {SLOTS} reboot slots are held ({', '.join(snapshot)})")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
print(f"listening on 127.0.0.1:{server.server_address[1]}", flush=True)
server.serve_forever()
