"""
Metrics and disk hygiene: the C{/metrics} pages, the garbage collectors of
dfpeer's store and of the supernode's cache (over real files in C{tmp_path},
with the filesystem's free space injected where a test needs it low), and
real processes on loopback whose metrics must move as bytes do.
"""

import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from loopback import (
    MIB,
    Processes,
    SourceServer,
    http_get,
    start_dfpeer,
    start_supernode,
)
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import RequestTraversalAgent
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from dragonfly.gc import (
    DiskSpace,
    Entry,
    FreeSpace,
    Watermarks,
    choose,
    parse_free_space,
)
from dragonfly.metrics import MetricsResource, PeerMetrics, SupernodeMetrics
from dragonfly.peer.engine import PeerEngine
from dragonfly.peer.gc import StoreCollector, owner_alive, reclaim_orphans
from dragonfly.peer.supernode_client import Node, SupernodeClient
from dragonfly.piece_protocol import Identity, PieceClientPool
from dragonfly.store import PieceStore
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import InMemorySwarmState, PeerInfo, Swarm, TaskInfo

KIB = 1 << 10
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    """
    Every sample of an exposition text, by name and labels; parsing fails on
    text that is not valid exposition format.
    """
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def total(found: Samples, name: str) -> float:
    return sum(v for (n, _), v in found.items() if n == name)


# Parsing the watermarks ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5%", FreeSpace(fraction=0.05)),
        ("12.5 %", FreeSpace(fraction=0.125)),
        ("10G", FreeSpace(size=10 << 30)),
        ("512M", FreeSpace(size=512 << 20)),
        ("0", FreeSpace()),
    ],
)
def test_parse_free_space(text: str, expected: FreeSpace) -> None:
    """
    A minimum of free space is a percentage of the filesystem or a size.
    """
    assert parse_free_space(text) == expected
    # Written back as a flag (as --help shows the default), it parses the same.
    assert parse_free_space(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "five", "101%", "-5%", "5%%", "10X"])
def test_parse_free_space_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"5%|100%"):
        parse_free_space(text)


def test_choose_least_recently_used_until_both_watermarks_hold() -> None:
    """
    Tasks go oldest first, first for the cap, then for free space, and
    only as many as needed.
    """
    entries = [Entry(f"t{n}", 100, float(n)) for n in (3, 1, 4, 2)]
    marks = Watermarks(size_limit=450, min_free=FreeSpace(size=1000))
    chosen = choose(entries, 600, DiskSpace(free=750, total=10_000), marks)
    assert [(e.task_id, r) for e, r in chosen] == [
        ("t1", "size_limit"),
        ("t2", "size_limit"),
        ("t3", "free_space"),
    ]
    assert choose(entries, 400, DiskSpace(free=5000, total=10_000), marks) == []
    assert choose(entries, 10**9, None, Watermarks()) == []


# dfpeer's store --------------------------------------------------------------


