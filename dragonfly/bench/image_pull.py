"""
Scenario 5, image pull: an image (256 MiB, 64 MiB with C{--quick}, in four
layers of random bytes) on Debian's C{docker-registry} on 127.0.0.1, pulled
with C{skopeo copy} into a C{dir:} directory.  Only skopeo is measured:
Docker needs a daemon of its own, which the bench does not start.

Measured, per repetition, everything cold (a fresh supernode home and fresh
dfpeer homes for each pull):

  - one pull through a dfpeer (C{/v2/} mirror of the registry), against one
    pull straight from the registry (the reference, same skopeo, same
    registries.conf, the registry as the mirror);
  - then, with the registry behind a throttling proxy capping everything it
    sends at 20 MiB/s in total (L{dragonfly.bench.throttle}), two dfpeers
    (two hosts, 127.0.0.2 and 127.0.0.3) each serving one of two skopeo
    pulls started at once: the blob bytes the registry served (its access
    log) divided by the image's size, against one direct pull through the
    same cap.

Times run from the launch of skopeo to its exit, the image checked
afterwards; the dfpeers and the supernode are up before.  Every skopeo runs
with its proxies pointed at a closed loopback port, so nothing can fall
back to Docker Hub.

With C{--profile}, one more cold pull through a dfpeer, not reported, runs
with py-spy on the supernode and the dfpeer (C{5-supernode},
C{5-dfpeer-127.0.0.2}).

Targets: the pull through a dfpeer takes at most 1.3 times the direct one
(median of the repetitions); in every repetition the registry sends at most
1.05 times the image for the two hosts.
"""

import contextlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.bench.common import (
    MIB,
    BenchError,
    Context,
    Proc,
    Processes,
    Supernode,
    median,
    piece_tiers,
    remove,
    size_text,
    start_supernode,
    tool,
    wait_port,
)
from dragonfly.bench.profile import Profiler
from dragonfly.bench.report import SKIP, Line, Section, verdict
from dragonfly.devtools import registry
from dragonfly.devtools.oci import Image, ImageLayout
from dragonfly.devtools.processes import free_port

RATE = 20 * MIB
TIME_TARGET = 1.3
EGRESS_TARGET = 1.05
REPOSITORY = "library/dfbench"
TAG = "latest"
REFERENCE = f"docker.io/{REPOSITORY}:{TAG}"
# The image's layers, as shares of its size (the last one takes the rest).
LAYER_SHARES = (0.45, 0.30, 0.15)
PULL_TIMEOUT = 600.0
HOSTS = ("127.0.0.2", "127.0.0.3")
# How long py-spy is given to attach before a profiled pull starts.
PROFILER_START = 1.0


@dataclass
class _Pull:
    """
    One skopeo pull: its wall time and, through a dfpeer, where the
    dfpeer's verified bytes came from.
    """

    seconds: float
    tiers: dict[str, int] = field(default_factory=dict)


@dataclass
class _Rep:
    direct: float
    mirrored: _Pull
    mirrored_egress: int
    capped_direct: float
    capped_direct_egress: int
    pair: list[_Pull]
    pair_seconds: float
    pair_egress: int


def _layer_sizes(size: int) -> list[int]:
    sizes = [int(size * share) for share in LAYER_SHARES]
    return [*sizes, size - sum(sizes)]


def _pulls(
    procs: Processes, work: Path, image: Image, mirrors: dict[str, str]
) -> tuple[dict[str, float], float]:
    """
    Start one skopeo pull per C{name: mirror} at once; wait for them all
    and check what each got.  Returns each one's seconds, and the wall time
    until the last was done.
    """
    started = time.monotonic()
    launched = []
    for name, mirror in mirrors.items():
        command = registry.skopeo_pull_command(REFERENCE, work / name, mirror)
        proc = procs.start(
            f"skopeo {name}", command.args, work / f"{name}.out", env=command.env
        )
        launched.append((name, command, proc))
    seconds: dict[str, float] = {}
    try:
        for name, _, proc in launched:
            left = max(1.0, started + PULL_TIMEOUT - time.monotonic())
            code = proc.wait(left)
            seconds[name] = time.monotonic() - proc.started
            if code != 0:
                raise BenchError(
                    f"skopeo through {mirrors[name]} failed (exit {code}): "
                    f"{proc.output()[-1500:]}"
                )
        wall = time.monotonic() - started
        for name, command, _ in launched:
            try:
                pulled = registry.read_pulled_dir(command.target)
            except (OSError, ValueError, registry.DigestMismatch) as e:
                raise BenchError(f"skopeo through {mirrors[name]}: {e}") from None
            if pulled.layers != image.layer_digests or not set(
                image.layer_digests
            ).issubset(pulled.content):
                raise BenchError(
                    f"skopeo through {mirrors[name]} did not get the image's layers"
                )
    finally:
        remove(*(work / name for name in mirrors))
    return seconds, wall


