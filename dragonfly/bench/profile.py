"""
C{dfbench --profile DIR}: py-spy on the processes behind the figures, so
that a missed target comes with the profile that explains it.

py-spy samples from outside the process, so the profiled program runs
unchanged; the bench still profiles only runs whose figures it does not
report (an extra run, or a run marked as profiled).  For each profiled
process DIR gets the raw collapsed stacks (C{.raw}, for flame graph tools)
and a summary (C{.txt}): per thread, the functions that were on the CPU
most (self) and the calls that most time went through (inclusive).
"""

import collections
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dragonfly.bench.common import STOP_TIMEOUT, BenchError, Proc, Processes

RATE = 250
TOP = 25


class Profiler:
    """
    Where profiles go, or nothing when profiling is off.
    """

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._binary = ""
        if directory is not None:
            found = shutil.which("py-spy") or shutil.which(
                "py-spy", path=str(Path(sys.executable).parent)
            )
            if found is None:
                raise BenchError("--profile needs py-spy (pip install py-spy)")
            self._binary = found
            directory.mkdir(parents=True, exist_ok=True)

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def _record(self, name: str) -> list[str]:
        assert self.directory is not None
        return [
            self._binary,
            "record",
            "--rate",
            str(RATE),
            "--format",
            "raw",
            "--threads",
            "--nonblocking",
            "--output",
            str(self.directory / f"{name}.raw"),
        ]

    def wrap(self, name: str, argv: Sequence[str]) -> list[str]:
        """
        C{argv} run under py-spy (its output and exit status pass through).
        """
        return [*self._record(name), "--", *argv]

    def attach(self, procs: Processes, name: str, pid: int) -> Proc:
        """
        Start sampling the running process C{pid}.
        """
        assert self.directory is not None
        argv = [*self._record(name), "--pid", str(pid)]
        return procs.start(f"py-spy {name}", argv, self.directory / f"{name}.log")

    def detach(self, proc: Proc, name: str) -> None:
        """
        Stop sampling (py-spy writes its file on SIGINT) and summarise.
        """
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        with contextlib.suppress(BenchError):
            proc.wait(STOP_TIMEOUT)
        self.summarise(name)

    def summarise(self, name: str) -> None:
        assert self.directory is not None
        raw = self.directory / f"{name}.raw"
        if raw.exists():
            raw.with_suffix(".txt").write_text(summary(raw.read_text()))


def _frame(text: str) -> str:
    # "f (/long/path/to/module.py:12)" -> "f (module.py:12)"
    return re.sub(r" \(/?(?:[^()]*/)?([^/()]+):(\d+)\)", r" (\1:\2)", text)


def summary(raw: str) -> str:
    """
    Per thread, the top self and inclusive frames of py-spy's raw output.
    """
    threads: dict[str, tuple[collections.Counter[str], collections.Counter[str]]] = {}
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        samples = int(count)
        frames = stack.split(";")
        thread = "process"
        if frames and frames[0].startswith("thread ("):
            thread = re.sub(r"\(\d+\)", "", frames.pop(0)).strip()
            if "PoolThread" in thread:
                thread = "thread: pool threads"
        own, through = threads.setdefault(
            thread, (collections.Counter(), collections.Counter())
        )
        totals[thread] += samples
        frames = [_frame(f) for f in frames]
        if frames:
            own[frames[-1]] += samples
        for frame in dict.fromkeys(re.sub(r":\d+\)$", ")", f) for f in frames):
            through[frame] += samples
    out = [
        f"py-spy at {RATE} Hz; percentages of each thread's on-CPU samples",
        "",
    ]
    for thread, total in totals.most_common():
        own, through = threads[thread]
        out.append(f"== {thread}: {total} samples ({total / RATE:.1f} s on CPU)")
        out.append("   self:")
        out += [f"   {n / total:6.1%}  {f}" for f, n in own.most_common(TOP)]
        out.append("   inclusive:")
        out += [f"   {n / total:6.1%}  {f}" for f, n in through.most_common(TOP + 15)]
        out.append("")
    return "\n".join(out)
