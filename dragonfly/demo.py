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

The figures come from the operating tools, read over HTTP as an operator
would: after the file part, the supernode's C{/metrics} and
C{/api/v1/status}; after the image part, each dfpeer's C{/metrics}.  The
exposition text is parsed by prometheus_client's own parser
(L{read_samples}), so the demo reads exactly what Prometheus would.  With
C{--keep} the supernode stays up afterwards, so that its status page can be
opened in a browser, until Ctrl-C or SIGTERM or C{--keep-seconds}.

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
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

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
HTTP_TIMEOUT = 10.0


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


# Reading the operating tools ------------------------------------------------

Samples = dict[str, list[tuple[dict[str, str], float]]]


def read_samples(text: str) -> Samples:
    """
    Parse a C{/metrics} page with prometheus_client's parser.

    @return: every sample's labels and value, by sample name (a counter's
        samples are named with their C{_total} suffix).
    @raise ValueError: the text is not in the exposition format.
    """
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def sample_total(samples: Samples, name: str, **labels: str) -> int:
    """
    The sum of the samples named C{name} whose labels include C{labels}
    (0 when there are none: a labelled counter has no sample before its
    first increment).
    """
    return int(
        sum(
            value
            for found, value in samples.get(name, [])
            if all(found.get(k) == v for k, v in labels.items())
        )
    )


@dataclass(frozen=True)
class SwarmFigures:
    """
    What the supernode says about the swarm, read from its C{/metrics}
    (what it read and served itself) and C{/api/v1/status} (what the peers
    reported fetching, from whom).
    """

    source_bytes: int
    served_bytes: int
    served_pieces: int
    from_peers: int
    from_peers_pieces: int
    from_supernode: int
    bytes_saved: float | None


def swarm_figures(metrics: str, status: dict[str, Any]) -> SwarmFigures:
    """
    Gather L{SwarmFigures} from the text of the supernode's C{/metrics} and
    the JSON of its C{/api/v1/status}.
    """
    samples = read_samples(metrics)
    totals = status["totals"]
    return SwarmFigures(
        source_bytes=sample_total(samples, "dragonfly_supernode_source_bytes_total"),
        served_bytes=sample_total(samples, "dragonfly_supernode_upload_bytes_total"),
        served_pieces=sample_total(samples, "dragonfly_supernode_pieces_served_total"),
        from_peers=totals["bytes_from_peers"],
        from_peers_pieces=totals["pieces_from_peers"],
        from_supernode=totals["bytes_from_supernode"],
        bytes_saved=totals["bytes_saved"],
    )


def _percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.1f}%"


def swarm_summary(figures: SwarmFigures, size: int, peers: int) -> list[str]:
    """
    The lines the demo prints about the supernode's figures for C{peers}
    downloads of a file of C{size} bytes.
    """
    times = f"{figures.source_bytes / size:.2f}x the file" if size else "empty file"
    rows = [
        ("source -> supernode", format_size(figures.source_bytes), times),
        (
            "supernode -> peers",
            format_size(figures.served_bytes),
            f"{figures.served_pieces} pieces",
        ),
        (
            "peer -> peer",
            format_size(figures.from_peers),
            f"{figures.from_peers_pieces} pieces",
        ),
        (
            "bytes saved",
            _percent(figures.bytes_saved),
            f"of {format_size(figures.from_peers + figures.from_supernode)} "
            f"delivered; at best {_percent((peers - 1) / peers)} for {peers} peers",
        ),
    ]
    return [
        "the supernode's /metrics and /api/v1/status:",
        *(f"  {name:<20} {value:>10}   {note}" for name, value, note in rows),
    ]


@dataclass(frozen=True)
class DfpeerFigures:
    """
    What a dfpeer's C{/metrics} says about its downloads and its mirror.

    @ivar tiers: bytes downloaded, by tier (C{peer}, C{supernode}, C{source}).
    @ivar mirror_requests: requests answered by the registry mirror, by kind
        and HTTP status code.
    """

    tiers: dict[str, int]
    mirror_requests: dict[tuple[str, str], int]
    uploaded: int


