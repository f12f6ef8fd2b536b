#!/usr/bin/env python3
"""A static file server that answers HTTP range requests, for the demo, the
benchmarks and the VM lab (python's http.server ignores Range).
Usage: range-server.py DIR PORT
Environment: RANGE_SERVER_LOG=FILE appends "PATH START END" for every response (what
was fetched); RANGE_SERVER_DELAY_MS=N waits N ms before each range response (a slow
link, so a test can cut the power mid-download), only for paths containing
RANGE_SERVER_DELAY_MATCH when that is set."""
import http.server
import os
import re
import sys
import threading
import time

LOG = os.environ.get("RANGE_SERVER_LOG")
DELAY = int(os.environ.get("RANGE_SERVER_DELAY_MS", "0")) / 1000
DELAY_MATCH = os.environ.get("RANGE_SERVER_DELAY_MATCH", "")
log_lock = threading.Lock()


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            return self.send_error(404)
        size = os.path.getsize(path)
        m = re.match(r"bytes=(\d+)-(\d+)$", self.headers.get("Range", ""))
        start, end = (int(m[1]), min(int(m[2]), size - 1)) if m else (0, size - 1)
        if m and DELAY and DELAY_MATCH in self.path:
            time.sleep(DELAY)
        if LOG:
            with log_lock, open(LOG, "a") as f:
                f.write(f"{self.path} {start} {end}\n")
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            self.wfile.write(f.read(end - start + 1))


http.server.ThreadingHTTPServer.protocol_version = "HTTP/1.1"
os.chdir(sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
