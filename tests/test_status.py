"""
The supernode's status page and C{/api/v1/status}
(L{dragonfly.supernode.status}) and the transfer record behind them
(L{dragonfly.supernode.transfers}), without a browser.

The record and the rendering are checked in memory with a L{Clock}; the
routes, and the recording of transfers from real scheduling calls, on a real
C{twisted.web} site on 127.0.0.1 over a real supernode whose source is
another site in this process.
"""

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from api_rig import PIECE, TIMEOUT, live_supernode
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import (
    SUPERNODE,
    InMemorySwarmState,
    Lease,
    PeerInfo,
    Swarm,
    TaskInfo,
    TaskStatus,
)
from dragonfly.supernode.status import (
    MAX_GRAPH_PEERS,
    render_page,
    render_svg,
    snapshot,
)
from dragonfly.supernode.transfers import TransferLog

EVIL = '<script>alert("x")</script>'


# The transfer record ---------------------------------------------------------


def test_transfer_window_forgets_by_age_and_by_length() -> None:
    """
    Transfers older than the window leave it, and it never holds more than
    its maximum length; the byte counters keep everything.
    """
    clock = Clock()
    log = TransferLog(clock, window=60.0, max_records=3)
    log.record("t", SUPERNODE, "a", 100)
    clock.advance(30)
    log.record("t", "a", "b", 100)
    assert [(t.source, t.requester) for t in log.recent()] == [
        (SUPERNODE, "a"),
        ("a", "b"),
    ]
    clock.advance(31)
    assert [(t.source, t.requester) for t in log.recent()] == [("a", "b")]
    for requester in "cdef":
        log.record("t", "a", requester, 10)
    assert [t.requester for t in log.recent()] == ["d", "e", "f"]
    assert log.total.peer_bytes == 140
    assert log.total.supernode_bytes == 100
    assert (log.total.peer_pieces, log.total.supernode_pieces) == (5, 1)


def test_transfer_counters_per_task_and_forget() -> None:
    """
    Bytes are counted per task, split by who served them; forgetting a task
    drops its counters but not the overall ones.
    """
    log = TransferLog(Clock())
    log.record("t1", SUPERNODE, "a", 5)
    log.record("t1", "a", "b", 7)
    log.record("t2", "a", "b", 11)
    one = log.delivered("t1")
    assert (one.supernode_bytes, one.peer_bytes) == (5, 7)
    log.forget("t1")
    assert log.delivered("t1").peer_bytes == 0
    assert log.delivered("t2").peer_bytes == 11
    assert (log.total.supernode_bytes, log.total.peer_bytes) == (5, 18)


def test_transfer_log_refuses_an_empty_window() -> None:
    """
    A window of no age or no length is a configuration error.
    """
    with pytest.raises(ValueError, match="positive"):
        TransferLog(Clock(), window=0)
    with pytest.raises(ValueError, match="positive"):
        TransferLog(Clock(), max_records=0)


# Snapshots and rendering -----------------------------------------------------


def _supernode(tmp_path: Path) -> Supernode:
    supernode = Supernode(
        reactor,
        tmp_path / "home",
        InMemorySwarmState(),
        None,
        Settings(advertise_ip="127.0.0.1", download_port=8001, piece_size=PIECE),
    )
    supernode.transfers = TransferLog(Clock())
    return supernode


