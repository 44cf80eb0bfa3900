"""
Scenario 2, the swarm: N peers (N = 3 and 8, on 127.0.0.1 to 127.0.0.N)
pull one file at the same time through the supernode, from a source capped
at 20 MiB/s in total.

Measured, per repetition and N: each peer's wall time from its launch to
its output in place (Python's start-up included), the bytes the source sent
divided by the file's size, and where the peers' verified bytes came from
(source, supernode, other peers).  The references, in the same run, from
the same capped source: one plain C{curl} of the file (the floor: nothing
can beat the cap), and N C{curl}s at once (the cost without the swarm).

Targets, in every repetition: the source sends at most 1.02 times the file,
and the slowest peer takes at most 1.15 times the single C{curl}.  Each N
gets a fresh supernode, so the source is asked again every time.
"""

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field

from dragonfly.bench.common import (
    MIB,
    BenchError,
    Context,
    DfgetResult,
    Proc,
    Processes,
    cpu_seconds,
    curl_result,
    dfget_result,
    make_random_file,
    median,
    remove,
    size_text,
    start_curl,
    start_dfget,
    start_source,
    start_supernode,
)
from dragonfly.bench.report import Line, Section, verdict

RATE = 20 * MIB
SWARMS = (3, 8)
EGRESS_TARGET = 1.02
SLOWEST_TARGET = 1.15


@dataclass
class _Swarm:
    """
    One swarm download: each peer's result, the source's egress, and the
    CPU seconds of the supernode and of the source meanwhile.
    """

    peers: list[DfgetResult]
    egress: int
    seconds: float
    supernode_cpu: float
    source_cpu: float

    @property
    def slowest(self) -> float:
        return max(r.seconds for r in self.peers)

    @property
    def busy(self) -> float:
        """
        The share of the machine's CPUs the swarm used while it ran.
        """
        cpu = sum(r.cpu for r in self.peers) + self.supernode_cpu + self.source_cpu
        return cpu / (self.seconds * (os.cpu_count() or 1))


@dataclass
class _Rep:
    floor: float
    swarms: dict[int, _Swarm] = field(default_factory=dict)
    direct: dict[int, float] = field(default_factory=dict)
    direct_egress: dict[int, int] = field(default_factory=dict)


def _source_bytes(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=10) as r:
        return int(json.loads(r.read())["bytes_sent"])


def _swarm(
    ctx: Context,
    procs: Processes,
    url: str,
    n: int,
    source: Proc,
    source_port: int,
    expected: str,
) -> _Swarm:
    work = ctx.work / "swarm"
    supernode = start_supernode(procs, work / f"sn-{n}")
    before = _source_bytes(source_port)
    source_cpu = cpu_seconds(source.pid)
    supernode_cpu = cpu_seconds(supernode.proc.pid)
    homes = [work / f"peer-{i}" for i in range(1, n + 1)]
    started = time.monotonic()
    launched = [
        start_dfget(
            procs,
            url,
            supernode,
            f"127.0.0.{i}",
            homes[i - 1],
            work / f"out-{i}.bin",
        )
        for i in range(1, n + 1)
    ]
    try:
        results = [
            dfget_result(proc, home) for proc, home in zip(launched, homes, strict=True)
        ]
        seconds = time.monotonic() - started
        supernode_cpu = cpu_seconds(supernode.proc.pid) - supernode_cpu
        source_cpu = cpu_seconds(source.pid) - source_cpu
    finally:
        for proc in launched:
            procs.stop(proc)
        procs.stop(supernode.proc)
        remove(
            supernode.home, *homes, *(work / f"out-{i}.bin" for i in range(1, n + 1))
        )
    for result in results:
        if result.sha256 != expected:
            raise BenchError(f"a peer got sha256 {result.sha256}, not {expected}")
    return _Swarm(
        results,
        _source_bytes(source_port) - before,
        seconds,
        supernode_cpu,
        source_cpu,
    )


def _direct(
    ctx: Context, procs: Processes, url: str, n: int, size: int, port: int
) -> tuple[float, int]:
    """
    N plain downloads from the capped source at once: the wall time until
    the last one is done, and what the source sent for them.
    """
    work = ctx.work / "swarm"
    before = _source_bytes(port)
    started = time.monotonic()
    launched = [
        start_curl(procs, url, work / f"curl-{i}.bin", work / f"curl-{i}.out")
        for i in range(n)
    ]
    try:
        for proc in launched:
            if curl_result(proc).size != size:
                raise BenchError("a direct download came short")
        return time.monotonic() - started, _source_bytes(port) - before
    finally:
        remove(*(work / f"curl-{i}.bin" for i in range(n)))


