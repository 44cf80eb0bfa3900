"""
Prometheus metrics of the supernode and of dfpeer, all defined here.

Each daemon owns its own C{CollectorRegistry} (never the process-wide default),
so that a test can run several supernodes and peers in one process and each
C{/metrics} page shows one daemon only.  The metrics object is handed to the
parts that count (engine, CDN, mirror, service) as a constructor argument.

Events are counted where they happen, once per piece or per received chunk,
never per byte.  Levels that already live in the daemon's own state (pieces
served by the piece server, downloads under way, tasks held) are read from
that state when the page is rendered, by small custom collectors, so that
they cannot drift from it.  Disk use is measured by the garbage collector
(which walks the disk on a thread anyway) and set as a gauge.

The page is rendered on the reactor thread: the registries are small (a few
dozen series), so generating the text is a matter of microseconds.
"""

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from twisted.web.server import Request

from dragonfly.resources import ReadOnly

# The engine's names for where bytes came from, and the label values.
TIERS = {"source": "source", "supernode": "supernode", "peers": "peer"}
EVICTION_REASONS = ("expired", "size_limit", "free_space")
# Scheduling decisions take well under a millisecond on a small swarm; the
# upper buckets catch a scheduler that degrades with the swarm's size.
SCHEDULE_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class _Eviction:
    """
    The eviction counters of one daemon's disk.
    """

    def __init__(
        self,
        prefix: str,
        what: str,
        registry: CollectorRegistry,
        reasons: tuple[str, ...] = EVICTION_REASONS,
    ) -> None:
        self.count = Counter(
            f"{prefix}_evictions",
            f"Tasks removed from the {what}, by reason ({', '.join(reasons)}).",
            ["reason"],
            registry=registry,
        )
        self.bytes = Counter(
            f"{prefix}_evicted_bytes",
            f"Bytes deleted from the {what}, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in reasons:
            self.count.labels(reason=reason)
            self.bytes.labels(reason=reason)

    def record(self, reason: str, size: int) -> None:
        self.count.labels(reason=reason).inc()
        self.bytes.labels(reason=reason).inc(size)


class _PieceServerCollector:
    """
    The counters of a piece server, read from its statistics.
    """

    def __init__(self, prefix: str, stats: Callable[[], Any]) -> None:
        self._prefix = prefix
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        prefix = self._prefix
        yield CounterMetricFamily(
            f"{prefix}_upload_bytes",
            "Piece bytes sent to peers by the piece server.",
            value=stats.bytes_served,
        )
        yield CounterMetricFamily(
            f"{prefix}_pieces_served",
            "Pieces sent whole to peers by the piece server.",
            value=stats.pieces_served,
        )
        failed = CounterMetricFamily(
            f"{prefix}_pieces_failed",
            "Piece requests not served, by reason (a refusal's error code, or "
            "aborted: the connection was lost mid-piece).",
            labels=["reason"],
        )
        for reason, count in sorted(stats.failed.items()):
            failed.add_metric([reason], count)
        yield failed


class SupernodeMetrics:
    """
    The supernode's metrics, on their own registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.source_bytes = Counter(
            "dragonfly_supernode_source_bytes",
            "Bytes received from sources by the CDN.",
            registry=r,
        )
        self.schedule_duration = Histogram(
            "dragonfly_supernode_schedule_duration_seconds",
            "Time spent deciding one scheduling call's pieces (recording the "
            "peer's report and choosing sources; the long poll's waiting is "
            "not counted).",
            buckets=SCHEDULE_BUCKETS,
            registry=r,
        )
        self.blacklist = Counter(
            "dragonfly_supernode_peer_blacklist",
            "Sources a peer stopped being given after failed pieces "
            "(action=blacklist: for that peer; action=ban: for the whole task).",
            ["action"],
            registry=r,
        )
        self.failures_reported = Counter(
            "dragonfly_supernode_piece_failures_reported",
            "Failed piece fetches reported by peers, by reason.",
            ["reason"],
            registry=r,
        )
        self.delivered_bytes = Counter(
            "dragonfly_supernode_delivered_bytes",
            "Piece bytes peers reported as verified, by the tier that sent "
            "them (peer or supernode): the share sent by peers is the bytes "
            "saved.",
            ["tier"],
            registry=r,
        )
        self.cache_damaged = Counter(
            "dragonfly_supernode_cache_damaged",
            "Cached tasks found damaged on disk after a peer reported a bad "
            "piece from the supernode (the task is dropped and fetched again).",
            registry=r,
        )
        self.tasks = Gauge(
            "dragonfly_supernode_tasks",
            "Tasks known, by status (refreshed by each housekeeping round).",
            ["status"],
            registry=r,
        )
        self.peers = Gauge(
            "dragonfly_supernode_peers",
            "Distinct peers in at least one swarm (refreshed by each "
            "housekeeping round).",
            registry=r,
        )
        self.cache_bytes = Gauge(
            "dragonfly_supernode_cache_bytes",
            "Bytes of cached task files on disk (measured by each garbage collection).",
            registry=r,
        )
        self.evictions = _Eviction("dragonfly_supernode", "cache", r)
        for action in ("blacklist", "ban"):
            self.blacklist.labels(action=action)
        for tier in ("peer", "supernode"):
            self.delivered_bytes.labels(tier=tier)

    def watch_piece_server(self, stats: Callable[[], Any]) -> None:
        """
        Expose the counters of the supernode's piece server.

        @param stats: returns the server's
            L{dragonfly.piece_protocol.ServerStats}.
        """
        self.registry.register(_PieceServerCollector("dragonfly_supernode", stats))


class _PeerStateCollector:
    def __init__(self, downloading: Callable[[], int], held: Callable[[], int]) -> None:
        self._downloading = downloading
        self._held = held

    def collect(self) -> Iterable[Metric]:
        yield GaugeMetricFamily(
            "dragonfly_peer_downloads_active",
            "Downloads under way.",
            value=self._downloading(),
        )
        yield GaugeMetricFamily(
            "dragonfly_peer_tasks",
            "Tasks held in the store (complete or not).",
            value=self._held(),
        )


class PeerMetrics:
    """
    A peer's metrics (dfpeer's, or a dfget's that nobody reads), on their own
    registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        download_bytes = Counter(
            "dragonfly_peer_download_bytes",
            "Bytes of verified pieces downloaded, by tier: source (back to "
            "source), supernode or peer.",
            ["tier"],
            registry=r,
        )
        # Resolved once: the hot path is a dict lookup and an increment.
        self.download_bytes = {
            name: download_bytes.labels(tier=tier) for name, tier in TIERS.items()
        }
        self.piece_failures = Counter(
            "dragonfly_peer_piece_download_failures",
            "Piece fetches that failed, by reason (digest, stalled, error).",
            ["reason"],
            registry=r,
        )
        self.back_to_source = Counter(
            "dragonfly_peer_back_to_source",
            "Downloads that gave up on the swarm and went to the source.",
            registry=r,
        )
        self.downloads = Counter(
            "dragonfly_peer_downloads",
            "Downloads ended, by result (ok, or the error kind).",
            ["result"],
            registry=r,
        )
        self.mirror_requests = Counter(
            "dragonfly_mirror_requests",
            "Requests answered by the registry mirror, by kind (blob, manifest, "
            "other) and HTTP status code.",
            ["kind", "code"],
            registry=r,
        )
        self.store_bytes = Gauge(
            "dragonfly_peer_store_bytes",
            "Bytes of this dfpeer's task files on disk (measured by each "
            "garbage collection).",
            registry=r,
        )
        # Files of earlier processes, whose owners are gone.
        self.evictions = _Eviction(
            "dragonfly_peer", "store", r, (*EVICTION_REASONS, "orphaned")
        )

    def watch_engine(
        self, downloading: Callable[[], int], held: Callable[[], int]
    ) -> None:
        """
        Expose the engine's levels: downloads under way, tasks held.
        """
        self.registry.register(_PeerStateCollector(downloading, held))

    def watch_piece_server(self, stats: Callable[[], Any]) -> None:
        """
        Expose the counters of the peer's piece server.

        @param stats: returns the server's
            L{dragonfly.piece_protocol.ServerStats}.
        """
        self.registry.register(_PieceServerCollector("dragonfly_peer", stats))


class MetricsResource(ReadOnly):
    """
    C{GET /metrics}: a registry in Prometheus' text exposition format.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._registry)
