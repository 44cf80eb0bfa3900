"""
The engine's no-progress watchdog counts each download's own bytes: in one
process (a dfpeer), a download that receives pieces steadily must not keep
a stuck one alive.
"""

import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from api_rig import PIECE, live_supernode
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.peer import engine as engine_module
from dragonfly.peer.engine import DownloadError, DownloadRequest, PeerEngine
from dragonfly.peer.supernode_client import Node, SupernodeClient
from dragonfly.piece_protocol import Identity, PieceClientPool, PieceServerFactory
from dragonfly.store import PieceStore
from dragonfly.supernode.service import Settings

SLOW_PIECES = 48
SLOW_INTERVAL = 0.25  # one piece from the source every 0.25 s: 12 s in all


class _Source(Resource):
    """
    C{/slow.bin} sends a piece every L{SLOW_INTERVAL}; C{/stuck.bin}
    answers, then sends one byte and nothing more: never a whole piece.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def render_GET(self, request: Request) -> Any:
        total = SLOW_PIECES * PIECE
        request.setHeader(b"content-length", str(total).encode())
        if request.path == b"/stuck.bin":
            request.write(b"s")
            return NOT_DONE_YET
        sent = 0

        def more() -> None:
            nonlocal sent
            if request.finished or request._disconnected:
                return
            request.write(b"s" * PIECE)
            sent += PIECE
            if sent >= total:
                request.finish()
            else:
                self.calls.append(reactor.callLater(SLOW_INTERVAL, more))

        more()
        return NOT_DONE_YET

    def stop(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest_twisted.ensureDeferred
async def test_a_busy_download_does_not_keep_a_stuck_one_alive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With a 1.5 s no-progress timeout, a download whose source never sends
    a byte fails with "no progress" at its first scheduling answer after
    the timeout, while another download of the same engine is receiving a
    piece every 0.25 s (and still running).
    """
    monkeypatch.setattr(engine_module, "NO_PROGRESS_TIMEOUT", 1.5)
    source = _Source()
    download_port = _free_port()
    settings = Settings(
        piece_size=PIECE, header_timeout=5.0, download_port=download_port
    )
    async with live_supernode(tmp_path, source, settings) as live:
        supernode = live.supernode
        pieces = PieceServerFactory(
            supernode.store, Identity("cdnnode:127.0.0.1", supernode.address), reactor
        )
        port = reactor.listenTCP(download_port, pieces, interface="127.0.0.1")
        store = PieceStore(tmp_path / "peer", reactor, suffix=".1")
        identity = Identity("peer-1", "127.0.0.1:1")
        pool = PieceClientPool(reactor, identity)
        engine = PeerEngine(
            reactor,
            store,
            SupernodeClient(reactor, [Node("127.0.0.1", live.api_port)]),
            pool,
            peer_id="peer-1",
            address=lambda: "127.0.0.1:1",
        )
        try:
            busy = engine.download(
                DownloadRequest(url=live.source_url("slow.bin"), back_to_source=False)
            )
            stuck = engine.download(
                DownloadRequest(url=live.source_url("stuck.bin"), back_to_source=False)
            )
            outcome: list[Any] = []
            stuck.addBoth(outcome.append)
            started = reactor.seconds()
            while not outcome and reactor.seconds() - started < 10:
                await deferLater(reactor, 0.1, lambda: None)
            assert outcome, "the stuck download was still running after 10 s"
            (failure,) = outcome
            assert failure.check(DownloadError), failure
            assert "no progress" in failure.getErrorMessage()
            # Failed while the other one was getting pieces, not after it.
            assert not busy.called
            running = engine.downloading[next(iter(engine.downloading))]
            assert running.download.bytes_arrived >= PIECE
        finally:
            busy.cancel()
            busy.addErrback(lambda f: f.trap(CancelledError))
            await engine.leave_all()
            pool.close()
            pieces.close_all()
            await port.stopListening()
            source.stop()
            store.close()