def run(ctx: Context) -> Section:
    size = 48 * MIB if ctx.quick else 256 * MIB
    work = ctx.work / "swarm"
    remove(work)
    section = Section("2. Swarm")
    reps: list[_Rep] = []
    try:
        ctx.say(f"2. swarm: writing a {size_text(size)} file ...")
        expected = make_random_file(work / "src" / "file.bin", size)
        with Processes() as procs:
            port = start_source(procs, work / "src", work / "source.out", RATE)
            source = procs.started[-1]
            url = f"http://127.0.0.1:{port}/file.bin"
            for index in range(ctx.repeat):
                floor = curl_result(
                    start_curl(procs, url, work / "curl.bin", work / "curl.out")
                ).seconds
                remove(work / "curl.bin")
                rep = _Rep(floor)
                for n in SWARMS:
                    rep.swarms[n] = _swarm(ctx, procs, url, n, source, port, expected)
                for n in SWARMS:
                    rep.direct[n], rep.direct_egress[n] = _direct(
                        ctx, procs, url, n, size, port
                    )
                reps.append(rep)
                ctx.say(
                    f"  #{index + 1}: curl {floor:.1f}s; "
                    + "; ".join(
                        f"N={n} slowest {rep.swarms[n].slowest:.1f}s, "
                        f"source {rep.swarms[n].egress / size:.3f}x, direct "
                        f"{rep.direct[n]:.1f}s"
                        for n in SWARMS
                    )
                )
    finally:
        remove(work)
    floor = median([rep.floor for rep in reps])
    for n in SWARMS:
        slowest = [rep.swarms[n].slowest for rep in reps]
        ratios = [s / rep.floor for s, rep in zip(slowest, reps, strict=True)]
        typical = [median([r.seconds for r in rep.swarms[n].peers]) for rep in reps]
        egress = [rep.swarms[n].egress / size for rep in reps]
        direct = [rep.direct[n] for rep in reps]
        direct_egress = median([rep.direct_egress[n] / size for rep in reps])
        section.lines += [
            Line(
                f"2 swarm N={n}, slowest peer",
                f"{median(slowest):.2f} s",
                f"1 curl {floor:.2f} s",
                f"{median(ratios):.2f}x",
                f"<= {SLOWEST_TARGET}x, every run",
                verdict(max(ratios) <= SLOWEST_TARGET),
                f"worst {max(ratios):.2f}x",
            ),
            Line(
                f"2 swarm N={n}, median peer",
                f"{median(typical):.2f} s",
                f"{n} curls {median(direct):.2f} s",
                f"{median(typical) / median(direct):.2f}x",
                "(information)",
                "-",
            ),
            Line(
                f"2 swarm N={n}, source egress",
                f"{median(egress):.3f}x file",
                f"{n} curls {direct_egress:.3f}x file",
                f"{median(egress) / direct_egress:.2f}x",
                f"<= {EGRESS_TARGET}x file, every run",
                verdict(max(egress) <= EGRESS_TARGET),
                f"worst {max(egress):.3f}x",
            ),
        ]
    section.details += [
        f"A {size_text(size)} file from a source capped at "
        f"{RATE // MIB} MiB/s in total, {len(reps)} runs. Peer times run from the "
        "launch of each `dfget` to its output in place; *start-up* is the part "
        "before `dfget` began its download (Python start-up and imports, when "
        "all N start at once on this machine). Tiers are the peers' verified "
        "bytes by where they came from, summed over the swarm, in file sizes. "
        "*CPU busy* is the CPU time of the peers, the supernode and the source "
        "over the swarm's wall time and all the machine's cores.",
        "",
        "| run | 1 curl s | N | peers s (min / median / max) | slowest / curl "
        "| start-up s (median) | source / file "
        "| tiers source / supernode / peers | CPU s per peer | CPU busy "
        "| N curls s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, rep in enumerate(reps):
        for n in SWARMS:
            swarm = rep.swarms[n]
            times = sorted(r.seconds for r in swarm.peers)
            tiers = {
                tier: sum(r.tiers[tier] for r in swarm.peers) / size
                for tier in ("source", "supernode", "peers")
            }
            section.details.append(
                f"| {index + 1} | {rep.floor:.2f} | {n} | {times[0]:.2f} / "
                f"{median(times):.2f} / {times[-1]:.2f} | "
                f"{times[-1] / rep.floor:.2f} | "
                f"{median([r.seconds - r.cost for r in swarm.peers]):.2f} | "
                f"{swarm.egress / size:.3f} | "
                f"{tiers['source']:.2f} / {tiers['supernode']:.2f} / "
                f"{tiers['peers']:.2f} | "
                f"{median([r.cpu for r in swarm.peers]):.2f} | {swarm.busy:.0%} | "
                f"{rep.direct[n]:.2f} |"
            )
    return section
