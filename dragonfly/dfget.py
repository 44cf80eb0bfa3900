"""
C{dfget}: download one URL through the swarm.

Exit codes (also in C{docs/dfget.md}):

  - 0: downloaded and verified; the output is in place.
  - 2: bad command line.
  - 3: the source refused or failed (HTTP error, unreachable, short body).
  - 4: the content does not match C{--digest}.
  - 5: C{--timeout} passed.
  - 6: no supernode reachable and C{--notbs} forbids going to the source,
    or the swarm failed.
  - 7: local error: the output or home cannot be written (disk full, ...).
  - 1: anything else (a bug: the log says more).
"""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater, react
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
)

from dragonfly import __version__
from dragonfly.cli import parse_header, tls_from_args, typed
from dragonfly.clientlog import make_sign, open_client_log
from dragonfly.config import add_dfget_config_argument, apply_dfget_config
from dragonfly.gc import Watermarks
from dragonfly.options import ip_address
from dragonfly.peer.engine import DownloadError, DownloadRequest, DownloadResult, place
from dragonfly.peer.gc import StoreCollector
from dragonfly.peer.node import PeerConfig, PeerNode
from dragonfly.peer.supernode_client import (
    SupernodeRefused,
    SupernodeUnavailable,
    parse_nodes,
)
from dragonfly.tasks import InvalidRequest, check_digest, check_url
from dragonfly.units import format_size, parse_duration, parse_size

EXIT_CODES = {
    "source": 3,
    "digest": 4,
    "timeout": 5,
    "supernode": 6,
    "swarm": 6,
    "io": 7,
}

_log = Logger()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfget",
        description="Download a URL through the Dragonfly swarm.",
        epilog="Other commands: 'dfget preheat' fills the supernode's cache "
        "with a file or an image before a rollout; 'dfget doctor' checks "
        "this host's set-up end to end.  Each takes --help.",
    )
    p.add_argument(
        "-u",
        "--url",
        required=True,
        type=typed(check_url, "URL"),
        help="http or https URL to download",
    )
    p.add_argument(
        "-o",
        "--output",
        help="file to write (default: the URL's "
        "last path segment in the current directory)",
    )
    p.add_argument(
        "-n",
        "--node",
        action="append",
        default=[],
        help="supernode host:port; repeat or comma-separate for "
        "fail-over in order (default 127.0.0.1:8002)",
    )
    p.add_argument(
        "--home",
        type=Path,
        default=Path(os.environ.get("DFGET_HOME", "~/.small-dragonfly")).expanduser(),
        help="work directory: logs/dfclient.log, data/ (default ~/.small-dragonfly)",
    )
    p.add_argument(
        "--ip",
        type=typed(ip_address, "IP"),
        default="127.0.0.1",
        help="address to bind and advertise to other peers (default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=0,
        help="port serving pieces to other peers (default: any free port)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        type=typed(parse_header, "header"),
        help="'Name: value' header for the source; repeatable",
    )
    p.add_argument(
        "--digest",
        type=typed(check_digest, "digest"),
        default=None,
        help="expected sha256:<hex> of the whole file",
    )
    p.add_argument(
        "-i",
        "--identifier",
        default="",
        help="extra task identity (the same URL with different content)",
    )
    p.add_argument(
        "-f",
        "--filter",
        default="",
        help="'&'-separated query parameters ignored in the task identity",
    )
    p.add_argument(
        "-s",
        "--locallimit",
        type=typed(parse_size, "size"),
        default=0,
        help="download rate limit for this file, e.g. 50M (default: none)",
    )
    p.add_argument(
        "--totallimit",
        type=typed(parse_size, "size"),
        default=0,
        help="download rate limit for this process (default: none)",
    )
    p.add_argument(
        "--uploadlimit",
        type=typed(parse_size, "size"),
        default=0,
        help="upload rate limit to other peers (default: none)",
    )
    p.add_argument(
        "-e",
        "--timeout",
        type=typed(parse_duration, "duration"),
        default=0.0,
        help="give up after this long, e.g. 10m (default: never; stalls "
        "are caught by the watchdogs)",
    )
    p.add_argument(
        "--notbs", action="store_true", help="never download straight from the source"
    )
    p.add_argument(
        "--keep-serving",
        type=typed(parse_duration, "duration"),
        default=60.0,
        help="after finishing, keep serving pieces while other peers "
        "still download, at most this long (default 60s; 0: exit at once)",
    )
    p.add_argument(
        "--stall-timeout",
        type=typed(parse_duration, "duration"),
        default=15.0,
        help="move a piece to another node when its node sends nothing for "
        "this long (default 15s)",
    )
    p.add_argument(
        "--tls-cert", default="", help="PEM certificate for TLS piece transfers"
    )
    p.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    p.add_argument(
        "--tls-ca", default="", help="PEM CA that peers' certificates must be signed by"
    )
    p.add_argument(
        "--showbar",
        "-b",
        action="store_true",
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )
    p.add_argument("--verbose", action="store_true", help="log debug events too")
    add_dfget_config_argument(p)
    p.add_argument("--version", action="version", version=f"dfget {__version__}")
    return p


