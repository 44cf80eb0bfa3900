"""
The local swarm demo: one source, one supernode, three peers on 127.0.0.1-3
downloading one file at the same time, then a summary of where each peer's
bytes came from.

Then, when Debian's C{docker-registry} and C{skopeo} are installed, the
image part: a registry on 127.0.0.1 holding an image built here, two dfpeers
(127.0.0.2 and 127.0.0.3) mirroring it through the same supernode, and two
C{skopeo} pulls at the same time, one through each dfpeer, then a summary of
where each dfpeer's bytes came from and how much the registry sent.  skopeo
runs with its proxies pointed at a closed loopback port, so nothing can
fall back to the real Docker Hub.

Run it with C{scripts/demo} (which sets up the virtualenv first) or
C{python -m dragonfly.demo}.  Everything binds loopback addresses only, and
every process it starts is stopped by its PID at the end.
"""

import argparse
import contextlib
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
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dragonfly.devtools import registry
from dragonfly.devtools.oci import ImageLayout, file_digest
from dragonfly.units import format_size, parse_size

PEER_IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
MIRROR_IPS = ("127.0.0.2", "127.0.0.3")
IMAGE_REPOSITORY = "library/demo"
IMAGE_TAG = "latest"
# The image's layers, as shares of its size (the last one takes the rest).
LAYER_SHARES = (0.45, 0.30, 0.20)
START_TIMEOUT = 30.0
PULL_TIMEOUT = 600.0


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
def _process(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
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
    if not log.exists():
        return tiers
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


def run(work: Path, size: int, image_size: int) -> int:
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
        deadline = time.monotonic() + START_TIMEOUT
        _wait_http(f"http://127.0.0.1:{source_port}/", deadline)
        _wait_http(f"http://127.0.0.1:{api_port}/_ping", deadline)
        print(
            f"source {url}, supernode 127.0.0.1:{api_port}; three peers start now",
            flush=True,
        )
        file_ok = _share_file(work, bin_dir, url, api_port, size, expected, counter)
        print()
        image_ok = _share_image(work / "image", bin_dir, api_port, image_size)
    return 0 if file_ok and image_ok else 1


def _share_file(
    work: Path,
    bin_dir: Path,
    url: str,
    api_port: int,
    size: int,
    expected: str,
    counter: Path,
) -> bool:
    """
    The file part: three C{dfget}s at once, then their summary.
    """
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
    return ok


def _layer_sizes(size: int) -> list[int]:
    sizes = [int(size * share) for share in LAYER_SHARES]
    return [*sizes, size - sum(sizes)]


def _share_image(work: Path, bin_dir: Path, api_port: int, size: int) -> bool:
    """
    The image part, when C{docker-registry} and C{skopeo} are installed
    (otherwise one line says how to get them, and it counts as passed).
    """
    missing = [
        tool
        for tool in ("docker-registry", "skopeo")
        if registry.find_tool(tool) is None
    ]
    if missing:
        print(
            f"image part skipped: {' and '.join(missing)} not installed; "
            f"run `sudo scripts/install-system-deps` (Debian/Ubuntu) to pull an "
            f"image through two dfpeers too"
        )
        return True
    try:
        return _pull_image(work, bin_dir, api_port, size)
    except (
        RuntimeError,
        OSError,
        subprocess.SubprocessError,
        urllib.error.URLError,
    ) as e:
        print(f"image part failed: {e}")
        print(f"logs are in {work}")
        return False


def _pull_image(work: Path, bin_dir: Path, api_port: int, size: int) -> bool:
    work.mkdir(parents=True)
    sizes = _layer_sizes(size)
    print(
        f"building a {format_size(size)} image in {len(sizes)} layers ...", flush=True
    )
    layout = ImageLayout(work / "layout")
    image = layout.make_image(sizes)
    reference = f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    with contextlib.ExitStack() as stack:
        upstream = registry.start_registry(work / "registry", "127.0.0.1")
        stack.callback(upstream.stop)
        registry.push(layout, IMAGE_TAG, upstream, IMAGE_REPOSITORY, image)
        # The registry has its own copy now.
        shutil.rmtree(layout.path)
        mark = upstream.mark()
        mirrors = []
        for ip in MIRROR_IPS:
            port, peer_port = _free_port(ip), _free_port(ip)
            home = work / f"dfpeer-{ip}"
            argv = [
                str(bin_dir / "twistd"),
                "-n",
                "--pidfile=",
                "-l",
                str(work / f"dfpeer-{ip}.log"),
                "dfpeer",
                "--registry",
                upstream.url,
                "--node",
                f"127.0.0.1:{api_port}",
                "--ip",
                ip,
                "--peer-port",
                str(peer_port),
                "--port",
                str(port),
                "--listen-ip",
                ip,
                "--home",
                str(home),
            ]
            stack.enter_context(_process(argv, work / f"dfpeer-{ip}.out"))
            mirrors.append((ip, f"{ip}:{port}", home))
        deadline = time.monotonic() + START_TIMEOUT
        for _, mirror, _ in mirrors:
            _wait_http(f"http://{mirror}/_ping", deadline)
        print(
            f"registry {upstream.url} holds {reference}; dfpeers "
            f"{', '.join(mirror for _, mirror, _ in mirrors)} mirror it; "
            f"two skopeo pulls start now",
            flush=True,
        )
        started = time.monotonic()
        pulls = []
        for ip, mirror, home in mirrors:
            command = registry.skopeo_pull_command(
                f"docker.io/{reference}", work / f"pull-{ip}", mirror
            )
            process = stack.enter_context(
                _process(command.args, work / f"skopeo-{ip}.out", env=command.env)
            )
            pulls.append((ip, home, command.target, process, time.monotonic()))
        results = []
        for ip, home, target, process, begun in pulls:
            left = max(1.0, started + PULL_TIMEOUT - time.monotonic())
            try:
                code = process.wait(timeout=left)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait(timeout=10)
            results.append((ip, home, target, code, time.monotonic() - begun))
        wall = time.monotonic() - started
        upstream.settle(timeout=10.0)
        served = sum(upstream.blob_bytes(mark).values())
    print()
    print(
        f"{'dfpeer':<12} {'exit':>4} {'seconds':>8} {'from peers':>12} "
        f"{'from supernode':>15} {'layers ok':>10}"
    )
    ok = True
    for ip, home, target, code, seconds in results:
        verified = sum(
            1
            for digest in image.layer_digests
            if (target / digest.split(":", 1)[1]).exists()
            and file_digest(target / digest.split(":", 1)[1]) == digest
        )
        ok = ok and code == 0 and verified == len(image.layers)
        tiers = _tiers(home / "logs" / "dfclient.log")
        print(
            f"{ip:<12} {code:>4} {seconds:>8.2f} {format_size(tiers['peers']):>12} "
            f"{format_size(tiers['supernode']):>15} "
            f"{f'{verified}/{len(image.layers)}':>10}"
        )
    print()
    print(
        f"image {reference}, {len(image.layers)} layers of "
        f"{format_size(image.size)}, wall time {wall:.2f}s; the registry served "
        f"{format_size(served)} of blobs ({served / image.size:.2f}x the layers) "
        f"for {len(MIRROR_IPS)} pulls"
    )
    print(
        f"check it:  grep 'downloading piece' "
        f"{work}/dfpeer-127.0.0.3/logs/dfclient.log | grep -v cdnnode"
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="300M", help="file size (default 300M)")
    parser.add_argument(
        "--image-size",
        default="180M",
        help="image size, in four layers (default 180M)",
    )
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
    sys.exit(
        run(args.work.absolute(), parse_size(args.size), parse_size(args.image_size))
    )


if __name__ == "__main__":
    main()
