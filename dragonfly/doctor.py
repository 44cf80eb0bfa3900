"""
C{dfget doctor}: check a host's Dragonfly set-up end to end and say, in
plain words, what works and what to do about what does not.

Design
======
  - One finding per line: C{OK}, C{WARN} (works, but probably not as
    intended) or C{FAIL} (broken), the thing checked, and what to do.  The
    exit status is 1 when anything failed, so the command fits in scripts;
    C{--json} gives the same findings to programs.
  - It checks what a pull actually depends on, in order: the supernodes
    answer, this host's dfpeer answers (its API and its registry mirror),
    the container engines are configured to use that mirror, a canary
    download goes through the swarm, and the recent downloads in the
    client log came from peers and not only from the supernode or source.
  - It is a short-lived command that checks one thing after another, each
    request bounded by C{--timeout}; nothing runs concurrently, so it uses
    plain blocking HTTP and no reactor.
  - The canary is a real download: dfpeer's C{/api/v1/files} API, the very
    path a container pull's layers take, verified against the digest dfpeer
    reports.  The configuration files checked are read, never changed.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from dragonfly.config import ConfigError, dfget_config_path, dfget_file_values
from dragonfly.peer.supernode_client import Node, parse_nodes
from dragonfly.units import format_size, parse_duration

OK, WARN, FAIL = "OK", "WARN", "FAIL"

#: How much of the end of dfclient.log is read: recent downloads only.
LOG_TAIL = 8 << 20

_PIECE = "downloading piece:"
_STARTED = re.compile(r"download of (?P<url>\S+) started \(task (?P<task>[0-9a-f]+)\)")
_FINISHED = re.compile(
    r"download of (?P<url>\S+) finished: \d+ bytes in \S+, (?P<peers>\d+) from "
    r"peers, (?P<supernode>\d+) from the supernode, (?P<source>\d+) from the source"
)


@dataclass(frozen=True)
class Finding:
    status: str
    check: str
    message: str

    def line(self) -> str:
        return f"{self.status:<4} {self.check}: {self.message}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfget doctor",
        description="Check this host's Dragonfly set-up and say what to fix.",
    )
    p.add_argument(
        "-n",
        "--node",
        action="append",
        default=[],
        help="supernode host:port to check; repeat or comma-separate "
        "(default: dfget.yml's node, else 127.0.0.1:8002)",
    )
    p.add_argument(
        "--dfpeer",
        default="http://127.0.0.1:65001",
        help="this host's dfpeer, as container engines reach it "
        "(default http://127.0.0.1:65001)",
    )
    p.add_argument(
        "--home",
        type=Path,
        default=None,
        help="dfget's work directory, whose logs/dfclient.log tells where "
        "recent downloads came from (default: dfget.yml's home, else "
        "$DFGET_HOME, else ~/.small-dragonfly)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="dfget's YAML file (default: $DFGET_CONFIG, else "
        "<home>/dfget.yml, else /etc/dragonfly/dfget.yml)",
    )
    p.add_argument(
        "--docker-config", type=Path, default=Path("/etc/docker/daemon.json")
    )
    p.add_argument(
        "--containerd-certs", type=Path, default=Path("/etc/containerd/certs.d")
    )
    p.add_argument(
        "--registries-conf", type=Path, default=Path("/etc/containers/registries.conf")
    )
    p.add_argument(
        "--registries-conf-d",
        type=Path,
        default=Path("/etc/containers/registries.conf.d"),
    )
    p.add_argument(
        "--canary",
        default="",
        help="URL to download through dfpeer as a test (default: none)",
    )
    p.add_argument(
        "--tasks",
        type=int,
        default=10,
        help="how many recent downloads of the log to summarise (default 10)",
    )
    p.add_argument(
        "--timeout",
        type=parse_duration,
        default=10.0,
        help="time limit of each request (default 10s)",
    )
    p.add_argument(
        "--canary-timeout",
        type=parse_duration,
        default=120.0,
        help="time limit of the canary download (default 120s)",
    )
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    return p


# HTTP ------------------------------------------------------------------------


@dataclass
class _Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def _get(url: str, timeout: float, limit: int = 1 << 20) -> _Answer:
    """
    GET C{url}; HTTP error statuses are answers, not exceptions.

    @raise OSError: when nothing answers.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "dfget-doctor"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            headers = {k.lower(): v for k, v in r.headers.items()}
            return _Answer(r.status, headers, r.read(limit))
    except urllib.error.HTTPError as e:
        with e:
            headers = {k.lower(): v for k, v in e.headers.items()}
            return _Answer(e.code, headers, e.read(limit))


