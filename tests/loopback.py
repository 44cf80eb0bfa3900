"""
Machinery for the real-process loopback tests: a counting HTTP source, free
ports, supernode / dfpeer daemons under C{twistd -n}, C{dfget} runs and test
files of random bytes.

Every process started here is tracked by PID and ended (SIGTERM, then
SIGKILL after a bounded wait) when its test ends, whether it passed or not.
Only loopback addresses (127.0.0.0/8) are used.
"""

import hashlib
import json
import os
import select
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from certs import PKI

from dragonfly.devtools import processes as _processes
from dragonfly.devtools.processes import free_port, stop_process

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MIB = 1 << 20
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


def _script(name: str) -> list[str]:
    beside = BIN / name
    if beside.exists():
        return [str(beside)]
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return [found]


def child_env() -> dict[str, str]:
    """
    The environment of the processes tests start: L{_processes.child_env}
    with C{DFGET_CONFIG} empty, so that no dfget run reads a configuration
    file of the machine (C{/etc/dragonfly/dfget.yml}) or of the caller.
    Daemons get C{--config=} on their command lines for the same reason.
    """
    env = _processes.child_env()
    env["DFGET_CONFIG"] = ""
    return env


def twistd_cmd() -> list[str]:
    return _script("twistd")


def dfget_cmd() -> list[str]:
    return _script("dfget")


# Ports -----------------------------------------------------------------------


# Processes -------------------------------------------------------------------


class Processes:
    """
    Processes started by one test, ended when it finishes.
    """

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[Any]] = []

    def popen(self, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        kwargs.setdefault("env", child_env())
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(list(args), **kwargs)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            stop_process(proc)


# Files -----------------------------------------------------------------------


@dataclass(frozen=True)
class TestFile:
    __test__ = False

    path: Path
    size: int
    sha256: str

    @property
    def digest(self) -> str:
        return f"sha256:{self.sha256}"


def make_file(path: Path, size: int) -> TestFile:
    """
    Write C{size} random bytes to C{path}.
    """
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(4 * MIB, left))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return TestFile(path, size, digest.hexdigest())


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            digest.update(block)
    return digest.hexdigest()


# The source ------------------------------------------------------------------


@dataclass
class SourceServer:
    root: Path
    log: Path
    host: str
    port: int
    proc: subprocess.Popen[Any]

    def url(self, name: str) -> str:
        return f"http://{self.host}:{self.port}/{name}"

    def add_file(self, name: str, size: int) -> TestFile:
        return make_file(self.root / name, size)

    def requests(self, name: str | None = None) -> list[dict[str, Any]]:
        entries = [
            json.loads(line)
            for line in self.log.read_text().splitlines()
            if line.strip()
        ]
        if name is not None:
            entries = [e for e in entries if e["path"] == f"/{name}"]
        return entries

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> None:
        """
        Wait until C{count} requests are logged: the source logs a request
        after its body went out, so a client can have it all first.
        """
        deadline = time.monotonic() + timeout
        while len(self.requests()) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def bytes_sent(self, name: str) -> int:
        return sum(e["bytes_sent"] for e in self.requests(name) if e["method"] == "GET")


