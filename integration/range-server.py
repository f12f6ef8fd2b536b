#!/usr/bin/env python3
"""A static file server that answers HTTP range requests, for the demo, the
benchmarks and the VM lab (python's http.server ignores Range).
Usage: range-server.py DIR PORT
Environment: RANGE_SERVER_LOG=FILE appends "PATH START END -" when a response starts
and "PATH START END SENT" when it ends (the body bytes that reached the socket); RANGE_SERVER_DELAY_MS=N
waits N ms before each range response (a slow link, so a test can cut the power
mid-download); RANGE_SERVER_RATE=N sends range bodies at N bytes a second;
RANGE_SERVER_CUT_AFTER=N closes the connection after N bytes of every body (a link
that drops). The last three apply only to paths containing RANGE_SERVER_DELAY_MATCH
when that is set."""
import http.server
import os
import re
import sys
import threading
import time

LOG = os.environ.get("RANGE_SERVER_LOG")
DELAY = int(os.environ.get("RANGE_SERVER_DELAY_MS", "0")) / 1000
RATE = int(os.environ.get("RANGE_SERVER_RATE", "0"))
CUT = int(os.environ.get("RANGE_SERVER_CUT_AFTER", "0"))
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
        faulty = m and DELAY_MATCH in self.path
        if faulty and DELAY:
            time.sleep(DELAY)
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start + 1)
        if LOG:
            # A line when the body starts ("-"), another with what was sent at its end.
            with log_lock, open(LOG, "a") as f:
                f.write(f"{self.path} {start} {end} -\n")
        cut = faulty and CUT and len(body) > CUT
        if cut:
            body = body[:CUT]
        sent = 0
        try:
            if faulty and RATE:
                # Paced from the start, 20 slices a second.
                step, t0 = max(1, RATE // 20), time.monotonic()
                for i in range(0, len(body), step):
                    wait = t0 + i / RATE - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self.wfile.write(body[i:i + step])
                    sent += len(body[i:i + step])
            else:
                self.wfile.write(body)
                sent = len(body)
        except (BrokenPipeError, ConnectionResetError):
            # The client went away (killed, or the VM lost its power): not an error here.
            self.close_connection = True
        finally:
            if LOG:
                with log_lock, open(LOG, "a") as f:
                    f.write(f"{self.path} {start} {end} {sent}\n")
        if cut:
            self.close_connection = True


http.server.ThreadingHTTPServer.protocol_version = "HTTP/1.1"
http.server.ThreadingHTTPServer.daemon_threads = True
os.chdir(sys.argv[1])
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
