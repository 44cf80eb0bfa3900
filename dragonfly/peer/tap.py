"""
C{twistd dfpeer}: the long-lived peer daemon of a host.
"""

import re
from pathlib import Path
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from dragonfly.clientlog import make_sign, open_client_log
from dragonfly.config import ConfigOptions
from dragonfly.gc import FreeSpace, Watermarks, parse_free_space
from dragonfly.http import http_client, raw_agent
from dragonfly.options import (
    HTTP_TIMEOUT_PARAMETER,
    TLS_PARAMETERS,
    check_tls_options,
    converted,
    duration_option,
    ip_address,
    port_number,
    size_option,
    tls_from_options,
)
from dragonfly.peer.api import root
from dragonfly.peer.gc import StoreCollector
from dragonfly.peer.mirror import ForwardProxy, MirrorSite, RegistryMirror
from dragonfly.peer.node import PeerConfig, PeerNode
from dragonfly.peer.supernode_client import (
    parse_nodes,
)
from dragonfly.services import RequiredPort
from dragonfly.tasks import InvalidRequest, check_url
from dragonfly.tls import TLSConfig, TLSConfigError


class Options(ConfigOptions):
    synopsis = "--node HOST:PORT [options]"
    config_default = "/etc/dragonfly/dfpeer.yml"
    comma_lists = frozenset({"node", "allow-registry"})
    longdesc = (
        "Run the peer daemon of a host: it serves the pieces it holds to "
        "other peers and downloads through the swarm for local programs."
    )

    def __init__(self) -> None:
        super().__init__()
        self["proxy-rules"] = []

    def opt_proxy_rule(self, rule: str) -> None:
        """
        A regular expression: proxied GETs of matching URLs go through the
        swarm (repeatable; first match wins).
        """
        try:
            re.compile(rule)
        except re.error as e:
            raise usage.UsageError(f"--proxy-rule {rule!r}: {e}") from None
        self["proxy-rules"].append(rule)

    optParameters = [
        [
            "registry",
            None,
            "https://index.docker.io",
            "Upstream registry the mirror serves at /v2/.",
        ],
        [
            "allow-registry",
            None,
            "",
            "Other registries (comma-separated URLs) a request may select "
            "with containerd's ?ns= or an X-Dragonfly-Registry header.",
        ],
        [
            "node",
            "n",
            "127.0.0.1:8002",
            "Supernodes, host:port, comma-separated, in fail-over order.",
        ],
        [
            "ip",
            None,
            "127.0.0.1",
            "Address to bind and advertise for pieces.",
            converted(ip_address, "ip"),
        ],
        [
            "peer-port",
            None,
            65002,
            "Port serving pieces to other peers.",
            converted(port_number, "peer-port"),
        ],
        [
            "port",
            "p",
            65001,
            "HTTP port of the local API and mirror.",
            converted(port_number, "port"),
        ],
        [
            "listen-ip",
            None,
            "127.0.0.1",
            "Address of the HTTP port.",
            converted(ip_address, "listen-ip"),
        ],
        [
            "home",
            None,
            str(Path("~/.small-dragonfly").expanduser()),
            "Work directory: logs/dfclient.log and data/.",
        ],
        [
            "totallimit",
            None,
            0,
            "Download rate limit for the host (0: none).",
            size_option("totallimit"),
        ],
        [
            "uploadlimit",
            None,
            0,
            "Upload rate limit to other peers (0: none).",
            size_option("uploadlimit"),
        ],
        [
            "expire",
            None,
            1800.0,
            "Delete a held file unused this long.",
            duration_option("expire"),
        ],
        [
            "store-limit",
            None,
            0,
            "Delete least recently used held files beyond this size (0: no limit).",
            size_option("store-limit"),
        ],
        [
            "min-free-space",
            None,
            FreeSpace(),
            "Delete least recently used held files while the filesystem of "
            "data/ has less free space than this, a size or a percentage such "
            "as 5% (default: no minimum).",
            converted(parse_free_space, "min-free-space"),
        ],
        [
            "cert",
            None,
            "",
            "PEM certificate: serve the HTTP port (mirror, API) over HTTPS.",
        ],
        ["key", None, "", "PEM private key of --cert."],
        HTTP_TIMEOUT_PARAMETER,
        *TLS_PARAMETERS,
    ]

    def postOptions(self) -> None:
        check_tls_options(self)
        if bool(self["cert"]) != bool(self["key"]):
            raise usage.UsageError("--cert and --key must be given together")
        try:
            self["nodes"] = parse_nodes([self["node"]])
            check_url(self["registry"])
            self["allowed"] = [
                check_url(u.strip())
                for u in self["allow-registry"].split(",")
                if u.strip()
            ]
        except (ValueError, InvalidRequest) as e:
            raise usage.UsageError(str(e)) from None