class Peer:
    """
    A real engine and store over C{tmp_path}, on a Clock; its supernode is
    never called (no task is registered).
    """

    def __init__(self, tmp_path: Path) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = PieceStore(tmp_path / "data", reactor, suffix=".1")
        identity = Identity("peer-1", "127.0.0.1:1")
        self.engine = PeerEngine(
            self.clock,
            self.store,
            SupernodeClient(self.clock, [Node("127.0.0.1", 1)]),
            PieceClientPool(self.clock, identity),
            peer_id="peer-1",
            address=lambda: "127.0.0.1:1",
        )

    def add(self, name: str, size: int, last_used: float) -> str:
        task_id = name * 32
        task_file = self.store.open(task_id, 64 * KIB, size)
        task_file.write_at(0, os.urandom(size))
        task_file.held.update(range(-(-size // (64 * KIB))))
        task_file.last_used = last_used
        return task_id

    def collector(self, marks: Watermarks, expire: float = 0.0, **kw: Any) -> Any:
        return StoreCollector(self.engine, marks, expire, **kw)

    def metrics(self) -> Samples:
        return samples(render(self.engine.metrics.registry))


def render(registry: Any) -> str:
    agent = RequestTraversalAgent(MetricsResource(registry))
    d = agent.request(b"GET", b"http://daemon.test/metrics", Headers())
    agent.flush()
    response = d.result
    assert response.code == 200
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(
        b"text/plain; version="
    )
    body: list[bytes] = []
    response.deliverBody(_Collect(body))
    agent.flush()
    return b"".join(body).decode()


class _Collect:
    def __init__(self, into: list[bytes]) -> None:
        self._into = into

    def makeConnection(self, transport: Any) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self._into.append(data)

    def connectionLost(self, reason: Any) -> None:
        pass


def _store_file(peer: Peer, name: str, pid: int, age: float, size: int) -> Path:
    path = peer.store.directory / name[:2] / f"{name}.{pid}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


@pytest_twisted.ensureDeferred
async def test_store_gc_reclaims_files_of_exited_processes(tmp_path: Path) -> None:
    """
    Store files named with the pid of a process that exited, or whose pid
    now belongs to something that is no dfget or twistd, are deleted once
    older than the grace period, and counted as "orphaned".  Files of a
    live dfget, recent files, this process's own files and files of other
    shapes stay.
    """
    peer = Peer(tmp_path)
    exited = subprocess.Popen(["true"])
    exited.wait(timeout=30)
    live_dfget = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "dfget"]
    )
    reused = subprocess.Popen(["sleep", "60"])
    try:
        dead_old = _store_file(peer, "a" * 64, exited.pid, 3600, 1000)
        dead_recent = _store_file(peer, "b" * 64, exited.pid, 60, 10)
        live_old = _store_file(peer, "c" * 64, live_dfget.pid, 3600, 10)
        reused_old = _store_file(peer, "d" * 64, reused.pid, 3600, 300)
        own_old = _store_file(peer, "e" * 64, 1, 3600, 10)
        other_shape = peer.store.directory / "ff" / "notes.txt"
        other_shape.parent.mkdir(parents=True, exist_ok=True)
        other_shape.write_text("kept")
        os.utime(other_shape, (0, 0))
        await peer.collector(Watermarks()).collect()
    finally:
        for process in (live_dfget, reused):
            process.kill()
            process.wait(timeout=30)
    assert not dead_old.exists() and not reused_old.exists()
    for kept in (dead_recent, live_old, own_old, other_shape):
        assert kept.exists(), kept
    found = peer.metrics()
    assert value(found, "dragonfly_peer_evictions_total", reason="orphaned") == 2
    assert value(found, "dragonfly_peer_evicted_bytes_total", reason="orphaned") == (
        1300
    )


def test_reclaim_spares_exactly_its_own_pid(tmp_path: Path) -> None:
    """
    Only files named with this process's own pid are spared as its own:
    pids that merely end with the same digits are other processes.
    """
    peer = Peer(tmp_path)  # its files end in ".1"
    own = _store_file(peer, "a" * 64, 1, 3600, 10)
    others = [_store_file(peer, "a" * 64, pid, 3600, 10) for pid in (11, 21, 101)]
    removed = reclaim_orphans(
        peer.store.directory, ".1", time.time() - 600, alive=lambda pid: False
    )
    assert sorted(removed) == sorted((path, 10) for path in others)
    assert own.exists()


def test_owner_alive_needs_a_dragonfly_command_line() -> None:
    """
    A pid that does not exist owns nothing; a live one owns its files only
    when its command line names dfget, dfpeer, twistd or dragonfly.
    """
    exited = subprocess.Popen(["true"])
    exited.wait(timeout=30)
    assert not owner_alive(exited.pid)
    twistd = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "twistd", "dfpeer"]
    )
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert owner_alive(twistd.pid)
        assert not owner_alive(other.pid)
    finally:
        for process in (twistd, other):
            process.kill()
            process.wait(timeout=30)


@pytest_twisted.ensureDeferred
async def test_store_gc_evicts_least_recently_used_and_spares_tasks_in_use(
    tmp_path: Path,
) -> None:
    """
    Over its cap, the store loses its least recently used tasks first, but
    never one being downloaded, read by the piece server or streamed to a
    client, even the oldest; the deletions are counted and the store's size
    is measured.
    """
    peer = Peer(tmp_path)
    size = 100 * KIB
    streamed = peer.add("a", size, 1.0)
    served = peer.add("b", size, 2.0)
    old = peer.add("c", size, 3.0)
    older_still = peer.add("d", size, 2.5)
    fresh = peer.add("e", size, 5.0)
    reader = peer.store.open_piece(served, 0)
    with peer.engine.using(streamed):
        await peer.collector(Watermarks(size_limit=3 * size)).collect()
    reader.close()
    left = set(peer.store.tasks)
    assert left == {streamed, served, fresh}
    for task_id in (old, older_still):
        assert not peer.store.path_for(task_id).exists()
    found = peer.metrics()
    assert value(found, "dragonfly_peer_evictions_total", reason="size_limit") == 2
    assert value(found, "dragonfly_peer_evicted_bytes_total", reason="size_limit") == (
        2 * size
    )
    assert value(found, "dragonfly_peer_store_bytes") == 3 * size
    assert value(found, "dragonfly_peer_tasks") == 3

    # No longer in use: the next round gets back under the cap, oldest first.
    await peer.collector(Watermarks(size_limit=int(2.5 * size))).collect()
    assert set(peer.store.tasks) == {served, fresh}


