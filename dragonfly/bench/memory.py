"""
Scenario 3, memory: the peak resident set of the downloading C{dfget} for a
1 GiB and a 4 GiB file (128 and 512 MiB with C{--quick}), through a
supernode, from a source that makes the content on the fly (no source file
on disk).

The peak is the larger of the last C{VmHWM} read from C{/proc/<pid>/status}
while the process runs (every 20 ms) and the C{ru_maxrss} the kernel
reports when it is reaped (C{wait4}); both are the process's own high-water
mark, so sampling cannot miss a short peak.  The supernode's peak is shown
beside it.  Each download's output and the supernode's cache are deleted
right after it.
"""

import hashlib
from dataclasses import dataclass

from dragonfly.bench.common import (
    GIB,
    MIB,
    BenchError,
    Context,
    Proc,
    Processes,
    dfget_result,
    median,
    remove,
    size_text,
    start_dfget,
    start_source,
    start_supernode,
    status_kib,
)
from dragonfly.bench.report import Line, Section, verdict
from dragonfly.bench.sources import generated

LIMIT = 150 * MIB
FLAT = 1.10
PEER_IP = "127.0.0.2"


@dataclass
class _Peak:
    dfget: int
    supernode: int
    seconds: float


def _expected(size: int) -> str:
    digest = hashlib.sha256()
    for block in generated(0, size):
        digest.update(block)
    return digest.hexdigest()


def _wait_sampling(proc: Proc, timeout: float) -> int:
    """
    Reap C{proc}, sampling its high-water mark meanwhile; return the peak
    in bytes.
    """
    peak_kib = 0

    def sample() -> None:
        nonlocal peak_kib
        peak_kib = max(peak_kib, status_kib(proc.pid, "VmHWM") or 0)

    proc.wait(timeout, sample)
    assert proc.rusage is not None
    # ru_maxrss is in KiB on Linux.
    return max(peak_kib, proc.rusage.ru_maxrss) * 1024


def _one(ctx: Context, procs: Processes, port: int, size: int, expected: str) -> _Peak:
    work = ctx.work / "memory"
    supernode = start_supernode(procs, work / "sn")
    home, output = work / "peer", work / "out.bin"
    try:
        proc = start_dfget(
            procs,
            f"http://127.0.0.1:{port}/gen/{size}.bin",
            supernode,
            PEER_IP,
            home,
            output,
            keep_serving="0s",
        )
        peak = _wait_sampling(proc, 900)
        supernode_peak = (status_kib(supernode.proc.pid, "VmHWM") or 0) * 1024
        result = dfget_result(proc, home, 10)
        if result.sha256 != expected or result.length != size:
            raise BenchError(f"dfget got sha256 {result.sha256}, not {expected}")
        return _Peak(peak, supernode_peak, result.seconds)
    finally:
        procs.stop(supernode.proc)
        remove(home, output, supernode.home)


def run(ctx: Context) -> Section:
    sizes = (128 * MIB, 512 * MIB) if ctx.quick else (GIB, 4 * GIB)
    work = ctx.work / "memory"
    remove(work)
    section = Section("3. Memory")
    peaks: dict[int, list[_Peak]] = {size: [] for size in sizes}
    try:
        with Processes() as procs:
            port = start_source(procs, work / "src", work / "source.out")
            for size in sizes:
                ctx.say(f"3. memory: the sha256 of {size_text(size)} of content ...")
                expected = _expected(size)
                for index in range(ctx.repeat):
                    peak = _one(ctx, procs, port, size, expected)
                    peaks[size].append(peak)
                    ctx.say(
                        f"  {size_text(size)} #{index + 1}: dfget peak "
                        f"{peak.dfget / MIB:.0f} MiB, supernode "
                        f"{peak.supernode / MIB:.0f} MiB, {peak.seconds:.1f}s"
                    )
    finally:
        remove(work)
    small, large = sizes
    small_peak = median([p.dfget for p in peaks[small]])
    for size in sizes:
        values = [p.dfget for p in peaks[size]]
        ok = max(values) <= LIMIT
        line = Line(
            f"3 memory dfget, {size_text(size)}",
            f"{median(values) / MIB:.0f} MiB",
            "-",
            "-",
            f"<= {LIMIT // MIB} MiB",
            verdict(ok),
            f"max {max(values) / MIB:.0f} MiB",
        )
        if size == large:
            growth = median(values) / small_peak
            line = Line(
                f"3 memory dfget, {size_text(size)}",
                f"{median(values) / MIB:.0f} MiB",
                f"{size_text(small)}: {small_peak / MIB:.0f} MiB",
                f"{growth:.2f}x",
                f"<= {LIMIT // MIB} MiB, <= {FLAT}x",
                verdict(ok and growth <= FLAT),
                f"max {max(values) / MIB:.0f} MiB",
            )
        section.lines.append(line)
    section.details += [
        "Peak resident set (VmHWM / ru_maxrss) of the downloading `dfget`, "
        "through a supernode, from a source generating the content on the fly. "
        "*Flat* means the larger file's median peak is at most "
        f"{FLAT}x the smaller one's.",
        "",
        "| size | run | dfget peak MiB | supernode peak MiB | dfget s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for size in sizes:
        for index, peak in enumerate(peaks[size]):
            section.details.append(
                f"| {size_text(size)} | {index + 1} | {peak.dfget / MIB:.0f} | "
                f"{peak.supernode / MIB:.0f} | {peak.seconds:.1f} |"
            )
    return section