def _start_dfpeer(
    procs: Processes,
    work: Path,
    ip: str,
    upstream: str,
    supernode: Supernode,
) -> tuple[str, Path]:
    """
    A dfpeer with a fresh home on C{ip}, mirroring C{upstream}; returns its
    C{HOST:PORT} once it listens, and its home.
    """
    home = work / f"dfpeer-{ip}"
    remove(home)
    home.mkdir(parents=True)
    port, peer_port = free_port(ip), free_port(ip)
    argv = [
        tool("twistd"),
        "-n",
        "--pidfile=",
        "-l",
        str(home / "dfpeer.log"),
        "dfpeer",
        "--registry",
        upstream,
        "--node",
        supernode.node,
        "--ip",
        ip,
        "--peer-port",
        str(peer_port),
        "--port",
        str(port),
        "--listen-ip",
        ip,
        "--home",
        str(home / "home"),
    ]
    proc = procs.start(f"dfpeer {ip}", argv, home / "dfpeer.out")
    try:
        wait_port(ip, port)
        wait_port(ip, peer_port)
    except BenchError:
        raise BenchError(f"dfpeer did not start: {proc.output()[-2000:]}") from None
    return f"{ip}:{port}", home / "home"


def _blob_bytes(upstream: registry.Registry, mark: int) -> int:
    upstream.settle(timeout=10.0)
    return sum(upstream.blob_bytes(mark).values())


def _through_dfpeers(
    work: Path,
    image: Image,
    upstream: registry.Registry,
    url: str,
    hosts: tuple[str, ...],
    profiler: Profiler | None = None,
) -> tuple[list[_Pull], float, int]:
    """
    Cold: a fresh supernode, one fresh dfpeer per host mirroring C{url},
    one skopeo pull through each at once.  Returns the pulls, the wall time
    and the registry's blob bytes meanwhile.

    @param profiler: when given, py-spy samples the supernode and the
        dfpeers during the pulls.
    """
    with Processes() as procs:
        supernode = start_supernode(procs, work / "sn")
        mirrors: dict[str, str] = {}
        homes: dict[str, Path] = {}
        for ip in hosts:
            mirrors[ip], homes[ip] = _start_dfpeer(procs, work, ip, url, supernode)
        spies: list[tuple[Proc, str]] = []
        if profiler is not None:
            # "5-supernode", "5-dfpeer-127.0.0.2", ...
            targets = [
                p for p in procs.started if p.name.startswith(("supernode", "dfpeer "))
            ]
            for proc in targets:
                name = "5-" + proc.name.replace(" ", "-")
                spies.append((profiler.attach(procs, name, proc.pid), name))
            time.sleep(PROFILER_START)
        mark = upstream.mark()
        seconds, wall = _pulls(procs, work / "pulls", image, mirrors)
        egress = _blob_bytes(upstream, mark)
        for spy, name in spies:
            assert profiler is not None
            profiler.detach(spy, name)
        pulls = [
            _Pull(seconds[ip], piece_tiers(homes[ip] / "logs" / "dfclient.log"))
            for ip in hosts
        ]
    remove(work / "sn", *(work / f"dfpeer-{ip}" for ip in hosts))
    return pulls, wall, egress


def _direct(
    work: Path, image: Image, upstream: registry.Registry, address: str
) -> tuple[float, int]:
    with Processes() as procs:
        mark = upstream.mark()
        seconds, _ = _pulls(procs, work / "pulls", image, {"direct": address})
        return seconds["direct"], _blob_bytes(upstream, mark)


def _start_throttle(procs: Processes, work: Path, target: str) -> str:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "dragonfly.bench.throttle",
        "--port",
        str(port),
        "--target",
        target,
        "--rate",
        str(RATE),
    ]
    procs.start("throttle", argv, work / "throttle.out")
    wait_port("127.0.0.1", port)
    return f"127.0.0.1:{port}"


def _skipped(reason: str) -> Section:
    return Section(
        "5. Image pull",
        [Line("5 image pull", "-", "-", "-", "-", SKIP, reason)],
    )