def _why(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError) and not isinstance(
        error, urllib.error.HTTPError
    ):
        error = error.reason if isinstance(error.reason, BaseException) else error
    if isinstance(error, TimeoutError):
        return "no answer in time"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused: nothing listens there"
    return getattr(error, "strerror", None) or str(error)


# Settings --------------------------------------------------------------------


@dataclass
class _Settings:
    nodes: list[Node]
    home: Path
    findings: list[Finding]


def _settings(args: argparse.Namespace) -> _Settings:
    """
    The supernodes and home to check: the flags, else dfget's file, else
    dfget's defaults.
    """
    findings = []
    default_home = Path(os.environ.get("DFGET_HOME", "~/.small-dragonfly")).expanduser()
    values: dict[str, Any] = {}
    try:
        path = dfget_config_path(args.home or default_home, args.config)
        if path is not None:
            from dragonfly.dfget import parser as dfget_parser

            values = dfget_file_values(dfget_parser(), path)
            findings.append(Finding(OK, "dfget config", f"{path} is valid"))
    except ConfigError as e:
        findings.append(Finding(FAIL, "dfget config", f"{e}: fix the file"))
    home = args.home or values.get("home") or default_home
    try:
        nodes = parse_nodes(args.node or values.get("node") or ["127.0.0.1:8002"])
    except ValueError as e:
        findings.append(Finding(FAIL, "supernode", f"{e}: fix --node"))
        nodes = []
    return _Settings(nodes, Path(home), findings)


# Checks ----------------------------------------------------------------------


def check_supernodes(nodes: Sequence[Node], timeout: float) -> list[Finding]:
    """
    Each supernode answers C{/_ping}; one down among others that answer is
    a warning (downloads fail over), all down is a failure.
    """
    answers: list[tuple[Node, str]] = []
    for node in nodes:
        try:
            answer = _get(f"http://{node}/_ping", timeout)
            problem = (
                ""
                if answer.status == 200 and answer.body == b"OK"
                else f"answered HTTP {answer.status}, not a supernode's OK"
            )
        except OSError as e:
            problem = _why(e)
        answers.append((node, problem))
    reachable = any(not problem for _, problem in answers)
    findings = []
    for node, problem in answers:
        if not problem:
            findings.append(Finding(OK, "supernode", f"{node} answers"))
        else:
            findings.append(
                Finding(
                    WARN if reachable else FAIL,
                    "supernode",
                    f"{node} is not reachable ({problem}): start it "
                    "(systemctl start dragonfly-supernode) or fix the node list"
                    + (
                        "; downloads fail over to the others meanwhile"
                        if reachable
                        else "; without a supernode every download goes to the source"
                    ),
                )
            )
    return findings


def check_dfpeer(url: str, timeout: float) -> list[Finding]:
    """
    dfpeer answers on C{url}: its download API exists and its registry
    mirror answers C{/v2/} as a registry does.
    """
    base = url.rstrip("/")
    try:
        api = _get(f"{base}/api/v1/files", timeout)
    except OSError as e:
        return [
            Finding(
                FAIL,
                "dfpeer",
                f"{base} is not reachable ({_why(e)}): start it "
                "(systemctl start dragonfly-dfpeer) or give --dfpeer",
            )
        ]
    try:
        error = json.loads(api.body).get("error")
    except (ValueError, AttributeError):
        error = None
    if api.status != 400 or error != "bad_request":
        return [
            Finding(
                FAIL,
                "dfpeer",
                f"{base} answers, but not as dfpeer (GET /api/v1/files gave "
                f"HTTP {api.status}): is another program on that port?",
            )
        ]
    findings = [Finding(OK, "dfpeer", f"{base} answers (download API present)")]
    try:
        v2 = _get(f"{base}/v2/", timeout)
    except OSError as e:
        findings.append(
            Finding(FAIL, "registry mirror", f"{base}/v2/ did not answer ({_why(e)})")
        )
        return findings
    if "docker-distribution-api-version" in v2.headers and v2.status in (200, 401):
        findings.append(
            Finding(OK, "registry mirror", f"{base}/v2/ answers as a registry")
        )
    else:
        findings.append(
            Finding(
                WARN,
                "registry mirror",
                f"{base}/v2/ answered HTTP {v2.status} without a registry's "
                "Docker-Distribution-API-Version header: dfpeer cannot reach its "
                "upstream registry; check its --registry and the network",
            )
        )
    return findings


