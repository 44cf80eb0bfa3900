"""
The demo's reading of the operating tools (L{dragonfly.demo}): the figures it
prints come from exposition text that prometheus_client renders from the
daemons' real metric registries, and from a real status snapshot, exactly
as the demo fetches them over HTTP.
"""

import json
from pathlib import Path

import pytest
import pytest_twisted
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.task import Clock

from dragonfly.demo import (
    dfpeer_figures,
    format_requests,
    read_samples,
    sample_total,
    swarm_figures,
    swarm_summary,
)
from dragonfly.metrics import PeerMetrics
from dragonfly.piece_protocol import ServerStats
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import SUPERNODE, InMemorySwarmState
from dragonfly.supernode.status import snapshot
from dragonfly.supernode.transfers import TransferLog

PIECE = 64 * 1024
TASK = "a" * 64


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


@pytest_twisted.ensureDeferred
async def test_swarm_figures_from_the_supernodes_metrics_and_status(
    tmp_path: Path,
) -> None:
    """
    The source bytes and the piece server's bytes and pieces come from the
    supernode's C{/metrics} text, the bytes peers sent each other and the
    bytes saved from its status JSON; the summary prints them, with the best
    share possible for the number of peers.
    """
    supernode = _supernode(tmp_path)
    # Three peers fetch a two-piece file: the supernode serves each piece
    # once, the peers pass them on.
    supernode.metrics.source_bytes.inc(2 * PIECE)
    stats = ServerStats(pieces_served=2, bytes_served=2 * PIECE)
    supernode.metrics.watch_piece_server(lambda: stats)
    for piece_source, requester in [
        (SUPERNODE, "p1"),
        (SUPERNODE, "p2"),
        ("p1", "p2"),
        ("p2", "p1"),
        ("p1", "p3"),
        ("p2", "p3"),
    ]:
        supernode.transfers.record(TASK, piece_source, requester, PIECE)
    metrics = generate_latest(supernode.metrics.registry).decode("utf-8")
    status = json.loads(json.dumps(await snapshot(supernode)))

    figures = swarm_figures(metrics, status)

    assert figures.source_bytes == 2 * PIECE
    assert (figures.served_bytes, figures.served_pieces) == (2 * PIECE, 2)
    assert (figures.from_peers, figures.from_peers_pieces) == (4 * PIECE, 4)
    assert figures.from_supernode == 2 * PIECE
    assert figures.bytes_saved == pytest.approx(4 / 6)
    assert [_words(line) for line in swarm_summary(figures, 2 * PIECE, 3)[1:]] == [
        "source -> supernode 128.0 KiB 1.00x the file",
        "supernode -> peers 128.0 KiB 2 pieces",
        "peer -> peer 256.0 KiB 4 pieces",
        "bytes saved 66.7% of 384.0 KiB delivered; at best 66.7% for 3 peers",
    ]


def _words(line: str) -> str:
    return " ".join(line.split())


@pytest_twisted.ensureDeferred
async def test_swarm_figures_before_anything_was_delivered(tmp_path: Path) -> None:
    """
    A supernode that delivered nothing yet has no bytes saved: the summary
    says C{n/a} rather than dividing by zero.
    """
    supernode = _supernode(tmp_path)
    supernode.metrics.watch_piece_server(ServerStats)
    metrics = generate_latest(supernode.metrics.registry).decode("utf-8")
    figures = swarm_figures(metrics, await snapshot(supernode))
    assert (figures.source_bytes, figures.served_pieces, figures.from_peers) == (
        0,
        0,
        0,
    )
    assert figures.bytes_saved is None
    assert "n/a" in swarm_summary(figures, 10, 3)[4]


def test_dfpeer_figures_by_tier_and_mirror_request() -> None:
    """
    A dfpeer's download bytes are read per tier, its mirror requests per
    kind and status code, and its piece server's bytes, from the text
    prometheus_client renders for its registry.
    """
    metrics = PeerMetrics()
    metrics.download_bytes["peers"].inc(3 * PIECE)
    metrics.download_bytes["supernode"].inc(PIECE)
    for kind, code, count in [("blob", "200", 4), ("manifest", "200", 1)]:
        metrics.mirror_requests.labels(kind=kind, code=code).inc(count)
    metrics.mirror_requests.labels(kind="manifest", code="404").inc()
    stats = ServerStats(pieces_served=2, bytes_served=2 * PIECE)
    metrics.watch_piece_server(lambda: stats)

    figures = dfpeer_figures(generate_latest(metrics.registry).decode("utf-8"))

    assert figures.tiers == {"peer": 3 * PIECE, "supernode": PIECE, "source": 0}
    assert figures.mirror_requests == {
        ("blob", "200"): 4,
        ("manifest", "200"): 1,
        ("manifest", "404"): 1,
    }
    assert figures.uploaded == 2 * PIECE
    assert format_requests(figures.mirror_requests) == (
        "blob 200 x4, manifest 200 x1, manifest 404 x1"
    )


def test_dfpeer_figures_of_an_idle_dfpeer() -> None:
    """
    A dfpeer that has done nothing yet reads as zero bytes and no mirror
    requests: a labelled counter with no sample counts as 0.
    """
    metrics = PeerMetrics()
    text = generate_latest(metrics.registry).decode("utf-8")
    figures = dfpeer_figures(text)
    assert figures.tiers == {"peer": 0, "supernode": 0, "source": 0}
    assert format_requests(figures.mirror_requests) == "none"
    samples = read_samples(text)
    assert sample_total(samples, "dragonfly_mirror_requests_total", kind="blob") == 0
    assert sample_total(samples, "no_such_metric_total") == 0


@pytest.mark.parametrize("text", ["<html>not metrics</html>", 'a{b="c"} x'])
def test_read_samples_refuses_what_is_not_exposition_text(text: str) -> None:
    """
    Text that is not in the exposition format (an HTML error page, a bad
    value) is a C{ValueError}, which the demo reports instead of printing
    made-up figures.
    """
    with pytest.raises(ValueError):
        read_samples(text)
