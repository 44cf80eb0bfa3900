"""
The C{dfbench} command: run the scenarios, print one line per figure with
its median, the reference measured in the same run, their ratio, the target
and C{PASS}/C{MISS}, and optionally write them as Markdown.

Exit codes: 0 when every figure passed (or was skipped), 3 when one missed
its target, 1 when a scenario could not be measured, 2 for a bad command
line.
"""

import argparse
import resource
import shlex
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from dragonfly.bench import control_plane, image_pull, memory, swarm, throughput
from dragonfly.bench.common import (
    BenchError,
    Context,
    foreign_cpu,
    foreign_share,
    remove,
    terminated_on_sigterm,
)
from dragonfly.bench.profile import Profiler
from dragonfly.bench.report import (
    ERROR,
    HEADER,
    MISS,
    Line,
    Section,
    machine,
    markdown,
    write,
)

# Share of the CPUs that other processes may use before a warning.
NOISY = 0.05

SCENARIOS: dict[str, tuple[str, Callable[[Context], Section]]] = {
    "1": ("piece protocol throughput", throughput.run),
    "2": ("swarm", swarm.run),
    "3": ("memory", memory.run),
    "4": ("supernode control plane", control_plane.run),
    "5": ("image pull", image_pull.run),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfbench",
        description="Benchmark Dragonfly on Twisted against references measured "
        "in the same run (everything on 127.0.0.0/8).",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes and 3 repetitions (a few minutes on 2 cores)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="repetitions per scenario (default 3 with --quick, else 5)",
    )
    p.add_argument(
        "--only",
        default="",
        help="comma-separated scenario numbers to run (default: all), e.g. 1,3",
    )
    p.add_argument(
        "--output",
        type=Path,
        help="also write the results as Markdown to this file, e.g. BENCHMARKS.md",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="also profile with py-spy (an extra, unreported dfget run per "
        "protocol in scenario 1; the supernode during the first run of "
        "scenario 4; an extra, unreported cold pull through a dfpeer in "
        "scenario 5) into DIR",
    )
    p.add_argument(
        "--work",
        type=Path,
        help="work directory for sources, caches and downloads "
        "(default: a new directory under /tmp, deleted at the end)",
    )
    return p


def _raise_open_files() -> None:
    # Scenario 4 holds a thousand connections, in this process and in the
    # supernode, which inherits the limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    chosen = [s.strip() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        _say(f"dfbench: no scenario {', '.join(unknown)} (there are 1 to 5)")
        return 2
    repeat = args.repeat or (3 if args.quick else 5)
    try:
        profiler = Profiler(args.profile.absolute()) if args.profile else None
    except BenchError as e:
        _say(f"dfbench: {e}")
        return 2
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="dfbench-")) if own_work else args.work
    work = work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    _raise_open_files()
    ctx = Context(
        work=work,
        quick=args.quick,
        repeat=repeat,
        say=_say,
        repeat_given=bool(args.repeat),
        profiler=profiler,
    )
    started = time.monotonic()
    sections: list[Section] = []
    _say(
        f"dfbench: {'quick' if args.quick else 'full'} run, {repeat} repetitions, "
        f"work in {work}"
    )
    try:
        for key in chosen:
            title, scenario = SCENARIOS[key]
            begun = time.monotonic()
            others = foreign_cpu()
            try:
                section = scenario(ctx)
            except Exception as e:
                _say(traceback.format_exc())
                section = Section(
                    f"{key}. {title}",
                    [Line(f"{key} {title}", "-", "-", "-", "-", ERROR, str(e)[:200])],
                )
            seconds = time.monotonic() - begun
            load = foreign_share(others, seconds)
            section.background = load
            _say(f"  ({seconds:.0f}s; other processes used {load:.0%} of the CPUs)")
            if load > NOISY:
                _say(
                    "  warning: something else loaded the machine meanwhile; "
                    "these figures are perturbed"
                )
            sections.append(section)
    finally:
        if own_work:
            remove(work)
    seconds = time.monotonic() - started
    print(HEADER)
    for section in sections:
        for line in section.lines:
            print(line.text())
    print(f"dfbench: {seconds / 60:.1f} minutes")
    if args.output is not None:
        command = shlex.join(["dfbench", *argv])
        write(args.output, markdown(sections, machine(), command, seconds))
        _say(f"dfbench: wrote {args.output}")
    verdicts = {line.verdict for section in sections for line in section.lines}
    if ERROR in verdicts:
        return 1
    return 3 if MISS in verdicts else 0


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{dfbench} console script.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(arguments)
    with terminated_on_sigterm():
        sys.exit(run(args, arguments))
