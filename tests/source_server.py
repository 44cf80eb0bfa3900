"""
A counting HTTP file server for the loopback tests (stdlib only).

    python tests/source_server.py --root DIR --bind 127.0.0.1 --port 0 \\
        --log requests.jsonl [--rate BYTES_PER_SECOND]

Serves the files under C{--root} with Content-Length, ETag and
Last-Modified; honours single C{Range} requests (206/416), C{If-Range} and
C{If-None-Match}; answers 404 for missing files.  After each request it
appends one JSON line to C{--log}::

    {"client": "127.0.0.2", "method": "GET", "path": "/big.bin", "range": null,
     "status": 200, "bytes_sent": 50331648, "complete": true, "time": ...}

where C{bytes_sent} counts body bytes actually handed to the socket (a client
hanging up early shows a short count and C{complete: false}).  Once listening
it prints C{PORT <n>} on stdout (useful with C{--port 0}).  C{--rate} caps
each response body at that many bytes per second, for tests that need a
download to stay running for a while.
"""

import argparse
import email.utils
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "CountingSource/1.0"
    root: Path
    log_path: Path
    rate = 0
    lock = threading.Lock()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _record(self, status: int, sent: int, complete: bool, rng: str | None) -> None:
        entry = {
            "time": time.time(),
            "client": self.client_address[0],
            "method": self.command,
            "path": urlsplit(self.path).path,
            "range": rng,
            "status": status,
            "bytes_sent": sent,
            "complete": complete,
        }
        with self.lock, open(self.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    def _simple(self, status: int, body: bytes, rng: str | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 0
        if self.command != "HEAD":
            self.wfile.write(body)
            sent = len(body)
        self._record(status, sent, True, rng)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        rng = self.headers.get("Range")
        relative = unquote(urlsplit(self.path).path).lstrip("/")
        path = (self.root / relative).resolve()
        if self.root not in path.parents or not path.is_file():
            self._simple(404, b"not found\n", rng)
            return
        stat = path.stat()
        size = stat.st_size
        etag = f'"{size:x}-{stat.st_mtime_ns:x}"'
        last_modified = email.utils.formatdate(stat.st_mtime, usegmt=True)
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            self._record(304, 0, True, rng)
            return
        start, end, status = 0, size - 1, 200
        if rng is not None:
            if_range = self.headers.get("If-Range")
            honour = if_range is None or if_range in (etag, last_modified)
            match = _RANGE.match(rng.strip())
            if honour and match and (match.group(1) or match.group(2)):
                first, last = match.group(1), match.group(2)
                if first:
                    start = int(first)
                    end = min(int(last), size - 1) if last else size - 1
                else:
                    start = max(0, size - int(last))
                if start >= size or start > end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self._record(416, 0, True, rng)
                    return
                status = 206
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", last_modified)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        sent = 0
        complete = True
        if self.command != "HEAD":
            try:
                chunk = min(CHUNK, max(4096, self.rate // 20)) if self.rate else CHUNK
                began = time.monotonic()
                with open(path, "rb") as f:
                    f.seek(start)
                    while sent < length:
                        data = f.read(min(chunk, length - sent))
                        if not data:
                            break
                        self.wfile.write(data)
                        sent += len(data)
                        if self.rate:
                            # Sleep until the bytes sent so far are due.
                            ahead = sent / self.rate - (time.monotonic() - began)
                            if ahead > 0:
                                time.sleep(ahead)
            except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
                self.close_connection = True
            complete = sent == length
        self._record(status, sent, complete, rng)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--rate", type=int, default=0, help="bytes per second per body")
    args = p.parse_args()
    if args.rate < 0:
        p.error("--rate must not be negative")
    Handler.root = args.root.resolve()
    Handler.rate = args.rate
    Handler.log_path = args.log
    args.log.touch()
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.daemon_threads = True
    print(f"PORT {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
