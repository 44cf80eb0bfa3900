"""
The bench's HTTP sources, run as their own process (stdlib only)::

    python -m dragonfly.bench.sources --port 18080 --root DIR [--rate 20M]

It serves

  - C{/<name>}: the files under C{--root};
  - C{/gen/<size>.bin}: C{size} bytes of deterministic content made on the
    fly (L{generated}), so that a 4 GiB source needs no 4 GiB file;
  - C{/_stats}: C{{"bytes_sent": ..., "requests": ...}} so far, as JSON.

Bodies honour a single C{Range} and carry C{Content-Length}.  With
C{--rate}, the total of all bodies being sent, over every connection, is
capped at that many bytes per second: each chunk reserves the next slot of
a shared clock (a token bucket with a one-chunk burst), so N clients share
the rate instead of each getting it.  C{bytes_sent} counts body bytes handed
to the kernel.
"""

import argparse
import json
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

from dragonfly.units import parse_size

CHUNK = 64 * 1024
BLOCK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
_GENERATED = re.compile(r"^/gen/(\d+)\.bin$")
_BASE = random.Random(20260606).randbytes(BLOCK)


def generated(start: int, end: int) -> Iterator[bytes]:
    """
    Bytes C{[start, end)} of the generated content: 1 MiB blocks of one
    fixed random block, each starting with its own 8-byte index so that no
    two pieces are alike.
    """
    offset = start
    while offset < end:
        index, within = divmod(offset, BLOCK)
        block = index.to_bytes(8, "big") + _BASE[8:]
        piece = block[within : min(BLOCK, within + end - offset)]
        yield piece
        offset += len(piece)


class Throttle:
    """
    A total byte rate shared by every sending thread: a token bucket of
    L{BURST} bytes, refilled at C{rate} bytes per second.  Over any interval
    of C{t} seconds at most C{rate * t + BURST} bytes go out.

    The small burst is what keeps the cap honest on a busy machine: without
    it, every few milliseconds this process waits for a CPU would be lost
    for good, and the source would look slower to a client that shares the
    machine with busy peers than to one that does not.
    """

    BURST = 1 << 20

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._tokens = float(self.BURST)
        self._last = time.monotonic()

    def take(self, size: int) -> None:
        """
        Block until C{size} more bytes may go out.
        """
        with self._lock:
            now = time.monotonic()
            self._tokens = min(
                float(self.BURST), self._tokens + (now - self._last) * self.rate
            )
            self._last = now
            # Going into debt reserves the bytes; later takers wait longer.
            self._tokens -= size
            debt = -self._tokens
        if debt > 0:
            time.sleep(debt / self.rate)


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.bytes_sent = 0
        self.requests = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dfbench-source/1"
    root: Path
    throttle: Throttle | None = None
    counters = _Counters()

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/_stats":
            with self.counters.lock:
                body = json.dumps(
                    {
                        "bytes_sent": self.counters.bytes_sent,
                        "requests": self.counters.requests,
                    }
                ).encode()
            self._head(200, len(body), "application/json")
            self.wfile.write(body)
            return
        with self.counters.lock:
            self.counters.requests += 1
        match = _GENERATED.match(path)
        if match:
            size = int(match.group(1))
            etag = f'"gen-{size:x}"'
            self._body(size, etag, generated)
            return
        file = (self.root / path.lstrip("/")).resolve()
        if self.root not in file.parents or not file.is_file():
            self._head(404, 0, "text/plain")
            return
        stat = file.stat()
        etag = f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"'
        with file.open("rb") as f:
            self._body(stat.st_size, etag, lambda s, e: _read(f, s, e))

    def _head(
        self, status: int, length: int, kind: str, extra: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(length))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()

    def _body(
        self, size: int, etag: str, chunks: Callable[[int, int], Iterator[bytes]]
    ) -> None:
        start, end, status = 0, size, 200
        requested = self.headers.get("Range")
        if requested is not None and self.headers.get("If-Range") in (None, etag):
            match = _RANGE.match(requested.strip())
            if match and (match.group(1) or match.group(2)):
                if match.group(1):
                    start = int(match.group(1))
                    end = min(int(match.group(2) or size - 1) + 1, size)
                else:
                    start = max(0, size - int(match.group(2)))
                if start >= end:
                    self._head(
                        416, 0, "text/plain", {"Content-Range": f"bytes */{size}"}
                    )
                    return
                status = 206
        extra = {"ETag": etag, "Accept-Ranges": "bytes"}
        if status == 206:
            extra["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        self._head(status, end - start, "application/octet-stream", extra)
        if self.command == "HEAD":
            return
        for data in chunks(start, end):
            view = memoryview(data)
            while view:
                part = view[:CHUNK]
                if self.throttle is not None:
                    self.throttle.take(len(part))
                self.wfile.write(part)
                with self.counters.lock:
                    self.counters.bytes_sent += len(part)
                view = view[CHUNK:]


def _read(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    f.seek(start)
    left = end - start
    while left > 0:
        data = f.read(min(BLOCK, left))
        if not data:
            return
        left -= len(data)
        yield data


def serve(ip: str, port: int, root: Path, rate: int) -> None:
    """
    Serve until killed.
    """
    Handler.root = root.resolve()
    Handler.throttle = Throttle(rate) if rate else None
    server = ThreadingHTTPServer((ip, port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--rate", default="0", help="total bytes per second cap")
    args = parser.parse_args()
    serve(args.ip, args.port, args.root, parse_size(args.rate))


if __name__ == "__main__":
    main()