def _read_port(proc: subprocess.Popen[Any], timeout: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    while time.monotonic() < deadline and not line.endswith(b"\n"):
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                break
            line += chunk
        elif proc.poll() is not None:
            break
    text = line.decode().strip()
    if not text.startswith("PORT "):
        raise RuntimeError(f"source server did not start (said {text!r})")
    return int(text.split()[1])


def start_source(
    processes: Processes, directory: Path, host: str = "127.0.0.1", rate: int = 0
) -> SourceServer:
    """
    The counting source on C{host}, serving C{directory/source}; with
    C{rate}, each response body goes at most that many bytes per second.
    """
    root = directory / "source"
    root.mkdir(parents=True, exist_ok=True)
    log = directory / "source-requests.jsonl"
    stderr = open(directory / "source-server.err", "wb")  # noqa: SIM115
    proc = processes.popen(
        [
            sys.executable,
            str(TESTS / "source_server.py"),
            "--root",
            str(root),
            "--bind",
            host,
            "--port",
            "0",
            "--log",
            str(log),
            "--rate",
            str(rate),
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    stderr.close()
    port = _read_port(proc, START_TIMEOUT)
    return SourceServer(root, log, host, port, proc)


# TLS -------------------------------------------------------------------------


def client_context(
    pki: PKI, ip: str = "127.0.0.1", rogue: bool = False
) -> ssl.SSLContext:
    """
    A client context trusting the test CA and presenting the leaf of C{ip}
    (from the untrusted CA when C{rogue}).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    leaf = pki.rogue_leaf(ip) if rogue else pki.leaf(ip)
    context.load_cert_chain(str(leaf.cert), str(leaf.key))
    return context


# HTTP ------------------------------------------------------------------------


def http_get(
    url: str,
    timeout: float = 10.0,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """
    GET C{url}: status, headers (lower-cased names) and body; HTTP errors
    are returned, not raised.
    """
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get_json(
    url: str, timeout: float = 10.0, context: ssl.SSLContext | None = None
) -> Any:
    status, _, body = http_get(url, timeout, context)
    assert status == 200, (url, status, body[:500])
    return json.loads(body)


def wait_for_ping(
    url: str,
    proc: subprocess.Popen[Any],
    log: Path,
    timeout: float = START_TIMEOUT,
    context: ssl.SSLContext | None = None,
) -> None:
    """
    Wait until C{url} answers 200 C{OK}; fail early if the process exits.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"daemon exited with {proc.returncode} before answering {url}:\n"
                + _tail(log)
            )
        try:
            status, _, body = http_get(url, timeout=2.0, context=context)
            if status == 200 and body == b"OK":
                return
            last = (status, body[:200])
        except (OSError, ssl.SSLError) as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(
        f"{url} did not answer within {timeout}s ({last!r}):\n" + _tail(log)
    )


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# Daemons ---------------------------------------------------------------------


@dataclass
class Daemon:
    proc: subprocess.Popen[Any]
    log: Path
    home: Path
    ip: str
    port: int
    context: ssl.SSLContext | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.context else "http"

    @property
    def node(self) -> str:
        return f"{self.ip}:{self.port}"

    def url(self, path: str) -> str:
        return f"{self.scheme}://{self.ip}:{self.port}{path}"

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        return get_json(self.url(path), timeout, self.context)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        return stop_process(self.proc, timeout)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def tls_args(pki: PKI | None, ip: str) -> list[str]:
    if pki is None:
        return []
    leaf = pki.leaf(ip)
    return [
        "--tls-cert",
        str(leaf.cert),
        "--tls-key",
        str(leaf.key),
        "--tls-ca",
        str(pki.ca),
    ]


def start_supernode(
    processes: Processes,
    directory: Path,
    *,
    ip: str = "127.0.0.1",
    pki: PKI | None = None,
    extra: Sequence[str] = (),
    context: ssl.SSLContext | None = None,
    ports: tuple[int, int] | None = None,
) -> Daemon:
    """
    C{twistd -n supernode} on C{ip} with free API and piece ports (or the
    C{ports} given, to restart one), waited for until C{/_ping} answers.

    With C{pki} it runs mutual TLS with the leaf of C{ip}; a TLS setup of
    the caller's own goes in C{extra}, with the client C{context} to reach it.
    """
    directory.mkdir(parents=True, exist_ok=True)
    api_port, piece_port = ports or (free_port(ip), free_port(ip))
    log = directory / "supernode.log"
    home = directory / "supernode-home"
    args = [
        *twistd_cmd(),
        "-n",
        "--pidfile=",
        "-l",
        str(log),
        "supernode",
        "--config=",  # never /etc/dragonfly/supernode.yml; extra may name one
        "--port",
        str(api_port),
        "--download-port",
        str(piece_port),
        "--listen-ip",
        ip,
        "--advertise-ip",
        ip,
        "--home",
        str(home),
        *tls_args(pki, ip),
        *extra,
    ]
    out = open(directory / "supernode.out", "wb")  # noqa: SIM115
    proc = processes.popen(args, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    if context is None and pki is not None:
        context = client_context(pki, ip)
    daemon = Daemon(proc, log, home, ip, api_port, context, {"piece_port": piece_port})
    wait_for_ping(daemon.url("/_ping"), proc, log, context=context)
    return daemon


def start_dfpeer(
    processes: Processes,
    directory: Path,
    node: str,
    *,
    ip: str,
    pki: PKI | None = None,
    extra: Sequence[str] = (),
    https_context: ssl.SSLContext | None = None,
) -> Daemon:
    """
    C{twistd -n dfpeer} serving pieces on C{ip} and its HTTP API on C{ip}
    (over HTTPS, checked with C{https_context}, when C{extra} has --cert).
    """
    directory.mkdir(parents=True, exist_ok=True)
    api_port, peer_port = free_port(ip), free_port(ip)
    log = directory / "dfpeer.log"
    home = directory / "dfpeer-home"
    args = [
        *twistd_cmd(),
        "-n",
        "--pidfile=",
        "-l",
        str(log),
        "dfpeer",
        "--config=",  # never /etc/dragonfly/dfpeer.yml; extra may name one
        "--node",
        node,
        "--ip",
        ip,
        "--peer-port",
        str(peer_port),
        "--port",
        str(api_port),
        "--listen-ip",
        ip,
        "--home",
        str(home),
        *tls_args(pki, ip),
        *extra,
    ]
    out = open(directory / "dfpeer.out", "wb")  # noqa: SIM115
    proc = processes.popen(args, cwd=directory, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    daemon = Daemon(
        proc, log, home, ip, api_port, https_context, {"peer_port": peer_port}
    )
    wait_for_ping(daemon.url("/_ping"), proc, log, context=https_context)
    return daemon


# dfget -----------------------------------------------------------------------


@dataclass
class DfgetResult:
    code: int
    stdout: str
    stderr: str
    home: Path
    output: Path

    def pieces(self) -> list[dict[str, Any]]:
        return piece_lines(self.home)


class DfgetRun:
    """
    A running dfget; L{finish} waits for it (bounded) and collects its output.
    """

    def __init__(
        self, proc: subprocess.Popen[Any], directory: Path, home: Path, output: Path
    ) -> None:
        self.proc = proc
        self.directory = directory
        self.home = home
        self.output = output

    def finish(self, timeout: float = 90.0) -> DfgetResult:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc)
            raise AssertionError(
                f"dfget did not finish within {timeout}s:\n"
                + _tail(self.directory / "stderr")
                + "\n"
                + _tail(self.home / "logs" / "dfclient.log")
            ) from None
        return DfgetResult(
            code,
            (self.directory / "stdout").read_text(errors="replace"),
            (self.directory / "stderr").read_text(errors="replace"),
            self.home,
            self.output,
        )


class Dfget:
    """
    Starts C{dfget} processes for one test, each in its own directory.
    """

    def __init__(self, processes: Processes, directory: Path) -> None:
        self.processes = processes
        self.directory = directory
        self.count = 0

    def start(
        self,
        url: str,
        *,
        node: str | None = None,
        ip: str = "127.0.0.1",
        pki: PKI | None = None,
        name: str | None = None,
        output: Path | None = None,
        extra: Sequence[str] = (),
    ) -> DfgetRun:
        self.count += 1
        run_dir = self.directory / (name or f"dfget{self.count}-{ip}")
        run_dir.mkdir(parents=True, exist_ok=True)
        home = run_dir / "home"
        output = output or run_dir / "out.bin"
        args = [
            *dfget_cmd(),
            "-u",
            url,
            "-o",
            str(output),
            "--ip",
            ip,
            "--home",
            str(home),
        ]
        if node is not None:
            args += ["--node", node]
        args += [*tls_args(pki, ip), *extra]
        with (
            open(run_dir / "stdout", "wb") as out,
            open(run_dir / "stderr", "wb") as err,
        ):
            proc = self.processes.popen(args, cwd=run_dir, stdout=out, stderr=err)
        return DfgetRun(proc, run_dir, home, output)

    def run(self, url: str, timeout: float = 90.0, **kwargs: Any) -> DfgetResult:
        return self.start(url, **kwargs).finish(timeout)


def run_dfget_args(
    args: Sequence[str], cwd: Path, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """
    Run C{dfget} with raw arguments (for command-line checks).
    """
    return subprocess.run(
        [*dfget_cmd(), *args],
        cwd=cwd,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def piece_lines(home: Path) -> list[dict[str, Any]]:
    """
    The C{downloading piece:{json}} records of C{home/logs/dfclient.log}.
    """
    log = home / "logs" / "dfclient.log"
    if not log.exists():
        return []
    marker = "downloading piece:"
    records = []
    for line in log.read_text(errors="replace").splitlines():
        if marker in line:
            records.append(json.loads(line.split(marker, 1)[1]))
    return records
