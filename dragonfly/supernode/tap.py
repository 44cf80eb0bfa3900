"""
C{twistd supernode}: options and service composition.
"""

from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.python import usage

from dragonfly.config import ConfigOptions
from dragonfly.gc import FreeSpace, parse_free_space
from dragonfly.http import http_client
from dragonfly.httpserver import DaemonSite
from dragonfly.options import (
    HTTP_TIMEOUT_PARAMETER,
    TLS_PARAMETERS,
    check_tls_options,
    converted,
    duration_option,
    guess_ip,
    ip_address,
    port_number,
    size_option,
    tls_from_options,
)
from dragonfly.piece_protocol import Identity, PieceServerFactory
from dragonfly.services import RequiredPort
from dragonfly.supernode.api import root
from dragonfly.supernode.scheduler import Limits
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import InMemorySwarmState
from dragonfly.tasks import MAX_PIECE_SIZE
from dragonfly.tls import TLSConfig


class Options(ConfigOptions):
    synopsis = "[options]"
    config_default = "/etc/dragonfly/supernode.yml"
    longdesc = (
        "Run a supernode: it fetches each file from its source once, caches "
        "it in pieces and schedules which peer fetches which piece from whom."
    )
    optParameters = [
        ["port", "p", 8002, "Control API port.", converted(port_number, "port")],
        [
            "download-port",
            None,
            8001,
            "Piece protocol port.",
            converted(port_number, "download-port"),
        ],
        [
            "listen-ip",
            None,
            "",
            "Address to listen on (default: all).",
            converted(ip_address, "listen-ip"),
        ],
        [
            "advertise-ip",
            None,
            "",
            "Address peers reach this supernode at "
            "(default: --listen-ip, else this host's name's address).",
            converted(ip_address, "advertise-ip"),
        ],
        [
            "home",
            None,
            str(Path("~/.small-dragonfly/supernode").expanduser()),
            "Cache and state directory.",
        ],
        [
            "piece-size",
            None,
            None,
            "Fixed piece size (default: 4 MiB, larger for files over 200 MiB).",
            size_option("piece-size"),
        ],
        [
            "peer-up-limit",
            None,
            5,
            "Concurrent uploads scheduled from one peer, per task.",
            converted(int, "peer-up-limit"),
        ],
        [
            "supernode-up-limit",
            None,
            32,
            "Concurrent uploads per task from the supernode.",
            converted(int, "supernode-up-limit"),
        ],
        [
            "task-expire",
            None,
            1800.0,
            "Forget a task idle this long (cache kept on disk).",
            duration_option("task-expire"),
        ],
        [
            "peer-expire",
            None,
            60.0,
            "Drop a peer silent this long.",
            duration_option("peer-expire"),
        ],
        [
            "cache-limit",
            None,
            0,
            "Evict least recently used cached files beyond this size (0: no limit).",
            size_option("cache-limit"),
        ],
        [
            "min-free-space",
            None,
            FreeSpace(),
            "Evict least recently used cached files while the cache's filesystem "
            "has less free space than this, a size or a percentage such as 5% "
            "(default: no minimum).",
            converted(parse_free_space, "min-free-space"),
        ],
        [
            "source-timeout",
            None,
            30.0,
            "How long the source may take to answer.",
            duration_option("source-timeout"),
        ],
        HTTP_TIMEOUT_PARAMETER,
        *TLS_PARAMETERS,
    ]

    def postOptions(self) -> None:
        check_tls_options(self)
        if self["piece-size"] is not None and not (
            64 * 1024 <= self["piece-size"] <= MAX_PIECE_SIZE
        ):
            raise usage.UsageError("--piece-size must be between 64K and 64M")
        if not self["advertise-ip"]:
            self["advertise-ip"] = self["listen-ip"] or guess_ip()
        if self["download-port"] == 0:
            # Peers are told this port: it must be a real one.
            raise usage.UsageError("--download-port must not be 0")


class _Stopper(Service):
    """
    Stops the supernode's fetches and waiting calls at shutdown.
    """

    def __init__(self, supernode: Supernode, pieces: PieceServerFactory) -> None:
        self._supernode = supernode
        self._pieces = pieces

    def stopService(self) -> None:
        super().stopService()
        self._pieces.close_all()
        self._supernode.stop()


def _listen(reactor: Any, port: int, ip: str, tls: TLSConfig | None) -> Any:
    if tls is None:
        return endpoints.TCP4ServerEndpoint(reactor, port, interface=ip)
    return endpoints.SSL4ServerEndpoint(
        reactor, port, tls.server_options(), interface=ip
    )


def build(options: usage.Options, reactor: Any) -> tuple[MultiService, Supernode]:
    """
    Compose the supernode's services from parsed options.
    """
    tls = tls_from_options(options)
    settings = Settings(
        advertise_ip=options["advertise-ip"],
        download_port=options["download-port"],
        piece_size=options["piece-size"],
        limits=Limits(
            peer_upload_limit=options["peer-up-limit"],
            supernode_upload_limit=options["supernode-up-limit"],
        ),
        task_expire=options["task-expire"],
        peer_expire=options["peer-expire"],
        cache_limit=options["cache-limit"],
        min_free=options["min-free-space"],
        header_timeout=options["source-timeout"],
    )
    http = http_client(reactor)
    supernode = Supernode(
        reactor, Path(options["home"]), InMemorySwarmState(), http, settings
    )
    pieces = PieceServerFactory(
        supernode.store,
        Identity(f"cdnnode:{settings.advertise_ip}", supernode.address),
        reactor,
    )
    supernode.metrics.watch_piece_server(lambda: pieces.stats)
    top = MultiService()
    listen_ip = options["listen-ip"]
    RequiredPort(
        _listen(reactor, options["port"], listen_ip, tls),
        DaemonSite(root(supernode), options["http-timeout"]),
    ).setServiceParent(top)
    # The piece port speaks TLS in bulk (dragonfly.tls.BulkTLSTransport).
    RequiredPort(
        endpoints.TCP4ServerEndpoint(
            reactor, options["download-port"], interface=listen_ip
        ),
        tls.wrap_server(pieces, reactor) if tls is not None else pieces,
    ).setServiceParent(top)
    housekeeping = TimerService(10.0, supernode.collect)
    housekeeping.clock = reactor
    housekeeping.setServiceParent(top)
    _Stopper(supernode, pieces).setServiceParent(top)
    return top, supernode


def makeService(options: usage.Options) -> IService:
    from twisted.internet import reactor

    service, _ = build(options, reactor)
    return service