def _same_endpoint(candidate: str, mirror: str) -> bool:
    """
    Whether C{candidate} (a URL, or host:port as podman writes it) names the
    mirror at C{mirror}.
    """
    if "://" not in candidate:
        candidate = f"{urlsplit(mirror).scheme}://{candidate}"
    a, b = urlsplit(candidate.rstrip("/")), urlsplit(mirror.rstrip("/"))

    def host_port(parts: Any) -> tuple[str, int | None]:
        host = (parts.hostname or "").lower()
        host = "127.0.0.1" if host == "localhost" else host
        return host, parts.port or (443 if parts.scheme == "https" else 80)

    return host_port(a) == host_port(b)


def check_docker(path: Path, mirror: str) -> list[Finding]:
    """
    Docker's C{daemon.json} lists the mirror in C{registry-mirrors}.
    """
    if not path.exists():
        return [
            Finding(
                OK if not path.parent.exists() else WARN,
                "docker",
                f"no {path}"
                + (
                    " (docker is not set up here): nothing to check"
                    if not path.parent.exists()
                    else f": docker pulls skip the swarm; create it with "
                    f'{{"registry-mirrors": ["{mirror}"]}} and restart docker'
                ),
            )
        ]
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        return [Finding(FAIL, "docker", f"cannot read {path}: {e.strerror or e}")]
    except ValueError as e:
        return [
            Finding(
                FAIL,
                "docker",
                f"{path} is not valid JSON ({e}): dockerd will refuse to start; "
                "fix the file",
            )
        ]
    mirrors = config.get("registry-mirrors") if isinstance(config, dict) else None
    if not isinstance(mirrors, list):
        mirrors = []
    if any(isinstance(m, str) and _same_endpoint(m, mirror) for m in mirrors):
        return [Finding(OK, "docker", f"{path} uses {mirror} as a registry mirror")]
    return [
        Finding(
            FAIL,
            "docker",
            f"{path} does not list {mirror} in registry-mirrors "
            f"(it has {mirrors or 'none'}): add it and restart docker, or docker "
            "pulls skip the swarm",
        )
    ]


