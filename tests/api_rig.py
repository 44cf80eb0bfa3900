"""
A supernode with its API on a real loopback site, beside a source site, for
the tests that drive the API over HTTP inside the test process.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dragonfly.http import http_client
from dragonfly.supernode.api import root
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import InMemorySwarmState

PIECE = 64 * 1024
TIMEOUT = 10.0


class QuietSite(Site):
    """
    A site that writes no access log.
    """

    def log(self, request: Request) -> None:
        pass


@dataclass
class LiveSupernode:
    supernode: Supernode
    top: Resource
    api_port: int
    source_port: int
    client: Any

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api_port}{path}"

    def source_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.source_port}/{name}"


@asynccontextmanager
async def live_supernode(
    tmp_path: Path, source: Resource, settings: Settings | None = None
) -> AsyncIterator[LiveSupernode]:
    """
    A supernode (home under C{tmp_path}, L{PIECE}-byte pieces unless
    C{settings} say otherwise) whose API answers on a loopback port, with
    C{source} served on another; everything is stopped on the way out.
    """
    source_port = reactor.listenTCP(0, QuietSite(source), interface="127.0.0.1")
    source_client = http_client(reactor)
    supernode = Supernode(
        reactor,
        tmp_path / "home",
        InMemorySwarmState(),
        source_client,
        settings or Settings(piece_size=PIECE, header_timeout=5.0),
    )
    top = root(supernode)
    api_port = reactor.listenTCP(0, QuietSite(top), interface="127.0.0.1")
    client = http_client(reactor)
    try:
        yield LiveSupernode(
            supernode, top, api_port.getHost().port, source_port.getHost().port, client
        )
    finally:
        supernode.stop()
        for c in (client, source_client):
            await c._agent._pool.closeCachedConnections()
        await api_port.stopListening()
        await source_port.stopListening()
