"""
Results: one line per measured figure on the terminal, and the same as a
Markdown table (with the machine, the date, the commit and each scenario's
details) for C{--output}.

Hand-written notes survive a new run: everything after the L{NOTES_MARKER}
line of an existing output file is kept as it is.
"""

import datetime
import os
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.bench.common import run_quiet
from dragonfly.bench.nginx import version as nginx_version

NOTES_MARKER = "<!-- dfbench: everything below this line is kept across runs -->"

PASS, MISS, SKIP, ERROR = "PASS", "MISS", "SKIP", "ERROR"


@dataclass
class Line:
    """
    One figure, compared with its reference and its target.
    """

    scenario: str
    figure: str
    reference: str
    ratio: str
    target: str
    verdict: str
    note: str = ""

    def text(self) -> str:
        verdict = self.verdict + (f" ({self.note})" if self.note else "")
        return (
            f"{self.scenario:<34} {self.figure:>16}  {self.reference:<30} "
            f"{self.ratio:>7}  {self.target:<22} {verdict}"
        )


HEADER = (
    f"{'scenario':<34} {'median':>16}  {'reference (same run)':<30} "
    f"{'ratio':>7}  {'target':<22} result"
)


@dataclass
class Section:
    """
    What one scenario produced: its lines and its details (Markdown).
    """

    title: str
    lines: list[Line] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    background: float = 0.0


def verdict(ok: bool) -> str:
    return PASS if ok else MISS


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory() -> str:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return "?"
    match = re.search(r"MemTotal:\s+(\d+) kB", text)
    return f"{int(match.group(1)) / (1 << 20):.1f} GiB" if match else "?"


def _commit(checkout: Path) -> str:
    commit = run_quiet(["git", "-C", str(checkout), "rev-parse", "--short=12", "HEAD"])
    if not re.fullmatch(r"[0-9a-f]{7,40}", commit):
        return "unknown (not a git checkout)"
    # --no-optional-locks: reading the status must not rewrite the index.
    dirty = run_quiet(
        [
            "git",
            "--no-optional-locks",
            "-C",
            str(checkout),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ]
    )
    return commit + (" (with uncommitted changes)" if dirty else "")


def machine() -> dict[str, str]:
    """
    What the figures were measured on.
    """
    checkout = Path(__file__).resolve().parents[2]
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": _commit(checkout),
        "machine": f"{_cpu_model()}, {os.cpu_count()} cores, {_memory()} RAM",
        "system": f"Linux {platform.release()}, Python {platform.python_version()}",
        "references": f"{nginx_version() or 'nginx (not installed)'}, "
        + (run_quiet(["curl", "--version"]).splitlines() or ["curl (not installed)"])[
            0
        ].split(" (")[0],
    }


def markdown(
    sections: list[Section], info: dict[str, str], command: str, seconds: float
) -> str:
    out = [
        "# Benchmarks",
        "",
        f"Written by `{command}` ({seconds / 60:.1f} minutes). Medians over the "
        "repetitions; every reference was measured in the same run, on the same "
        "machine. See the README's *Benchmarks* section to run it again.",
        "",
        "| | |",
        "| --- | --- |",
    ]
    out += [f"| {key} | {value} |" for key, value in info.items()]
    out += [
        "",
        "## Results",
        "",
        "| scenario | median | reference (same run) | ratio | target | result |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for section in sections:
        for line in section.lines:
            result = line.verdict if line.verdict == "-" else f"**{line.verdict}**"
            result += f" ({line.note})" if line.note else ""
            out.append(
                f"| {line.scenario} | {line.figure} | {line.reference} | "
                f"{line.ratio} | {line.target} | {result} |"
            )
    out += [
        "",
        "Other processes on the machine used this share of its CPUs while each "
        "scenario ran: "
        + ", ".join(f"{s.title.split('.')[0]}: {s.background:.0%}" for s in sections)
        + ".",
    ]
    for section in sections:
        if section.details:
            out += ["", f"## {section.title}", "", *section.details]
    return "\n".join(out) + "\n"


def write(path: Path, text: str) -> None:
    """
    Write the report, keeping the notes of the previous one.
    """
    kept = ""
    if path.exists():
        old = path.read_text()
        if NOTES_MARKER in old:
            kept = old[old.index(NOTES_MARKER) :]
    if not kept:
        kept = NOTES_MARKER + "\n\n## Notes\n\n(Hand-written analysis goes here.)\n"
    path.write_text(text + "\n" + kept)