@pytest_twisted.ensureDeferred
async def test_store_gc_frees_space_when_the_filesystem_runs_low(
    tmp_path: Path,
) -> None:
    """
    Below the free-space minimum, least recently used tasks go until enough
    would be free, whatever the cap.
    """
    peer = Peer(tmp_path)
    size = 100 * KIB
    ids = [peer.add(name, size, float(n)) for n, name in enumerate("abcd")]
    # 10% of 10 MiB wanted free, 0.85 MiB free: at least 150 KiB to free.
    space = DiskSpace(free=int(0.85 * MIB), total=10 * MIB)
    collector = peer.collector(
        Watermarks(min_free=FreeSpace(fraction=0.1)), space_of=lambda _: space
    )
    await collector.collect()
    assert set(peer.store.tasks) == set(ids[2:])
    found = peer.metrics()
    assert value(found, "dragonfly_peer_evictions_total", reason="free_space") == 2
    assert value(found, "dragonfly_peer_evictions_total", reason="size_limit") == 0


@pytest_twisted.ensureDeferred
async def test_store_gc_expires_idle_tasks_but_not_downloads(tmp_path: Path) -> None:
    """
    A task unused for longer than the expiry is deleted, with its bytes
    counted, unless it is in use.
    """
    peer = Peer(tmp_path)
    idle = peer.add("a", 10 * KIB, 100.0)
    streamed = peer.add("b", 10 * KIB, 100.0)
    recent = peer.add("c", 10 * KIB, 990.0)
    with peer.engine.using(streamed):
        await peer.collector(Watermarks(), expire=60.0).collect()
    assert set(peer.store.tasks) == {streamed, recent}
    assert not peer.store.path_for(idle).exists()
    found = peer.metrics()
    assert value(found, "dragonfly_peer_evictions_total", reason="expired") == 1
    assert value(found, "dragonfly_peer_evicted_bytes_total", reason="expired") == (
        10 * KIB
    )


# The supernode's cache -------------------------------------------------------


def cached(home: Path, task_id: str, size: int, mtime: float) -> Path:
    path = home / "cache" / task_id[:2] / task_id
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    path.with_suffix(".json").write_bytes(b"{}")
    os.utime(path, (mtime, mtime))
    return path


@pytest_twisted.ensureDeferred
async def test_supernode_gc_frees_space_sparing_tasks_in_memory(
    tmp_path: Path,
) -> None:
    """
    The supernode evicts cached files, least recently used first, while its
    filesystem is short of free space, never the file of a task whose
    swarm has a peer; the trash is emptied and the cache size measured.
    """
    space = DiskSpace(free=0, total=100 * MIB)
    supernode = Supernode(
        reactor,
        tmp_path,
        InMemorySwarmState(),
        None,
        Settings(min_free=FreeSpace(size=250 * KIB)),
        space_of=lambda _: space,
    )
    size = 100 * KIB
    active = "a" * 64
    paths = {
        task_id: cached(tmp_path, task_id, size, 1_600_000_000 + n)
        for n, task_id in enumerate([active, "b" * 64, "c" * 64, "d" * 64, "e" * 64])
    }
    swarm = Swarm(TaskInfo(active, "http://127.0.0.1/a", size))
    swarm.peers["peer-1"] = PeerInfo("peer-1", "127.0.0.2:65002")
    await supernode.state.put(swarm)
    await supernode.collect_garbage()
    exists = {task_id[0]: path.exists() for task_id, path in paths.items()}
    assert exists == {"a": True, "b": False, "c": False, "d": False, "e": True}
    assert not paths["b" * 64].with_suffix(".json").exists()
    assert not (tmp_path / "cache" / ".trash").exists() or not list(
        (tmp_path / "cache" / ".trash").iterdir()
    )
    found = samples(render(supernode.metrics.registry))
    assert value(found, "dragonfly_supernode_evictions_total", reason="free_space") == 3
    assert value(found, "dragonfly_supernode_cache_bytes") == 2 * size
    supernode.stop()


def test_metrics_pages_are_valid_and_separate() -> None:
    """
    Each daemon's page is valid exposition text of its own registry, so that
    several daemons in one process do not mix (nor clash on names).
    """
    one, two = SupernodeMetrics(), SupernodeMetrics()
    one.source_bytes.inc(5)
    one.schedule_duration.observe(0.002)
    peer = PeerMetrics()
    peer.download_bytes["peers"].inc(7)
    found = samples(render(one.registry))
    assert value(found, "dragonfly_supernode_source_bytes_total") == 5
    assert value(found, "dragonfly_supernode_schedule_duration_seconds_count") == 1
    assert (
        value(samples(render(two.registry)), "dragonfly_supernode_source_bytes_total")
        == 0
    )
    peer_found = samples(render(peer.registry))
    assert value(peer_found, "dragonfly_peer_download_bytes_total", tier="peer") == 7
    assert not [n for n, _ in peer_found if n.startswith("dragonfly_supernode")]


