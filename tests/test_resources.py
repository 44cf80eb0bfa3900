"""
The daemons' HTTP trees answer unknown paths and methods with JSON errors
and never use Twisted's deprecated unescaped error pages.
"""

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from api_rig import TIMEOUT, QuietSite
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.http import http_client
from dragonfly.peer import api as peer_api
from dragonfly.peer.engine import PeerEngine
from dragonfly.peer.supernode_client import Node, SupernodeClient
from dragonfly.piece_protocol import Identity, PieceClientPool
from dragonfly.resources import FileBody
from dragonfly.store import PieceStore
from dragonfly.supernode import api as supernode_api
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import InMemorySwarmState


def supernode_root(tmp_path: Path, cleanup: list[Callable[[], Any]]) -> Resource:
    client = http_client(reactor)
    supernode = Supernode(
        reactor, tmp_path / "home", InMemorySwarmState(), client, Settings()
    )
    cleanup.append(supernode.stop)
    cleanup.append(client._agent._pool.closeCachedConnections)
    return supernode_api.root(supernode)


def peer_root(tmp_path: Path, cleanup: list[Callable[[], Any]]) -> Resource:
    clock = Clock()
    store = PieceStore(tmp_path / "data", reactor, suffix=".1")
    cleanup.append(store.close)
    engine = PeerEngine(
        clock,
        store,
        SupernodeClient(clock, [Node("127.0.0.1", 1)]),
        PieceClientPool(clock, Identity("peer-1", "127.0.0.1:1")),
        peer_id="peer-1",
        address=lambda: "127.0.0.1:1",
    )
    return peer_api.root(engine)


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[[Resource], Any]]:
    """
    Serves a resource on loopback; calls return C{(status, headers, body)}.
    """
    ports: list[Any] = []
    client = http_client(reactor)

    def start(resource: Resource) -> Any:
        port = reactor.listenTCP(0, QuietSite(resource), interface="127.0.0.1")
        ports.append(port)

        async def call(method: str, path: str) -> tuple[int, Any, bytes]:
            d = client.request(method, f"http://127.0.0.1:{port.getHost().port}{path}")
            d.addTimeout(TIMEOUT, reactor)
            response = await d
            body = response.content()
            body.addTimeout(TIMEOUT, reactor)
            return response.code, response.headers, await body

        return call

    yield start
    await client._agent._pool.closeCachedConnections()
    for port in ports:
        await port.stopListening()


@pytest_twisted.async_yield_fixture
async def roots(tmp_path: Path) -> AsyncIterator[dict[str, Resource]]:
    cleanup: list[Callable[[], Any]] = []
    yield {
        "supernode": supernode_root(tmp_path, cleanup),
        "dfpeer": peer_root(tmp_path, cleanup),
    }
    for step in reversed(cleanup):
        result = step()
        if isinstance(result, Deferred):
            await result


def deprecations(recwarn: pytest.WarningsRecorder) -> list[str]:
    return [
        str(w.message) for w in recwarn if issubclass(w.category, DeprecationWarning)
    ]


@pytest.mark.parametrize("daemon", ["supernode", "dfpeer"])
@pytest.mark.parametrize("path", ["/nothing-here", "/nothing/deeper", "/_pingx"])
@pytest_twisted.ensureDeferred
async def test_unknown_path_is_json_404_without_deprecation(
    serve: Any,
    roots: dict[str, Resource],
    recwarn: pytest.WarningsRecorder,
    daemon: str,
    path: str,
) -> None:
    """
    An unknown top-level path on the supernode's API port or dfpeer's port
    is a JSON 404 like the APIs' own, and renders no deprecated Twisted
    error page (no DeprecationWarning).
    """
    call = serve(roots[daemon])
    status, headers, body = await call("GET", path)
    assert status == 404
    assert headers.getRawHeaders("content-type") == ["application/json"]
    assert json.loads(body) == {"error": "not_found", "message": "no such endpoint"}
    status, _, body = await call("GET", "/_ping")
    assert (status, body) == (200, b"OK")
    assert deprecations(recwarn) == []


@pytest.mark.parametrize("daemon", ["supernode", "dfpeer"])
@pytest.mark.parametrize("path", ["/_ping", "/metrics"])
@pytest_twisted.ensureDeferred
async def test_read_only_resources_refuse_other_methods_with_405(
    serve: Any,
    roots: dict[str, Resource],
    recwarn: pytest.WarningsRecorder,
    daemon: str,
    path: str,
) -> None:
    """
    A POST to a GET-only resource is a JSON 405 naming the allowed methods,
    not Twisted's deprecated error page; HEAD still works.
    """
    call = serve(roots[daemon])
    status, headers, body = await call("POST", path)
    assert status == 405
    assert headers.getRawHeaders("allow") == ["GET, HEAD"]
    assert json.loads(body)["error"] == "method_not_allowed"
    status, _, body = await call("HEAD", path)
    assert (status, body) == (200, b"")
    assert deprecations(recwarn) == []


@pytest_twisted.ensureDeferred
async def test_supernode_status_page_refuses_post(
    serve: Any, roots: dict[str, Resource], recwarn: pytest.WarningsRecorder
) -> None:
    """
    The status page at C{/} is GET-only too, without a deprecated page.
    """
    call = serve(roots["supernode"])
    status, _, _ = await call("POST", "/")
    assert status == 405
    assert deprecations(recwarn) == []


def test_daemons_never_import_twisted_web_static() -> None:
    """
    Importing the daemons' code does not import C{twisted.web.static}, whose
    import alone builds deprecated error pages (warnings in every run).
    """
    code = (
        "import sys, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "import dragonfly.supernode.tap, dragonfly.peer.tap, dragonfly.dfget\n"
        "import dragonfly.supernode.api, dragonfly.peer.api, dragonfly.peer.mirror\n"
        "assert 'twisted.web.static' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class _Streamed(Resource):
    isLeaf = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.streams: list[Any] = []

    def render_GET(self, request: Request) -> Any:
        stream = open(self.path, "rb")  # noqa: SIM115 - closed by the producer
        self.streams.append(stream)
        FileBody(request, stream).start()
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_file_body_streams_the_whole_file_and_closes_it(
    serve: Any, tmp_path: Path
) -> None:
    """
    FileBody sends a file of several chunks whole, ends the response and
    closes the file.
    """
    data = bytes(range(256)) * (3 * FileBody.CHUNK // 256) + b"tail"
    (tmp_path / "f").write_bytes(data)
    resource = _Streamed(tmp_path / "f")
    status, _, body = await serve(resource)("GET", "/")
    assert (status, body) == (200, data)
    (stream,) = resource.streams
    assert stream.closed
