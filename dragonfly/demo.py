"""
The local swarm demo: one source, one supernode, three peers on 127.0.0.1-3
downloading one file at the same time, then a summary of where each peer's
bytes came from.

Run it with C{scripts/demo} (which sets up the virtualenv first) or
C{python -m dragonfly.demo}.  Everything binds loopback addresses only, and
every process it starts is stopped by its PID at the end.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dragonfly.units import format_size, parse_size

PEER_IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")


class _CountingHandler(SimpleHTTPRequestHandler):
    """
    A static file handler that appends the bytes it sends to a counter file.
    """

    counter: Path

    def copyfile(self, source: Any, outputfile: Any) -> None:
        sent = 0
        while chunk := source.read(1 << 20):
            outputfile.write(chunk)
            sent += len(chunk)
        with self.counter.open("a") as log:
            log.write(json.dumps({"path": self.path, "bytes": sent}) + "\n")

    def log_message(self, format: str, *args: Any) -> None:
        return


def serve_source(directory: str, ip: str, port: int, counter: str) -> None:
    """
    Serve C{directory} over HTTP until killed (the demo's source).
    """
    os.chdir(directory)
    _CountingHandler.counter = Path(counter)
    ThreadingHTTPServer((ip, port), _CountingHandler).serve_forever()


def _free_port(ip: str) -> int:
    with socket.socket() as s:
        s.bind((ip, 0))
        port: int = s.getsockname()[1]
        return port


def _wait_http(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in time")


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 4 << 20))
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 << 20):
            digest.update(block)
    return digest.hexdigest()


def _tiers(log: Path) -> dict[str, int]:
    tiers = {"peers": 0, "supernode": 0}
    for line in log.read_text().splitlines():
        _, found, record = line.partition("downloading piece:")
        if not found:
            continue
        piece = json.loads(record)
        if piece["result"] != 503:
            continue
        tier = "supernode" if piece["dstCid"].startswith("cdnnode:") else "peers"
        tiers[tier] += piece["pieceSize"]
    return tiers


def run(work: Path, size: int) -> int:
    bin_dir = Path(sys.executable).parent
    shutil.rmtree(work, ignore_errors=True)
    (work / "src").mkdir(parents=True)
    print(f"generating a {format_size(size)} file ...", flush=True)
    expected = _make_file(work / "src" / "big.iso", size)
    source_port = _free_port("127.0.0.1")
    api_port, piece_port = _free_port("127.0.0.1"), _free_port("127.0.0.1")
    counter = work / "source-bytes.jsonl"
    source_argv = [
        sys.executable,
        "-m",
        "dragonfly.demo",
        "--serve-source",
        str(work / "src"),
        str(source_port),
        str(counter),
    ]
    supernode_argv = [
        str(bin_dir / "twistd"),
        "-n",
        "--pidfile=",
        "-l",
        str(work / "supernode.log"),
        "supernode",
        "--listen-ip",
        "127.0.0.1",
        "--advertise-ip",
        "127.0.0.1",
        "--port",
        str(api_port),
        "--download-port",
        str(piece_port),
        "--home",
        str(work / "supernode"),
    ]
    url = f"http://127.0.0.1:{source_port}/big.iso"
    with (
        _process(source_argv, work / "source.out"),
        _process(supernode_argv, work / "supernode.out"),
    ):
        deadline = time.monotonic() + 30
        _wait_http(f"http://127.0.0.1:{source_port}/", deadline)
        _wait_http(f"http://127.0.0.1:{api_port}/_ping", deadline)
        print(
            f"source {url}, supernode 127.0.0.1:{api_port}; three peers start now",
            flush=True,
        )
        started = time.monotonic()
        peers = []
        for ip in PEER_IPS:
            home = work / f"peer-{ip}"
            argv = [
                str(bin_dir / "dfget"),
                "-u",
                url,
                "-o",
                str(work / f"out-{ip}.iso"),
                "--node",
                f"127.0.0.1:{api_port}",
                "--ip",
                ip,
                "--home",
                str(home),
                "--timeout",
                "10m",
            ]
            out = (work / f"dfget-{ip}.out").open("wb")
            peers.append(
                (
                    ip,
                    home,
                    subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT),
                    time.monotonic(),
                )
            )
        results = []
        for ip, home, process, begun in peers:
            try:
                code = process.wait(timeout=600)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(timeout=10)
            results.append((ip, home, code, time.monotonic() - begun))
        wall = time.monotonic() - started
    source_bytes = sum(
        json.loads(line)["bytes"] for line in counter.read_text().splitlines()
    )
    print()
    print(
        f"{'peer':<12} {'exit':>4} {'seconds':>8} {'from peers':>12} "
        f"{'from supernode':>15} {'sha256':>8}"
    )
    ok = True
    for ip, home, code, process_seconds in results:
        output = work / f"out-{ip}.iso"
        verified = output.exists() and _sha256(output) == expected
        ok = ok and code == 0 and verified
        tiers = _tiers(home / "logs" / "dfclient.log")
        # dfget's own figure: the download, without the time it then spends
        # serving the others.
        cost = re.search(rb"cost:([0-9.]+)s", (work / f"dfget-{ip}.out").read_bytes())
        seconds = float(cost.group(1)) if cost else process_seconds
        print(
            f"{ip:<12} {code:>4} {seconds:>8.2f} {format_size(tiers['peers']):>12} "
            f"{format_size(tiers['supernode']):>15} {'ok' if verified else 'BAD':>8}"
        )
    print()
    print(
        f"file {format_size(size)}, wall time {wall:.2f}s; the source sent "
        f"{format_size(source_bytes)} ({source_bytes / size:.2f}x the file) for "
        f"{len(PEER_IPS)} copies"
    )
    print(
        f"check it as the quick-start does:  grep 'downloading piece' "
        f"{work}/peer-127.0.0.2/logs/dfclient.log | grep -v cdnnode"
    )
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="300M", help="file size (default 300M)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("demo-work"),
        help="working directory (default ./demo-work)",
    )
    parser.add_argument(
        "--serve-source",
        nargs=3,
        metavar=("DIR", "PORT", "COUNTER"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.serve_source:
        directory, port, counter = args.serve_source
        serve_source(directory, "127.0.0.1", int(port), counter)
        return
    sys.exit(run(args.work.absolute(), parse_size(args.size)))


if __name__ == "__main__":
    main()