class _PeerService(Service):
    """
    Starts the node's piece server and leaves the swarms at shutdown.
    """

    _log = Logger()

    def __init__(self, node: PeerNode, collector: StoreCollector) -> None:
        self.node = node
        self.collector = collector

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        # A peer that cannot serve would still be advertised to the swarm:
        # its piece port is required, as the HTTP port is (RequiredPort).
        # PeerNode.listen listens on a TCP endpoint, which is done by the
        # time it returns, so an error fails the start here: twistd exits 1.
        listening = Deferred.fromCoroutine(self.node.listen())
        failed: list[Failure] = []
        listening.addCallbacks(self._serving, failed.append)
        if failed:
            failed[0].raiseException()
        if not listening.called:
            raise RuntimeError("the piece port did not open at once")

    def _serving(self, _: object) -> None:
        self._log.info(
            "dfpeer {peer_id} serving pieces at {address}",
            peer_id=self.node.peer_id,
            address=self.node.address,
        )

    def startService(self) -> None:
        super().startService()
        # At once, not after the first heartbeat: reclaims what earlier
        # processes left (on the store's threads).
        self.collector.collect()

    def stopService(self) -> "Deferred[None]":
        super().stopService()
        return Deferred.fromCoroutine(self.node.stop())

    def housekeeping(self) -> "Deferred[None]":
        return Deferred.fromCoroutine(self._housekeeping())

    async def _housekeeping(self) -> None:
        try:
            await self.node.engine.heartbeat()
        except Exception:
            self._log.failure("housekeeping failed")
        await self.collector.collect()


def build(options: usage.Options, reactor: Any) -> tuple[MultiService, PeerNode]:
    tls = tls_from_options(options)
    home = Path(options["home"])
    observer, _ = open_client_log(home, make_sign())
    node = PeerNode(
        reactor,
        PeerConfig(
            home=home,
            ip=options["ip"],
            port=options["peer-port"],
            nodes=options["nodes"],
            tls=tls,
            total_limit=options["totallimit"],
            upload_limit=options["uploadlimit"],
        ),
        piece_log=observer,
    )
    top = MultiService()
    collector = StoreCollector(
        node.engine,
        Watermarks(options["store-limit"], options["min-free-space"]),
        options["expire"],
    )
    # Each finished download grew the store: trim it at once.
    node.engine.on_download_done = lambda _: collector.collect()
    peer = _PeerService(node, collector)
    peer.setServiceParent(top)
    agent = raw_agent(reactor)
    site = MirrorSite(
        root(
            node.engine,
            RegistryMirror(
                node.engine,
                options["registry"],
                agent,
                http_client(reactor),
                allowed=options["allowed"],
                metrics=node.metrics,
            ),
        ),
        ForwardProxy(node.engine, agent, options["proxy-rules"], metrics=node.metrics),
        timeout=options["http-timeout"],
    )
    http_port: Any = endpoints.TCP4ServerEndpoint(
        reactor, options["port"], interface=options["listen-ip"]
    )
    if options["cert"]:
        try:
            mirror_tls = TLSConfig.load(options["cert"], options["key"])
        except TLSConfigError as e:
            raise usage.UsageError(str(e)) from None
        http_port = endpoints.SSL4ServerEndpoint(
            reactor,
            options["port"],
            mirror_tls.server_options(),
            interface=options["listen-ip"],
        )
    RequiredPort(http_port, site).setServiceParent(top)
    housekeeping = TimerService(20.0, peer.housekeeping)
    housekeeping.clock = reactor
    housekeeping.setServiceParent(top)
    return top, node


def makeService(options: usage.Options) -> IService:
    from twisted.internet import reactor

    service, _ = build(options, reactor)
    return service
