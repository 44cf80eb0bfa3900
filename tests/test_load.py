"""
Load on real daemons, with their descriptors and memory measured before
and after: 50 concurrent blob pulls through one dfpeer's registry mirror,
and 200 simulated peers (the benchmark's control-plane clients, over the
real JSON API) on one supernode.
"""

import gc
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hostile import MIB, open_fds, rss_bytes, settle_fds
from loopback import (
    Processes,
    SourceServer,
    get_json,
    http_get,
    start_dfpeer,
    start_supernode,
)

from dragonfly.bench.control_plane import simulate_peers
from dragonfly.tasks import task_id_for

pytestmark = [pytest.mark.loopback, pytest.mark.load]

BLOBS = 10
PULLS_PER_BLOB = 5
PEERS = 200
FD_SLACK = 5
RSS_BOUND = 30 * MIB


def _blob(source: SourceServer, size: int) -> str:
    """
    A blob served by the source at C{/v2/load/app/blobs/sha256:<hex>}, as a
    registry serves it; returns its digest.
    """
    data = os.urandom(size)
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    path = source.root / "v2" / "load" / "app" / "blobs" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _measure(pids: dict[str, int]) -> dict[str, tuple[int, int]]:
    return {name: (open_fds(pid), rss_bytes(pid)) for name, pid in pids.items()}


def test_fifty_blob_pulls_and_two_hundred_peers_leave_no_trace(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    Fifty clients pull ten blobs (five each at once) through one dfpeer, all
    with the right digest; then 200 simulated peers join a cached task on
    the supernode, report every piece and leave.  Afterwards both daemons'
    open descriptors are back to their baseline (plus the one each keeps
    per file it now holds) and their memory grew by less than 30 MiB.
    """
    supernode = start_supernode(
        processes, work / "supernode", extra=["--piece-size", "1M"]
    )
    registry = f"http://{source.host}:{source.port}"
    dfpeer = start_dfpeer(
        processes,
        work / "dfpeer",
        supernode.node,
        ip="127.0.0.2",
        extra=["--registry", registry],
    )
    pids = {"supernode": supernode.proc.pid, "dfpeer": dfpeer.proc.pid}
    # Warm up both daemons (pools, threads, a first task) before measuring.
    warm = _blob(source, 2 * MIB)
    status, _, _ = http_get(dfpeer.url(f"/v2/load/app/blobs/{warm}"), timeout=60)
    assert status == 200
    source.add_file("task.bin", 16 * MIB)
    task_url = source.url("task.bin")
    status, _, _ = http_get(dfpeer.url(f"/api/v1/files?url={task_url}"), timeout=60)
    assert status == 200
    time.sleep(1.0)
    before = _measure(pids)

    digests = [_blob(source, 2 * MIB) for _ in range(BLOBS)]

    def pull(digest: str) -> str:
        status, _, body = http_get(
            dfpeer.url(f"/v2/load/app/blobs/{digest}"), timeout=60
        )
        assert status == 200, (status, body[:200])
        return f"sha256:{hashlib.sha256(body).hexdigest()}"

    began = time.monotonic()
    wanted = [d for d in digests for _ in range(PULLS_PER_BLOB)]
    with ThreadPoolExecutor(len(wanted)) as pool:
        got = list(pool.map(pull, wanted))
    pulls_took = time.monotonic() - began
    assert got == wanted

    began = time.monotonic()
    task_id = task_id_for(task_url)
    calls, errors = simulate_peers(supernode.port, task_url, task_id, PEERS, 2.0)
    peers_took = time.monotonic() - began
    assert not errors, errors[:3]
    info = get_json(supernode.url(f"/api/v1/tasks/{task_id}"))
    simulated = [p for p in info["peers"] if p.endswith("-sim")]
    assert not simulated, f"{len(simulated)} simulated peers did not leave"

    gc.collect()
    # Each daemon keeps one open file per task it now holds (the blobs).
    expected_fds = {name: before[name][0] + BLOBS + FD_SLACK for name in pids}
    fds = {name: settle_fds(pid, expected_fds[name]) for name, pid in pids.items()}
    after = _measure(pids)
    for name in pids:
        assert fds[name] <= expected_fds[name], (name, before, after)
        assert after[name][1] - before[name][1] < RSS_BOUND, (name, before, after)
    print(
        f"load: {len(wanted)} blob pulls in {pulls_took:.1f}s, {PEERS} simulated "
        f"peers ({calls} scheduling calls) in {peers_took:.1f}s; "
        + "; ".join(
            f"{n}: fds {before[n][0]} -> {after[n][0]}, RSS "
            f"{before[n][1] / MIB:.1f} -> {after[n][1] / MIB:.1f} MiB"
            for n in pids
        )
    )