def default_output(url: str) -> Path:
    """
    The output path named after the URL's last path segment, in the current
    directory.

    @raise InvalidRequest: when that segment cannot safely name a file (it
        is empty, a dot name, or decodes to something with a slash or NUL:
        C{..%2F..%2Fetc%2Fx} must not write outside the directory).
    """
    name = unquote(urlsplit(url).path.rstrip("/").rpartition("/")[2])
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidRequest(f"cannot name the output after {url!r}: give --output")
    return Path.cwd() / name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = parser()
    args = apply_dfget_config(p, argv, p.parse_args(argv))
    try:
        args.nodes = parse_nodes(args.node or ["127.0.0.1:8002"])
        args.output = (
            Path(args.output).absolute() if args.output else default_output(args.url)
        )
    except (ValueError, InvalidRequest) as e:
        p.error(str(e))
    if args.output.is_dir():
        p.error(f"--output {args.output} is a directory")
    args.tls = tls_from_args(p, args)
    if not 0 <= args.port < 65536:
        p.error(f"--port {args.port} is not a port number")
    if args.showbar is None:
        args.showbar = sys.stderr.isatty()
    return args


class _Progress:
    """
    A progress bar on the terminal (rich), or nothing.
    """

    def __init__(self, enabled: bool, name: str) -> None:
        self._bar: Any = None
        if enabled:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TransferSpeedColumn,
            )

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                transient=True,
                auto_refresh=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(name, total=None)

    def update(self, done: int, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
            self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


async def download(reactor: Any, args: argparse.Namespace) -> int:
    """
    Run one download; return the exit code.
    """
    started = reactor.seconds()
    try:
        observer, stream = open_client_log(args.home, make_sign())
    except OSError as e:
        return _failed(reactor, started, 7, f"cannot write logs in --home: {e}")
    level = LogLevel.debug if args.verbose else LogLevel.info
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                observer, [LogLevelFilterPredicate(defaultLogLevel=level)]
            )
        ],
        redirectStandardIO=False,
    )
    try:
        return await _download(reactor, args, observer, started)
    finally:
        stream.close()


async def _download(
    reactor: Any, args: argparse.Namespace, observer: Any, started: float
) -> int:
    try:
        node = PeerNode(
            reactor,
            PeerConfig(
                home=args.home,
                ip=args.ip,
                port=args.port,
                nodes=args.nodes,
                tls=args.tls,
                total_limit=args.totallimit,
                upload_limit=args.uploadlimit,
                stall_timeout=args.stall_timeout,
            ),
            piece_log=observer,
        )
    except OSError as e:
        return _failed(reactor, started, 7, f"cannot use --home {args.home}: {e}")
    # Alongside the download: delete what killed dfgets and stopped dfpeers
    # left in data/ (no size or age limit applies to a one-shot's store).
    reclaiming = StoreCollector(node.engine, Watermarks(), 0).collect()
    progress = _Progress(args.showbar, args.output.name)
    headers: dict[str, list[str]] = {}
    for name, value in args.header:
        headers.setdefault(name, []).append(value)
    request = DownloadRequest(
        url=args.url,
        headers=headers,
        digest=args.digest or "",
        identifier=args.identifier,
        filters=[f for f in args.filter.split("&") if f],
        back_to_source=not args.notbs,
        local_limit=args.locallimit,
        timeout=args.timeout,
        progress=progress.update,
    )
    try:
        try:
            await node.listen()
        except CannotListenError as e:
            return _failed(reactor, started, 7, f"cannot serve pieces: {e}")
        result = await node.engine.download(request)
        progress.close()
        await node.store.in_thread(place, result.task_file, args.output)
    except DownloadError as e:
        progress.close()
        return _failed(reactor, started, EXIT_CODES.get(e.kind, 1), e.message)
    except OSError as e:
        progress.close()
        return _failed(
            reactor, started, 7, f"{e.strerror or e}: {e.filename or args.output}"
        )
    else:
        _succeeded(result, args.output)
        if not result.back_to_source_reason:
            await _keep_serving(reactor, node, result, args.keep_serving)
    finally:
        progress.close()
        await reclaiming
        await node.stop(remove_data=True)
    return 0


def _succeeded(result: DownloadResult, output: Path) -> None:
    tiers = result.bytes_by_tier
    print(
        f"download SUCCESS cost:{result.seconds:.3f}s length:{result.length} "
        f"sha256:{result.sha256} output:{output}\n"
        f"  from peers {format_size(tiers['peers'])}, supernode "
        f"{format_size(tiers['supernode'])}, source {format_size(tiers['source'])}"
        + (
            f" (back to source: {result.back_to_source_reason})"
            if result.back_to_source_reason
            else ""
        )
    )


def _failed(reactor: Any, started: float, code: int, message: str) -> int:
    _log.error("download failed: {message}", message=message)
    print(
        f"dfget: download FAIL({code}) cost:{reactor.seconds() - started:.3f}s "
        f"error: {message}",
        file=sys.stderr,
    )
    return code


async def _keep_serving(
    reactor: Any, node: PeerNode, result: DownloadResult, limit: float
) -> None:
    """
    Serve pieces to the rest of the swarm while it still downloads, within
    C{limit} seconds.
    """
    deadline = reactor.seconds() + limit
    while reactor.seconds() < deadline:
        try:
            reply = await node.engine.supernodes.schedule(
                result.task_id,
                {"peer_id": node.peer_id, "finished": [], "want": 0},
                5.0,
            )
        except (SupernodeUnavailable, SupernodeRefused):
            return
        if not reply.get("downloading") or reply.get("status") == "failed":
            return
        await deferLater(reactor, min(1.0, max(0.0, deadline - reactor.seconds())))


def main(argv: Sequence[str] | None = None) -> None:
    """
    The C{dfget} console script.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["preheat"]:
        from dragonfly.preheat_cli import main as preheat_main

        preheat_main(argv[1:])
        return
    if argv[:1] == ["doctor"]:
        from dragonfly import doctor

        raise SystemExit(doctor.main(argv[1:]))
    args = parse_args(argv)

    async def run(reactor: Any) -> None:
        code = await download(reactor, args)
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