def dfpeer_figures(metrics: str) -> DfpeerFigures:
    """
    Gather L{DfpeerFigures} from the text of a dfpeer's C{/metrics}.
    """
    samples = read_samples(metrics)
    tiers = {
        tier: sample_total(samples, "dragonfly_peer_download_bytes_total", tier=tier)
        for tier in ("peer", "supernode", "source")
    }
    requests: dict[tuple[str, str], int] = {}
    for labels, value in samples.get("dragonfly_mirror_requests_total", []):
        key = (labels.get("kind", ""), labels.get("code", ""))
        requests[key] = requests.get(key, 0) + int(value)
    return DfpeerFigures(
        tiers=tiers,
        mirror_requests=requests,
        uploaded=sample_total(samples, "dragonfly_peer_upload_bytes_total"),
    )


def format_requests(requests: dict[tuple[str, str], int]) -> str:
    """
    Mirror requests as C{"blob 200 x4, manifest 200 x2"}, or C{"none"}.
    """
    return (
        ", ".join(
            f"{kind} {code} x{count}"
            for (kind, code), count in sorted(requests.items())
            if count
        )
        or "none"
    )


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        body: bytes = response.read()
        return body


def run(work: Path, size: int, image_size: int, keep: float = 0.0) -> int:
    """
    Run the whole demo in C{work}.

    @param keep: when positive, how long to keep the supernode (and so its
        status page) up after the run, unless interrupted first.
    @return: the exit status: 0 when every download verified.
    """
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
    status_page = f"http://127.0.0.1:{api_port}/"
    with (
        _process(source_argv, work / "source.out"),
        _process(supernode_argv, work / "supernode.out") as supernode,
    ):
        deadline = time.monotonic() + START_TIMEOUT
        _wait_http(f"http://127.0.0.1:{source_port}/", deadline)
        _wait_http(f"http://127.0.0.1:{api_port}/_ping", deadline)
        print(
            f"source {url}, supernode 127.0.0.1:{api_port} (status page "
            f"{status_page}); three peers start now",
            flush=True,
        )
        file_ok = _share_file(work, bin_dir, url, api_port, size, expected, counter)
        print()
        image_ok = _share_image(work / "image", bin_dir, api_port, image_size)
        print()
        if keep > 0:
            _keep_up(supernode, status_page, keep)
        else:
            print(
                f"status page {status_page} (JSON: /api/v1/status, Prometheus: "
                f"/metrics); run with --keep to browse it"
            )
    return 0 if file_ok and image_ok else 1


def _keep_up(
    supernode: subprocess.Popen[bytes], status_page: str, seconds: float
) -> None:
    """
    Keep the supernode up for C{seconds}, or until Ctrl-C or SIGTERM
    (which L{main} turns into C{KeyboardInterrupt}), or until it exits.
    """
    print(
        f"status page {status_page} stays up for {seconds:.0f}s: open it in a "
        f"browser; Ctrl-C stops it",
        flush=True,
    )
    deadline = time.monotonic() + seconds
    try:
        while supernode.poll() is None and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(0.5, left))
    except KeyboardInterrupt:
        print()
    if supernode.poll() is not None:
        print(f"the supernode exited (status {supernode.returncode})")
    print("stopping", flush=True)


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
    with contextlib.ExitStack() as stack:
        started = time.monotonic()
        results = _run_dfgets(stack, work, bin_dir, url, api_port)
        wall = time.monotonic() - started
    source_bytes = sum(
        json.loads(line)["bytes"] for line in counter.read_text().splitlines()
    )
    print()
    print("each dfget's downloading-piece lines (dfclient.log):")
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
    print(
        f"check it as the quick-start does:  grep 'downloading piece' "
        f"{work}/peer-127.0.0.2/logs/dfclient.log | grep -v cdnnode"
    )
    print()
    print(
        f"file {format_size(size)}, wall time {wall:.2f}s; the source sent "
        f"{format_size(source_bytes)} ({source_bytes / size:.2f}x the file) for "
        f"{len(PEER_IPS)} copies"
    )
    api = f"http://127.0.0.1:{api_port}"
    try:
        figures = swarm_figures(
            _get(f"{api}/metrics").decode("utf-8"),
            json.loads(_get(f"{api}/api/v1/status")),
        )
    except (OSError, ValueError, KeyError) as e:
        print(f"could not read the supernode's /metrics and /api/v1/status: {e}")
        return False
    for line in swarm_summary(figures, size, len(PEER_IPS)):
        print(line)
    return ok