async def _add_task(
    supernode: Supernode,
    task_id: str,
    url: str,
    peers: dict[str, str],
    length: int = 3 * PIECE,
) -> Swarm:
    task = TaskInfo(task_id, url, PIECE, length=length, status=TaskStatus.DONE)
    task.pieces = {n: "0" * 64 for n in range(-(-length // PIECE))}
    swarm = Swarm(task)
    for peer_id, hostname in peers.items():
        swarm.peers[peer_id] = PeerInfo(peer_id, "127.0.0.2:9000", hostname)
        swarm.holdings[peer_id] = set()
    await supernode.state.put(swarm)
    return swarm


@pytest_twisted.ensureDeferred
async def test_snapshot_lists_tasks_peers_and_the_swarm_graph(
    tmp_path: Path,
) -> None:
    """
    The snapshot has each task's fetch progress, swarm and delivered bytes,
    the overall share served by peers, and the window's transfers as a graph
    whose node 0 is the supernode, even next to a peer named "supernode".
    """
    supernode = _supernode(tmp_path)
    try:
        swarm = await _add_task(
            supernode, "a" * 64, "http://127.0.0.1/f", {"p1": "h1", "supernode": ""}
        )
        swarm.hold("p1", 0)
        swarm.hold("p1", 1)
        swarm.add_lease("supernode", 2, Lease("p1", 1e9))
        log = supernode.transfers
        log.record("a" * 64, SUPERNODE, "p1", PIECE)
        log.record("a" * 64, SUPERNODE, "p1", PIECE)
        log.record("a" * 64, "p1", "supernode", PIECE)
        log.record("a" * 64, "p1", "supernode", PIECE // 2)
        status = await snapshot(supernode)
    finally:
        supernode.stop()

    json.dumps(status)
    (task,) = status["tasks"]
    assert task["url"] == "http://127.0.0.1/f"
    assert (task["pieces_cached"], task["piece_count"]) == (3, 3)
    assert task["peer_count"] == 2
    assert task["bytes_from_supernode"] == 2 * PIECE
    assert task["bytes_from_peers"] == PIECE + PIECE // 2
    assert task["bytes_saved"] == pytest.approx(1.5 / 3.5)
    peers = {p["peer_id"]: p for p in task["peers"]}
    assert peers["p1"]["pieces"] == 2
    assert peers["p1"]["load"] == 1
    assert peers["p1"]["hostname"] == "h1"
    assert status["totals"]["peers"] == 2
    assert status["totals"]["bytes_delivered"] == 3 * PIECE + PIECE // 2

    graph = status["swarm"]
    nodes = graph["nodes"]
    assert nodes[0]["kind"] == "supernode"
    assert nodes[0]["address"] == "127.0.0.1:8001"
    ids = [n["id"] for n in nodes[1:]]
    assert ids == ["p1", "supernode"]
    edges = {(e["from"], e["to"]): (e["bytes"], e["pieces"]) for e in graph["edges"]}
    assert edges == {(0, 1): (2 * PIECE, 2), (1, 2): (PIECE + PIECE // 2, 2)}


@pytest_twisted.ensureDeferred
async def test_page_escapes_everything_a_client_chose(tmp_path: Path) -> None:
    """
    A URL, peer id and hostname holding markup are shown as text: no element
    of theirs reaches the page, in text or in attributes.
    """
    supernode = _supernode(tmp_path)
    try:
        url = f'http://127.0.0.1/a?x="{EVIL}'
        await _add_task(supernode, "b" * 64, url, {f"peer{EVIL}": f"host{EVIL}"})
        supernode.transfers.record("b" * 64, SUPERNODE, f"peer{EVIL}", PIECE)
        page = render_page(await snapshot(supernode))
    finally:
        supernode.stop()

    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    texts = _Texts.of(page)
    assert url in texts.text
    assert f"host{EVIL}" in texts.text
    assert texts.tags.isdisjoint({"script"})


@pytest_twisted.ensureDeferred
async def test_empty_page(tmp_path: Path) -> None:
    """
    With no task the page says so, bytes saved is not a number yet, and the
    picture has the supernode alone, with no edge.
    """
    supernode = _supernode(tmp_path)
    try:
        status = await snapshot(supernode)
    finally:
        supernode.stop()
    assert status["tasks"] == []
    assert status["totals"]["bytes_saved"] is None
    page = render_page(status)
    texts = _Texts.of(page)
    assert "No tasks yet" in texts.text
    assert 'http-equiv="refresh"' in page
    assert page.count('class="node ') == 1
    assert 'class="edge"' not in page
    assert "no pieces delivered in this window" in texts.text
    assert texts.card("bytes saved") == "n/a"
    assert texts.external == []


def _graph(peers: int, edges: list[tuple[int, int, int]]) -> dict[str, Any]:
    return {
        "window_seconds": 300.0,
        "nodes": [
            {"kind": "supernode", "id": "", "address": "127.0.0.1:8001", "hostname": ""}
        ]
        + [
            {"kind": "peer", "id": f"p{i}", "address": f"127.0.0.{i}:1", "hostname": ""}
            for i in range(1, peers + 1)
        ],
        "edges": [
            {"from": a, "to": b, "bytes": size, "pieces": 1} for a, b, size in edges
        ],
    }


def test_svg_draws_nodes_and_edges_by_bytes() -> None:
    """
    Every node is drawn once and every edge once, the heaviest widest; two
    directions between the same peers are separate arcs; the drawing is the
    same every time.
    """
    graph = _graph(3, [(0, 1, 1000), (1, 2, 4000), (2, 1, 2000), (1, 3, 500)])
    svg = render_svg(graph)
    assert svg == render_svg(graph)
    assert svg.count('class="node ') == 4
    paths = re.findall(
        r'<path class="edge" d="([^"]+)"[^>]*stroke-width="([\d.]+)"', svg
    )
    assert len(paths) == 4
    widths = [float(w) for _, w in paths]
    assert max(widths) == widths[1] == 8.0
    assert len({d for d, _ in paths}) == 4
    assert "p1 → p2" not in svg  # labels are addresses
    assert "127.0.0.1:1 → 127.0.0.2:1: 3.9 KiB in 1 pieces" in svg


def test_svg_caps_the_peers_drawn() -> None:
    """
    A large swarm draws the busiest peers only and says how many are left
    out.
    """
    peers = MAX_GRAPH_PEERS + 10
    graph = _graph(peers, [(0, peers, 100)])
    svg = render_svg(graph)
    assert svg.count('class="node ') == MAX_GRAPH_PEERS + 1
    assert svg.count('class="edge"') == 1
    assert "10 more peers not drawn" in svg


class _Texts(HTMLParser):
    """
    The text, the element names, the summary cards and any external
    reference of a page.
    """

    def __init__(self) -> None:
        super().__init__()
        self.text = ""
        self.tags: set[str] = set()
        self.external: list[str] = []
        self.cards: dict[str, str] = {}
        self._card: list[str] | None = None

    @classmethod
    def of(cls, page: str) -> "_Texts":
        parser = cls()
        parser.feed(page)
        parser.close()
        return parser

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("data:"):
                self.external.append(value)
            if name == "data-k" and value:
                self._card = [value]

    def handle_data(self, data: str) -> None:
        self.text += data
        if self._card is not None:
            self._card.append(data)
            if len(self._card) == 3:
                self.cards[self._card[0]] = self._card[2]
                self._card = None

    def card(self, key: str) -> str:
        return self.cards[key]


# The routes, over a real site and real scheduling calls ----------------------


class Files(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}

    def render_GET(self, request: Request) -> bytes:
        body = self.files.get(request.path.decode())
        if body is None:
            request.setResponseCode(404)
            return b"not here"
        return body


@dataclass
class Served:
    supernode: Supernode
    files: Files
    api_port: int
    source_port: int
    client: Any

    async def get(self, path: str) -> tuple[int, str, bytes]:
        d = self.client.get(f"http://127.0.0.1:{self.api_port}{path}")
        d.addTimeout(TIMEOUT, reactor)
        response = await d
        content = response.content()
        content.addTimeout(TIMEOUT, reactor)
        body = await content
        kind = response.headers.getRawHeaders("content-type", [""])[0]
        return response.code, kind, body

    async def call(self, path: str, body: Any) -> Any:
        d = self.client.post(
            f"http://127.0.0.1:{self.api_port}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        d.addTimeout(TIMEOUT, reactor)
        response = await d
        content = response.content()
        content.addTimeout(TIMEOUT, reactor)
        payload = await content
        assert response.code == 200, payload
        return json.loads(payload)


@pytest_twisted.async_yield_fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    files = Files()
    async with live_supernode(tmp_path, files) as live:
        yield Served(
            live.supernode, files, live.api_port, live.source_port, live.client
        )


async def _schedule(served: Served, task_id: str, peer_id: str, **body: Any) -> Any:
    return await served.call(
        f"/api/v1/tasks/{task_id}/schedule", {"peer_id": peer_id, **body}
    )


@pytest_twisted.ensureDeferred
async def test_scheduling_reports_become_transfers_on_both_routes(
    served: Served,
) -> None:
    """
    Pieces reported finished are recorded against the node their lease
    named, with their real sizes (the last one short): the JSON twin and the
    page show the supernode serving the first peer and that peer serving
    the second, and half the bytes saved.
    """
    length = 2 * PIECE + 100
    served.files.files["/f.bin"] = b"x" * length
    url = f"http://127.0.0.1:{served.source_port}/f.bin"
    task_ids = set()
    for n in (1, 2):
        reply = await served.call(
            "/api/v1/tasks",
            {"url": url, "peer": {"peer_id": f"p{n}", "address": f"127.0.0.{n}:9"}},
        )
        task_ids.add(reply["task_id"])
    (task_id,) = task_ids
    for peer_id in ("p1", "p2"):
        pieces: list[int] = []
        for _ in range(10):
            reply = await _schedule(
                served, task_id, peer_id, finished=pieces, want=8, wait=2.0
            )
            if reply["status"] == "done":
                break
            pieces = [p["piece"] for p in reply["pieces"]]
            expected = "cdnnode:" if peer_id == "p1" else "p1"
            assert all(p["peer_id"].startswith(expected) for p in reply["pieces"])
        assert reply["status"] == "done"

    code, kind, body = await served.get("/api/v1/status")
    assert (code, kind) == (200, "application/json")
    status = json.loads(body)
    (task,) = status["tasks"]
    assert task["bytes_from_supernode"] == length
    assert task["bytes_from_peers"] == length
    assert status["totals"]["bytes_saved"] == 0.5
    assert status["totals"]["bytes_from_source"] == length
    nodes = status["swarm"]["nodes"]
    edges = {
        (nodes[e["from"]]["id"], nodes[e["to"]]["id"]): (e["bytes"], e["pieces"])
        for e in status["swarm"]["edges"]
    }
    assert edges == {("", "p1"): (length, 3), ("p1", "p2"): (length, 3)}

    code, kind, body = await served.get("/")
    assert (code, kind) == (200, "text/html; charset=utf-8")
    page = body.decode()
    assert url in _Texts.of(page).text
    assert page.count('class="edge"') == 2
    assert _Texts.of(page).card("bytes saved") == "50%"
    d = served.client.head(f"http://127.0.0.1:{served.api_port}/")
    d.addTimeout(TIMEOUT, reactor)
    head = await d
    assert head.code == 200
    (length_header,) = head.headers.getRawHeaders("content-length")
    assert int(length_header) > 1000
    code, _, _ = await served.get("/nothing-here")
    assert code == 404