# Real processes --------------------------------------------------------------


def scrape(url: str) -> Samples:
    status, headers, body = http_get(url)
    assert status == 200, (url, status, body[:300])
    assert headers["content-type"].startswith("text/plain; version=")
    return samples(body.decode())


def fetch_through(peer: Any, url: str, expected: int) -> None:
    quoted = urllib.parse.quote(url, safe="")
    status, _, body = http_get(peer.url(f"/api/v1/files?url={quoted}"), timeout=60)
    assert status == 200, body[:300]
    assert len(body) == expected


@pytest.mark.loopback
def test_metrics_move_during_a_real_download(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    After two dfpeers fetch a file through a real supernode, the supernode
    counts the file's bytes from the source once, each peer's downloaded
    bytes by tier add up to the file, and what the supernode and the first
    peer served adds up to what both peers downloaded.
    """
    size = 6 * MIB + 4321
    data = source.add_file("m.bin", size)
    supernode = start_supernode(
        processes, work / "supernode", extra=["--piece-size", "1M"]
    )
    first = start_dfpeer(processes, work / "p1", supernode.node, ip="127.0.0.2")
    second = start_dfpeer(processes, work / "p2", supernode.node, ip="127.0.0.3")
    url = source.url("m.bin")
    fetch_through(first, url, data.size)
    fetch_through(second, url, data.size)

    found = scrape(supernode.url("/metrics"))
    assert value(found, "dragonfly_supernode_source_bytes_total") == size
    assert value(found, "dragonfly_supernode_schedule_duration_seconds_count") > 0
    peers = [scrape(p.url("/metrics")) for p in (first, second)]
    for peer in peers:
        assert total(peer, "dragonfly_peer_download_bytes_total") == size
        assert value(peer, "dragonfly_peer_downloads_total", result="ok") == 1
        assert value(peer, "dragonfly_peer_back_to_source_total") == 0
    assert value(peers[0], "dragonfly_peer_download_bytes_total", tier="supernode") == (
        size
    )
    served = value(found, "dragonfly_supernode_upload_bytes_total") + value(
        peers[0], "dragonfly_peer_upload_bytes_total"
    )
    assert served == 2 * size
    pieces = value(found, "dragonfly_supernode_pieces_served_total") + value(
        peers[0], "dragonfly_peer_pieces_served_total"
    )
    assert pieces == 2 * 7
    # What the peers reported, by the tier that sent it, is what they
    # counted themselves (a peer's last report may follow its download's
    # end): the swarm-wide bytes saved can be scraped.
    counted = {
        tier: sum(
            value(peer, "dragonfly_peer_download_bytes_total", tier=tier)
            for peer in peers
        )
        for tier in ("peer", "supernode")
    }
    assert counted["peer"] + counted["supernode"] == 2 * size

    def reported() -> dict[str, float]:
        found = scrape(supernode.url("/metrics"))
        return {
            tier: value(found, "dragonfly_supernode_delivered_bytes_total", tier=tier)
            for tier in counted
        }

    deadline = time.monotonic() + 10
    while reported() != counted and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reported() == counted
    # The swarm gauges are recounted within a second of a change.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = scrape(supernode.url("/metrics"))
        if value(found, "dragonfly_supernode_peers") == 2:
            break
        time.sleep(0.2)
    assert value(found, "dragonfly_supernode_peers") == 2
    assert value(found, "dragonfly_supernode_tasks", status="done") == 1


@pytest.mark.loopback
def test_dfpeer_store_stays_under_its_limit(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    A dfpeer with a small --store-limit fetching several files keeps its
    store under the limit, deleting the least recently used files.
    """
    limit = 7 * MIB
    supernode = start_supernode(processes, work / "supernode")
    peer = start_dfpeer(
        processes,
        work / "dfpeer",
        supernode.node,
        ip="127.0.0.2",
        extra=["--store-limit", "7M"],
    )
    files = [source.add_file(f"s{n}.bin", 3 * MIB) for n in range(4)]
    for n, item in enumerate(files):
        fetch_through(peer, source.url(f"s{n}.bin"), item.size)
    deadline = time.monotonic() + 20
    while True:
        found = scrape(peer.url("/metrics"))
        on_disk = sum(p.stat().st_size for p in (peer.home / "data").rglob("*.*"))
        if on_disk <= limit or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert on_disk <= limit
    assert value(found, "dragonfly_peer_store_bytes") <= limit
    assert value(found, "dragonfly_peer_evictions_total", reason="size_limit") == 2
    held = peer.get_json("/api/v1/tasks")["tasks"]
    assert sorted(t["url"] for t in held) == [
        source.url("s2.bin"),
        source.url("s3.bin"),
    ]
    assert "deleted" in peer.log_text() and "reason: size_limit" in peer.log_text()