def run(ctx: Context) -> Section:
    missing = [
        name
        for name in ("docker-registry", "skopeo")
        if registry.find_tool(name) is None
    ]
    if missing:
        return _skipped(
            f"{' and '.join(missing)} not installed (sudo scripts/install-system-deps)"
        )
    size = 64 * MIB if ctx.quick else 256 * MIB
    repeat = ctx.repeat if ctx.repeat_given else (2 if ctx.quick else 3)
    work = ctx.work / "image"
    remove(work)
    reps: list[_Rep] = []
    try:
        ctx.say(
            f"5. image pull: building a {size_text(size)} image "
            f"(skopeo only; docker is not measured) ..."
        )
        layout = ImageLayout(work / "layout")
        image = layout.make_image(_layer_sizes(size))
        with contextlib.ExitStack() as stack:
            upstream = registry.start_registry(work / "registry", "127.0.0.1")
            stack.callback(upstream.stop)
            registry.push(layout, TAG, upstream, REPOSITORY, image)
            shutil.rmtree(layout.path)
            procs = stack.enter_context(Processes())
            capped = _start_throttle(procs, work, upstream.address)
            for index in range(repeat):
                direct, _ = _direct(work, image, upstream, upstream.address)
                (mirrored,), _, mirrored_egress = _through_dfpeers(
                    work, image, upstream, upstream.url, HOSTS[:1]
                )
                capped_direct, capped_direct_egress = _direct(
                    work, image, upstream, capped
                )
                pair, pair_seconds, pair_egress = _through_dfpeers(
                    work, image, upstream, f"http://{capped}", HOSTS
                )
                rep = _Rep(
                    direct,
                    mirrored,
                    mirrored_egress,
                    capped_direct,
                    capped_direct_egress,
                    pair,
                    pair_seconds,
                    pair_egress,
                )
                reps.append(rep)
                ctx.say(
                    f"  #{index + 1}: direct {direct:.1f}s, via dfpeer "
                    f"{mirrored.seconds:.1f}s; capped: direct {capped_direct:.1f}s, "
                    f"2 hosts via dfpeers {pair_seconds:.1f}s, registry "
                    f"{pair_egress / image.size:.3f}x image"
                )
            if ctx.profiler is not None:
                (profiled,), _, _ = _through_dfpeers(
                    work, image, upstream, upstream.url, HOSTS[:1], ctx.profiler
                )
                ctx.say(
                    f"  profiled pull via dfpeer {profiled.seconds:.1f}s (not "
                    f"reported): profiles in {ctx.profiler.directory}"
                )
    finally:
        remove(work)
    return _section(image, reps)


def _section(image: Image, reps: list[_Rep]) -> Section:
    total = image.size
    direct = median([rep.direct for rep in reps])
    ratios = [rep.mirrored.seconds / rep.direct for rep in reps]
    egress = [rep.pair_egress / total for rep in reps]
    capped_direct = median([rep.capped_direct for rep in reps])
    capped_egress = median([rep.capped_direct_egress / total for rep in reps])
    slowest = [max(p.seconds for p in rep.pair) for rep in reps]
    section = Section("5. Image pull")
    section.lines += [
        Line(
            "5 image via dfpeer, cold",
            f"{median([rep.mirrored.seconds for rep in reps]):.2f} s",
            f"skopeo direct {direct:.2f} s",
            f"{median(ratios):.2f}x",
            f"<= {TIME_TARGET}x direct",
            verdict(median(ratios) <= TIME_TARGET),
            f"skopeo only; worst {max(ratios):.2f}x",
        ),
        Line(
            "5 image 2 hosts capped, slowest",
            f"{median(slowest):.2f} s",
            f"1 direct capped {capped_direct:.2f} s",
            f"{median(slowest) / capped_direct:.2f}x",
            "(information)",
            "-",
        ),
        Line(
            "5 image 2 hosts, registry egress",
            f"{median(egress):.3f}x image",
            f"1 direct {capped_egress:.3f}x image",
            f"{median(egress) / capped_egress:.2f}x",
            f"<= {EGRESS_TARGET}x image, every run",
            verdict(max(egress) <= EGRESS_TARGET),
            f"worst {max(egress):.3f}x",
        ),
    ]
    section.details += [
        f"An image of {len(image.layers)} layers, {size_text(total)} compressed, "
        f"on Debian's `docker-registry` on 127.0.0.1, pulled with `skopeo copy` "
        f"into a `dir:` directory (Docker is not measured), {len(reps)} runs. "
        "Each pull through dfpeers is cold: a fresh supernode and fresh dfpeer "
        "homes. Times run from the launch of skopeo to its exit, with the "
        "dfpeers already up. *Capped*: the registry behind a proxy sending at "
        f"most {RATE // MIB} MiB/s in total; two dfpeers (127.0.0.2 and "
        "127.0.0.3) each serve one of two skopeo pulls started at once. "
        "Registry bytes are the blob bytes of its access log, in image sizes; "
        "tiers are the dfpeers' verified bytes by where they came from, in "
        "image sizes.",
        "",
        "| run | direct s | via dfpeer s | ratio | registry / image "
        "| capped: direct s | 2 hosts s (each) | registry / image "
        "| tiers supernode / peers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, rep in enumerate(reps):
        tiers = {
            tier: sum(p.tiers.get(tier, 0) for p in rep.pair) / total
            for tier in ("supernode", "peers")
        }
        section.details.append(
            f"| {index + 1} | {rep.direct:.2f} | {rep.mirrored.seconds:.2f} | "
            f"{rep.mirrored.seconds / rep.direct:.2f} | "
            f"{rep.mirrored_egress / total:.3f} | {rep.capped_direct:.2f} | "
            f"{rep.pair_seconds:.2f} ("
            + " / ".join(f"{p.seconds:.2f}" for p in rep.pair)
            + f") | {rep.pair_egress / total:.3f} | "
            f"{tiers['supernode']:.2f} / {tiers['peers']:.2f} |"
        )
    return section