def _toml(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def check_containerd(directory: Path, mirror: str) -> list[Finding]:
    """
    Some C{<directory>/<registry>/hosts.toml} names the mirror as a host.
    """
    if not directory.is_dir():
        return [
            Finding(
                OK,
                "containerd",
                f"no {directory} (containerd registry hosts are not set up here): "
                "nothing to check",
            )
        ]
    findings = []
    pointing = []
    for hosts in sorted(directory.glob("*/hosts.toml")):
        try:
            config = _toml(hosts)
        except OSError as e:
            findings.append(
                Finding(FAIL, "containerd", f"cannot read {hosts}: {e.strerror or e}")
            )
            continue
        except tomllib.TOMLDecodeError as e:
            findings.append(
                Finding(
                    FAIL,
                    "containerd",
                    f"{hosts} is not valid TOML ({e}): containerd ignores it; "
                    "fix the file",
                )
            )
            continue
        hosts_table = config.get("host")
        names = list(hosts_table) if isinstance(hosts_table, dict) else []
        if any(_same_endpoint(n, mirror) for n in names):
            pointing.append(hosts.parent.name)
    if pointing:
        findings.append(
            Finding(
                OK,
                "containerd",
                f"{', '.join(pointing)} pulled through {mirror} "
                f"({directory}; containerd's config_path must name it)",
            )
        )
    elif not findings:
        findings.append(
            Finding(
                FAIL,
                "containerd",
                f"no hosts.toml under {directory} names {mirror}: add "
                f'[host."{mirror}"] with capabilities = ["pull", "resolve"] to '
                f"{directory}/docker.io/hosts.toml",
            )
        )
    return findings


def check_podman(path: Path, directory: Path, mirror: str) -> list[Finding]:
    """
    C{registries.conf} or a drop-in of C{registries.conf.d} has a
    C{[[registry.mirror]]} at the mirror.
    """
    files = [path] if path.exists() else []
    if directory.is_dir():
        files += sorted(directory.glob("*.conf"))
    if not files:
        return [
            Finding(
                OK,
                "podman",
                f"no {path} (podman/CRI-O/skopeo are not set up here): nothing "
                "to check",
            )
        ]
    findings = []
    pointing = []
    for conf in files:
        try:
            config = _toml(conf)
        except OSError as e:
            findings.append(
                Finding(FAIL, "podman", f"cannot read {conf}: {e.strerror or e}")
            )
            continue
        except tomllib.TOMLDecodeError as e:
            findings.append(
                Finding(
                    FAIL,
                    "podman",
                    f"{conf} is not valid TOML ({e}): podman refuses to pull; "
                    "fix the file",
                )
            )
            continue
        registries = config.get("registry")
        for registry in registries if isinstance(registries, list) else []:
            mirrors = registry.get("mirror") if isinstance(registry, dict) else None
            for entry in mirrors if isinstance(mirrors, list) else []:
                location = entry.get("location") if isinstance(entry, dict) else None
                if isinstance(location, str) and _same_endpoint(location, mirror):
                    pointing.append(f"{registry.get('location', '?')} ({conf})")
    if pointing:
        findings.append(
            Finding(OK, "podman", f"{', '.join(pointing)} mirrored by {mirror}")
        )
    elif not findings:
        location = urlsplit(mirror).netloc
        findings.append(
            Finding(
                FAIL,
                "podman",
                f"no [[registry.mirror]] at {location} in {path} or "
                f"{directory}: add one (with insecure = true for http) under "
                'the [[registry]] with location = "docker.io"',
            )
        )
    return findings


def check_canary(url: str, dfpeer: str, timeout: float) -> list[Finding]:
    """
    Download C{url} through dfpeer's API, verify its sha256, and say where
    the bytes came from.
    """
    if not url:
        return [
            Finding(
                WARN,
                "canary",
                "no test download made: give --canary URL (a file the "
                "supernode can fetch) to check the swarm end to end",
            )
        ]
    target = f"{dfpeer.rstrip('/')}/api/v1/files?url={quote(url, safe='')}"
    started = time.monotonic()
    digest = hashlib.sha256()
    length = 0
    try:
        request = urllib.request.Request(target, headers={"User-Agent": "dfget-doctor"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            headers = {k.lower(): v for k, v in r.headers.items()}
            while block := r.read(1 << 20):
                digest.update(block)
                length += len(block)
                if time.monotonic() - started > timeout:
                    raise TimeoutError
    except urllib.error.HTTPError as e:
        with e:
            try:
                body = json.loads(e.read(1 << 16))
                reason = f"{body.get('error')}: {body.get('message')}"
            except (ValueError, AttributeError):
                reason = f"HTTP {e.code}"
        return [Finding(FAIL, "canary", f"{url} failed through dfpeer ({reason})")]
    except OSError as e:
        return [Finding(FAIL, "canary", f"{url} could not be downloaded ({_why(e)})")]
    seconds = time.monotonic() - started
    if digest.hexdigest() != headers.get("x-dragonfly-sha256"):
        return [
            Finding(
                FAIL,
                "canary",
                f"{url}: the {length} bytes received do not match the sha256 "
                "dfpeer announced (a truncated or corrupted transfer)",
            )
        ]
    try:
        tiers = json.loads(headers.get("x-dragonfly-from", "{}"))
    except ValueError:
        tiers = {}
    split = _split(tiers)
    if tiers.get("source") and not (tiers.get("peers") or tiers.get("supernode")):
        return [
            Finding(
                WARN,
                "canary",
                f"{url} came from the source, not the swarm ({split}): dfpeer's "
                "log says why it went back to source",
            )
        ]
    held = "" if any(tiers.values()) else "; dfpeer already held it"
    return [
        Finding(
            OK,
            "canary",
            f"{url}: {format_size(length)} verified in {seconds:.1f}s ({split}){held}",
        )
    ]


def _split(tiers: dict[str, int]) -> str:
    return ", ".join(
        f"{format_size(tiers.get(tier, 0))} from {name}"
        for tier, name in (
            ("peers", "peers"),
            ("supernode", "the supernode"),
            ("source", "the source"),
        )
    )


def _tail_lines(path: Path) -> Iterator[str]:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - LOG_TAIL))
        data = f.read()
    lines = data.decode("utf-8", "replace").splitlines()
    # A partial first line when reading from the middle.
    yield from lines[1:] if size > LOG_TAIL else lines


def recent_tasks(log: Path, count: int) -> list[dict[str, int]]:
    """
    The bytes by tier of the last C{count} downloads in C{log}: from their
    C{finished} lines where the log has them (dfget's), else from their
    C{downloading piece} lines (dfpeer's log has only those: pieces from
    C{cdnnode:} peer ids are the supernode's, others are peers').
    """
    url_task: dict[str, str] = {}
    pieces: dict[str, dict[str, int]] = {}
    finished: dict[str, dict[str, int]] = {}
    last_seen: dict[str, int] = {}
    for number, line in enumerate(_tail_lines(log)):
        if _PIECE in line:
            try:
                piece = json.loads(line.split(_PIECE, 1)[1])
                task, peer = piece["taskID"], piece["dstCid"]
                size = int(piece["pieceSize"]) if piece["result"] == 503 else 0
            except (ValueError, KeyError, TypeError):
                continue
            tier = "supernode" if str(peer).startswith("cdnnode:") else "peers"
            counts = pieces.setdefault(task, {"peers": 0, "supernode": 0, "source": 0})
            counts[tier] += size
            last_seen[task] = number
        elif started := _STARTED.search(line):
            url_task[started["url"]] = started["task"]
            last_seen[started["task"]] = number
        elif (done := _FINISHED.search(line)) and done["url"] in url_task:
            task = url_task[done["url"]]
            finished[task] = {
                tier: int(done[tier]) for tier in ("peers", "supernode", "source")
            }
            last_seen[task] = number
    order = sorted(last_seen, key=last_seen.__getitem__)[-count:] if count else []
    return [
        finished.get(t) or pieces.get(t) or {"peers": 0, "supernode": 0, "source": 0}
        for t in order
    ]


def check_recent(home: Path, count: int) -> list[Finding]:
    """
    Where the last downloads' bytes came from, by the client log.
    """
    log = home / "logs" / "dfclient.log"
    if not log.is_file():
        return [
            Finding(
                WARN,
                "recent downloads",
                f"no {log}: nothing downloaded with this home yet (give --home "
                "of the dfget or dfpeer to look at, e.g. /var/lib/dragonfly-dfpeer)",
            )
        ]
    try:
        tasks = recent_tasks(log, count)
    except OSError as e:
        return [
            Finding(FAIL, "recent downloads", f"cannot read {log}: {e.strerror or e}")
        ]
    tiers = {
        tier: sum(t[tier] for t in tasks) for tier in ("peers", "supernode", "source")
    }
    total = sum(tiers.values())
    if not tasks or not total:
        return [
            Finding(
                WARN,
                "recent downloads",
                f"{log} records no finished download yet: pull something "
                "(or use --canary) and check again",
            )
        ]
    summary = f"last {len(tasks)} downloads: " + ", ".join(
        f"{format_size(tiers[tier])} ({100 * tiers[tier] / total:.0f}%) from {name}"
        for tier, name in (
            ("peers", "peers"),
            ("supernode", "the supernode"),
            ("source", "the source"),
        )
    )
    if tiers["peers"]:
        return [Finding(OK, "recent downloads", summary)]
    advice = (
        "nothing came from other peers. That is expected on the first host to "
        "fetch a file; if other hosts had these files already, they cannot be "
        "reached at their advertised --ip/--peer-port (firewall?)"
    )
    if tiers["source"] and not tiers["supernode"]:
        advice = (
            "everything came straight from the source: the swarm was not used "
            "(no supernode reachable?); dfclient.log says why"
        )
    return [Finding(WARN, "recent downloads", f"{summary}; {advice}")]


# The command -----------------------------------------------------------------


def run_checks(args: argparse.Namespace) -> list[Finding]:
    settings = _settings(args)
    findings = list(settings.findings)
    findings += check_supernodes(settings.nodes, args.timeout)
    findings += check_dfpeer(args.dfpeer, args.timeout)
    findings += check_docker(args.docker_config, args.dfpeer)
    findings += check_containerd(args.containerd_certs, args.dfpeer)
    findings += check_podman(args.registries_conf, args.registries_conf_d, args.dfpeer)
    findings += check_canary(args.canary, args.dfpeer, args.canary_timeout)
    findings += check_recent(settings.home, args.tasks)
    return findings


def main(argv: Sequence[str]) -> int:
    """
    C{dfget doctor}: print the findings; 0 when nothing failed, else 1.
    """
    p = parser()
    args = p.parse_args(argv)
    if args.tasks < 0:
        p.error("--tasks must not be negative")
    if urlsplit(args.dfpeer).scheme not in ("http", "https"):
        p.error(f"--dfpeer must be an http:// or https:// URL, got {args.dfpeer!r}")
    findings = run_checks(args)
    failed = any(f.status == FAIL for f in findings)
    if args.json:
        print(
            json.dumps(
                {"ok": not failed, "findings": [asdict(f) for f in findings]},
                indent=2,
            )
        )
    else:
        for finding in findings:
            print(finding.line())
    sys.stdout.flush()
    return 1 if failed else 0
