"""
What every scenario shares: processes started and ended by PID, ports,
bounded waits, the supernode and C{dfget} as subprocesses, C{curl}, what
C{/proc} says about a process, and small statistics.

Every wait here has a deadline; every process is ended by its PID, first
politely (SIGTERM) and then, after a bounded wait, with SIGKILL.
"""

import contextlib
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING

from dragonfly.devtools.processes import child_env, free_port, stop_process

if TYPE_CHECKING:
    from dragonfly.bench.profile import Profiler

MIB = 1 << 20
GIB = 1 << 30
BIN = Path(sys.executable).parent
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DOWNLOAD_TIMEOUT = 900.0
SUPERNODE_IP = "127.0.0.1"


class BenchError(Exception):
    """
    A scenario could not be measured (a process failed, a wait ran out).
    """


def tool(name: str) -> str:
    """
    The path of a console script of this install (beside the running
    Python), else of one on C{PATH}.

    @raise BenchError: if there is neither.
    """
    beside = BIN / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"{name} is not installed")
    return found


def wait_port(ip: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """
    Wait until something accepts TCP connections on C{ip:port}.

    @raise BenchError: if nothing does within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((ip, port), 1):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on {ip}:{port} after {timeout:g}s")


def remove(*paths: Path) -> None:
    """
    Delete files and directory trees, whichever exist.
    """
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# Processes -------------------------------------------------------------------


@dataclass
class Proc:
    """
    A process the bench started.

    @ivar started: C{time.monotonic()} when it was launched.
    @ivar marks: for each watched substring of its output, when it first
        appeared (monotonic time).
    """

    name: str
    popen: "subprocess.Popen[bytes]"
    log: Path
    started: float
    marks: dict[str, float] = field(default_factory=dict)
    reader: threading.Thread | None = None
    rusage: "resource.struct_rusage | None" = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if self.reader is not None:
            self.reader.join(STOP_TIMEOUT)
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait(self, timeout: float, sample: Callable[[], None] | None = None) -> int:
        """
        Reap the process (keeping its resource usage in L{rusage}); kill it
        when C{timeout} runs out.

        @param sample: called every 20 ms while waiting.
        @raise BenchError: if it had to be killed.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sample is not None:
                sample()
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self.rusage = usage
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                return self.popen.returncode
            time.sleep(0.02)
        stop_process(self.popen)
        raise BenchError(f"{self.name} did not finish in {timeout:g}s")

    @property
    def cpu(self) -> float:
        """
        The CPU seconds (user + system) of a reaped process.
        """
        if self.rusage is None:
            return 0.0
        return self.rusage.ru_utime + self.rusage.ru_stime


def _pump(source: IO[bytes], sink: IO[bytes], proc: Proc, watch: Sequence[str]) -> None:
    """
    Copy a child's output to its log, noting when each watched text appears.
    """
    with source, sink:
        for line in source:
            now = time.monotonic()
            sink.write(line)
            sink.flush()
            text = line.decode("utf-8", "replace")
            for needle in watch:
                if needle in text and needle not in proc.marks:
                    proc.marks[needle] = now


class Processes:
    """
    The processes of one scenario: all of them are ended when it leaves the
    C{with} block, whatever happened.
    """

    def __init__(self) -> None:
        self.started: list[Proc] = []

    def __enter__(self) -> "Processes":
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        watch: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> Proc:
        """
        Launch C{argv} with its output going to C{log}.

        @param watch: substrings of the output whose first appearance is
            timed (see L{Proc.marks}); the output is then read through a
            pipe by a thread.
        @param env: its environment (default L{child_env}).
        """
        log.parent.mkdir(parents=True, exist_ok=True)
        env = child_env() if env is None else env
        if not watch:
            with log.open("wb") as out:
                started = time.monotonic()
                popen = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            proc = Proc(name, popen, log, started)
            self.started.append(proc)
            return proc
        started = time.monotonic()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        proc = Proc(name, popen, log, started)
        self.started.append(proc)
        assert popen.stdout is not None
        proc.reader = threading.Thread(
            target=_pump,
            args=(popen.stdout, log.open("wb"), proc, tuple(watch)),
            daemon=True,
        )
        proc.reader.start()
        return proc

    def stop(self, proc: Proc) -> None:
        stop_process(proc.popen)
        if proc.reader is not None:
            proc.reader.join(STOP_TIMEOUT)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()


@contextlib.contextmanager
def terminated_on_sigterm() -> Iterator[None]:
    """
    Turn SIGTERM into C{SystemExit} so that every C{finally} (and so every
    L{Processes} block) runs when the bench itself is told to stop.
    """

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# What /proc says -------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """
    User plus system CPU time a process has used so far, from
    C{/proc/<pid>/stat}.
    """
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces: split after its ")".
    fields = raw.rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def status_kib(pid: int, key: str) -> int | None:
    """
    A C{kB} figure of C{/proc/<pid>/status} (C{VmHWM}, C{VmRSS}), or
    C{None} when the process (or the line) is gone.
    """
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


# Statistics ------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], fraction: float) -> float:
    """
    The C{fraction} quantile (0-1) by the nearest-rank method.
    """
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return ordered[rank - 1]


# The supernode and dfget -----------------------------------------------------


@dataclass
class TLSFiles:
    """
    PEM paths for one node: its certificate, key, and the CA it trusts.
    """

    cert: Path
    key: Path
    ca: Path

    def flags(self, prefix: str = "--tls-") -> list[str]:
        return [
            f"{prefix}cert",
            str(self.cert),
            f"{prefix}key",
            str(self.key),
            f"{prefix}ca",
            str(self.ca),
        ]


@dataclass
class Supernode:
    proc: Proc
    api_port: int
    piece_port: int
    home: Path

    @property
    def node(self) -> str:
        return f"{SUPERNODE_IP}:{self.api_port}"


def start_supernode(
    procs: Processes,
    home: Path,
    tls: TLSFiles | None = None,
    extra: Sequence[str] = (),
) -> Supernode:
    """
    Start C{twistd supernode} on 127.0.0.1 with a fresh C{home}, and wait
    until both its ports listen.
    """
    remove(home)
    home.mkdir(parents=True)
    api_port, piece_port = free_port(SUPERNODE_IP), free_port(SUPERNODE_IP)
    argv = [
        tool("twistd"),
        "-n",
        "--pidfile=",
        "-l",
        str(home / "supernode.log"),
        "supernode",
        "--listen-ip",
        SUPERNODE_IP,
        "--advertise-ip",
        SUPERNODE_IP,
        "--port",
        str(api_port),
        "--download-port",
        str(piece_port),
        "--home",
        str(home / "sn"),
        *(tls.flags() if tls else []),
        *extra,
    ]
    proc = procs.start("supernode", argv, home / "supernode.out")
    try:
        wait_port(SUPERNODE_IP, api_port)
        wait_port(SUPERNODE_IP, piece_port)
    except BenchError:
        raise BenchError(
            f"the supernode did not start: {proc.output()[-2000:]}"
        ) from None
    return Supernode(proc, api_port, piece_port, home)


SUCCESS = "download SUCCESS"


def start_dfget(
    procs: Processes,
    url: str,
    supernode: Supernode,
    ip: str,
    home: Path,
    output: Path,
    *,
    keep_serving: str = "60s",
    tls: TLSFiles | None = None,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> Proc:
    """
    Launch one C{dfget}; its C{download SUCCESS} line is timed.
    """
    remove(home)
    argv = [
        tool("dfget"),
        "-u",
        url,
        "-o",
        str(output),
        "--node",
        supernode.node,
        "--ip",
        ip,
        "--home",
        str(home),
        "--keep-serving",
        keep_serving,
        "--timeout",
        f"{DOWNLOAD_TIMEOUT:g}s",
        *(tls.flags() if tls else []),
    ]
    if wrap is not None:
        argv = wrap(argv)
    return procs.start(f"dfget {ip}", argv, home.with_suffix(".out"), (SUCCESS,))


@dataclass
class DfgetResult:
    """
    What one C{dfget} run did.

    @ivar seconds: from its launch to its C{download SUCCESS} line (the
        output in place), Python's start-up included.
    @ivar cost: C{dfget}'s own figure: registration to output in place.
    @ivar tiers: bytes of verified pieces by where they came from
        (C{peers}, C{supernode}, from the C{downloading piece} log; C{source}
        when the download went back to source).
    """

    code: int
    seconds: float
    cost: float
    length: int
    sha256: str
    tiers: dict[str, int]
    back_to_source: bool
    text: str
    cpu: float


def dfget_result(
    proc: Proc, home: Path, timeout: float = DOWNLOAD_TIMEOUT
) -> DfgetResult:
    """
    Wait for a C{dfget} to exit and read what it did.

    @raise BenchError: if it failed or ran out of time.
    """
    code = proc.wait(timeout)
    text = proc.output()
    if code != 0 or SUCCESS not in proc.marks:
        raise BenchError(f"{proc.name} failed (exit {code}): {text[-1500:]}")
    match = re.search(r"cost:([0-9.]+)s length:(\d+) sha256:([0-9a-f]{64})", text)
    if match is None:
        raise BenchError(f"{proc.name}: no result line in {text[-500:]!r}")
    length = int(match.group(2))
    tiers = piece_tiers(home / "logs" / "dfclient.log")
    back = "back to source" in text
    tiers["source"] = length if back else 0
    return DfgetResult(
        code=code,
        seconds=proc.marks[SUCCESS] - proc.started,
        cost=float(match.group(1)),
        length=length,
        sha256=match.group(3),
        tiers=tiers,
        back_to_source=back,
        text=text,
        cpu=proc.cpu,
    )


def piece_tiers(log: Path) -> dict[str, int]:
    """
    Bytes of the pieces a peer verified, by tier, from its
    C{downloading piece} lines (result 503 is a success, as in Dragonfly).
    """
    tiers = {"peers": 0, "supernode": 0}
    with contextlib.suppress(FileNotFoundError), log.open() as lines:
        for line in lines:
            _, found, record = line.partition("downloading piece:")
            if not found:
                continue
            piece = json.loads(record)
            if piece["result"] != 503:
                continue
            tier = "supernode" if piece["dstCid"].startswith("cdnnode:") else "peers"
            tiers[tier] += piece["pieceSize"]
    return tiers


# curl ------------------------------------------------------------------------


@dataclass
class CurlResult:
    """
    One C{curl} download: its own C{time_total}, the wall time of the
    process, and the bytes it wrote.
    """

    seconds: float
    wall: float
    size: int


def start_curl(
    procs: Processes, url: str, output: Path, log: Path, ca: Path | None = None
) -> Proc:
    argv = [
        tool("curl"),
        "--silent",
        "--show-error",
        "--fail",
        "--noproxy",
        "*",
        "--output",
        str(output),
        "--write-out",
        "CURL %{time_total} %{size_download}\\n",
    ]
    if ca is not None:
        argv += ["--cacert", str(ca)]
    return procs.start("curl", [*argv, url], log)


def curl_result(proc: Proc, timeout: float = DOWNLOAD_TIMEOUT) -> CurlResult:
    """
    Wait for a C{curl} to exit and read its figures.

    @raise BenchError: if it failed.
    """
    code = proc.wait(timeout)
    wall = time.monotonic() - proc.started
    text = proc.output()
    match = re.search(r"CURL ([0-9.]+) (\d+)", text)
    if code != 0 or match is None:
        raise BenchError(f"curl failed (exit {code}): {text[-500:]}")
    return CurlResult(float(match.group(1)), wall, int(match.group(2)))


# Files -----------------------------------------------------------------------


def make_random_file(path: Path, size: int) -> str:
    """
    Write C{size} random bytes to C{path}; return their sha256.
    """
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        left = size
        while left:
            block = os.urandom(min(left, 4 * MIB))
            digest.update(block)
            out.write(block)
            left -= len(block)
    path.chmod(0o644)
    return digest.hexdigest()


def size_text(size: float) -> str:
    """
    A byte count in binary units, short (C{256 MiB}, C{1 GiB}).
    """
    for unit, scale in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if size >= scale:
            value = size / scale
            return (
                f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
            )
    return f"{size:.0f} B"


def run_quiet(argv: Sequence[str], timeout: float = 10.0) -> str:
    """
    The output of a short command, or C{""} when it cannot run.
    """
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).decode("utf-8", "replace").strip()


Progress = Callable[[str], None]


@dataclass
class Context:
    """
    How this run goes: its work directory, C{--quick}, the repetitions, and
    where progress is told.
    """

    work: Path
    quick: bool
    repeat: int
    say: Progress
    repeat_given: bool = False
    profiler: "Profiler | None" = None


def start_source(procs: Processes, root: Path, log: Path, rate: int = 0) -> int:
    """
    Start the bench's HTTP source (L{dragonfly.bench.sources}) serving
    C{root} on 127.0.0.1, capped at C{rate} bytes per second in total when
    C{rate} is not 0; return its port.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "dragonfly.bench.sources",
        "--port",
        str(port),
        "--root",
        str(root),
        "--rate",
        str(rate),
    ]
    procs.start("source", argv, log)
    wait_port("127.0.0.1", port)
    return port


def foreign_cpu() -> dict[int, float]:
    """
    The CPU seconds used so far by every process that is neither this one
    nor one of its descendants: what else is loading the machine.
    """
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw.rpartition(")")[2].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        used[pid] = (int(fields[11]) + int(fields[12])) / tick
    me = os.getpid()

    def ours(pid: int) -> bool:
        seen = 0
        while pid > 1 and seen < 64:
            if pid == me:
                return True
            pid = parents.get(pid, 0)
            seen += 1
        return False

    return {pid: cpu for pid, cpu in used.items() if not ours(pid)}


def foreign_share(before: dict[int, float], seconds: float) -> float:
    """
    The share of the machine's CPUs that other processes used since
    C{before} (a L{foreign_cpu} reading), over C{seconds}.
    """
    after = foreign_cpu()
    spent = sum(after[pid] - cpu for pid, cpu in before.items() if pid in after)
    return spent / (max(seconds, 1e-6) * (os.cpu_count() or 1))


def tree_cpu_seconds(pid: int) -> float:
    """
    L{cpu_seconds} of a process and of its children (nginx's workers).
    """
    total = cpu_seconds(pid)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total
