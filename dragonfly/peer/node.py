"""
A peer node: the engine plus what it needs around it (store, piece server,
connection pool, supernode client), as both C{dfget} and C{dfpeer} run it.
"""

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import endpoints
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import ILogObserver

from dragonfly.http import http_client
from dragonfly.metrics import PeerMetrics
from dragonfly.peer.engine import PeerEngine
from dragonfly.peer.supernode_client import Node, SupernodeClient
from dragonfly.piece_protocol import Identity, PieceClientPool, PieceServerFactory
from dragonfly.ratelimit import TokenBucket
from dragonfly.store import DEFAULT_MAX_OPEN_FILES, PieceStore
from dragonfly.tls import TLSConfig


@dataclass
class PeerConfig:
    home: Path
    ip: str
    port: int
    nodes: list[Node]
    tls: TLSConfig | None = None
    total_limit: int = 0
    upload_limit: int = 0
    concurrency: int = 6
    stall_timeout: float = 15.0
    peer_id: str = ""
    max_open_files: int = DEFAULT_MAX_OPEN_FILES


def make_peer_id(ip: str) -> str:
    """
    A peer id in Dragonfly's client-id shape: address, process and time.
    """
    return f"{ip}-{os.getpid()}-{time.time():.3f}"


class PeerNode:
    """
    Owns a peer's parts and their lifetime.
    """

    def __init__(
        self,
        reactor: Any,
        config: PeerConfig,
        piece_log: ILogObserver | None = None,
        metrics: PeerMetrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self.config = config
        self.peer_id = config.peer_id or make_peer_id(config.ip)
        self._port: IListeningPort | None = None
        self.store = PieceStore(
            config.home / "data",
            reactor,
            suffix=f".{os.getpid()}",
            max_open_files=config.max_open_files,
        )
        upload_buckets = (
            [TokenBucket(config.upload_limit, reactor)] if config.upload_limit else []
        )
        self.server = PieceServerFactory(
            self.store,
            Identity(self.peer_id, f"{config.ip}:{config.port}"),
            reactor,
            upload_buckets=upload_buckets,
        )
        total = TokenBucket(config.total_limit, reactor) if config.total_limit else None
        self.pool = PieceClientPool(
            reactor,
            Identity(self.peer_id, f"{config.ip}:{config.port}"),
            bind_ip=config.ip,
            tls=config.tls,
            stall_timeout=config.stall_timeout,
        )
        self.engine = PeerEngine(
            reactor,
            self.store,
            SupernodeClient(reactor, config.nodes, config.tls, bind_ip=config.ip),
            self.pool,
            peer_id=self.peer_id,
            address=lambda: self.address,
            piece_log=piece_log,
            concurrency=config.concurrency,
            total_bucket=total,
            source_http=http_client(reactor, bind_ip=config.ip),
            metrics=self.metrics,
        )
        self.metrics.watch_piece_server(lambda: self.server.stats)

    @property
    def address(self) -> str:
        """
        Where other peers reach this node's piece server.
        """
        port = self._port.getHost().port if self._port else self.config.port  # type: ignore[attr-defined]
        return f"{self.config.ip}:{port}"

    async def listen(self) -> None:
        """
        Start serving pieces on C{ip:port} (port 0: any free port).
        """
        endpoint = endpoints.TCP4ServerEndpoint(
            self.reactor, self.config.port, interface=self.config.ip
        )
        factory: IProtocolFactory = self.server
        if self.config.tls is not None:
            factory = self.config.tls.wrap_server(self.server, self.reactor)
        self._port = await endpoint.listen(factory)
        # Now the port is known (it may have been 0): say it in HELLOs.
        self.server.identity = self.pool.identity = Identity(self.peer_id, self.address)

    async def stop(self, remove_data: bool = False) -> None:
        """
        Leave every swarm, close connections and stop serving; with
        C{remove_data}, delete the task files (a one-shot dfget's outputs are
        links to them and keep their data).
        """
        await self.engine.leave_all()
        self.pool.close()
        self.server.close_all()
        if self._port is not None:
            stopping = self._port.stopListening()
            self._port = None
            if stopping is not None:
                await stopping
        self.store.close(remove=remove_data)