def _run_dfgets(
    stack: contextlib.ExitStack, work: Path, bin_dir: Path, url: str, api_port: int
) -> list[tuple[str, Path, int, float]]:
    """
    Start one C{dfget} per address of L{PEER_IPS} at once, and wait for
    them all.

    @return: per peer, its address, home, exit status and seconds taken.
    """
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
        process = stack.enter_context(_process(argv, work / f"dfget-{ip}.out"))
        peers.append((ip, home, process, time.monotonic()))
    results = []
    for ip, home, process, begun in peers:
        left = max(1.0, begun + PULL_TIMEOUT - time.monotonic())
        try:
            code = process.wait(timeout=left)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait(timeout=10)
        results.append((ip, home, code, time.monotonic() - begun))
    return results


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
        ValueError,
        KeyError,
        subprocess.SubprocessError,
    ) as e:
        print(f"image part failed: {e}")
        print(f"logs are in {work}")
        return False


def _start_dfpeers(
    stack: contextlib.ExitStack,
    work: Path,
    bin_dir: Path,
    upstream: str,
    api_port: int,
) -> list[tuple[str, str, Path]]:
    """
    Start one dfpeer per address of L{MIRROR_IPS}, mirroring C{upstream}.

    @return: per dfpeer, its address, the C{host:port} of its HTTP port
        (mirror, API, C{/metrics}) and its home.
    """
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
            upstream,
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
    return mirrors


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
        mirrors = _start_dfpeers(stack, work, bin_dir, upstream.url, api_port)
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
        # Read while the dfpeers still run: their counters die with them.
        figures = {
            ip: dfpeer_figures(_get(f"http://{mirror}/metrics").decode("utf-8"))
            for ip, mirror, _ in mirrors
        }
        status = json.loads(_get(f"http://127.0.0.1:{api_port}/api/v1/status"))
    print()
    print("each dfpeer's /metrics: bytes downloaded by tier, mirror requests")
    print(
        f"{'dfpeer':<12} {'exit':>4} {'seconds':>8} {'from peers':>12} "
        f"{'from supernode':>15} {'from source':>12} {'layers ok':>10}"
    )
    ok = True
    for ip, _, target, code, seconds in results:
        verified = sum(
            1
            for digest in image.layer_digests
            if (target / digest.split(":", 1)[1]).exists()
            and file_digest(target / digest.split(":", 1)[1]) == digest
        )
        ok = ok and code == 0 and verified == len(image.layers)
        tiers = figures[ip].tiers
        print(
            f"{ip:<12} {code:>4} {seconds:>8.2f} {format_size(tiers['peer']):>12} "
            f"{format_size(tiers['supernode']):>15} "
            f"{format_size(tiers['source']):>12} "
            f"{f'{verified}/{len(image.layers)}':>10}"
        )
    for ip, _, _ in mirrors:
        print(f"{ip:<12} mirror: {format_requests(figures[ip].mirror_requests)}")
    print()
    print(
        f"image {reference}, {len(image.layers)} layers of "
        f"{format_size(image.size)}, wall time {wall:.2f}s; the registry served "
        f"{format_size(served)} of blobs ({served / image.size:.2f}x the layers) "
        f"for {len(MIRROR_IPS)} pulls"
    )
    totals = status["totals"]
    print(
        f"supernode /api/v1/status, both parts: bytes saved "
        f"{_percent(totals['bytes_saved'])} of "
        f"{format_size(totals['bytes_delivered'])} delivered to peers"
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
        "--keep",
        action="store_true",
        help="keep the supernode up after the run, to browse its status page, "
        "until Ctrl-C or SIGTERM (at most --keep-seconds)",
    )
    parser.add_argument(
        "--keep-seconds",
        type=float,
        default=600.0,
        help="how long --keep keeps it up at most (default 600)",
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
    if args.keep_seconds <= 0:
        parser.error("--keep-seconds must be positive")
    # SIGTERM unwinds like Ctrl-C, so that every process started is stopped;
    # SIGINT is set too, as a shell starting the demo in the background
    # leaves it ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        status = run(
            args.work.absolute(),
            parse_size(args.size),
            parse_size(args.image_size),
            keep=args.keep_seconds if args.keep else 0.0,
        )
    except KeyboardInterrupt:
        print("\ninterrupted; every process started was stopped", file=sys.stderr)
        status = 130
    sys.exit(status)


def _interrupt(signum: int, frame: object) -> None:
    # Once: a second signal must not cut the stopping of the processes short.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
