"""
Peers that fail while they serve, with real daemons on loopback: killed,
serving corrupted data, or stalled.  Every download must still end whole and
right, within a bounded time.
"""

import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import (
    Daemon,
    Dfget,
    DfgetRun,
    Processes,
    SourceServer,
    http_get,
    piece_lines,
    sha256_of,
    start_dfpeer,
    start_source,
    start_supernode,
)

MIB = 1 << 20
PIECE = 4 * MIB
SIZE = 6 * PIECE  # six pieces, all held by the serving dfpeer
SUCCESS, FAILED = 503, 500

pytestmark = pytest.mark.loopback


def _seeded_dfpeer(
    processes: Processes, work: Path, source: SourceServer, node: str
) -> tuple[Daemon, str, str]:
    """
    A dfpeer on 127.0.0.2 holding the whole file; returns it, its peer id
    and the file's URL.
    """
    source.add_file("file.bin", SIZE)
    peer = start_dfpeer(processes, work / "dfpeer", node, ip="127.0.0.2")
    url = source.url("file.bin")
    status, _, body = http_get(peer.url(f"/api/v1/files?url={url}"), timeout=60)
    assert status == 200 and len(body) == SIZE
    return peer, peer.get_json("/api/v1/tasks")["peer_id"], url


def _wait_for_piece_from(run: DfgetRun, peer_id: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(
            p["dstCid"] == peer_id and p["result"] == SUCCESS
            for p in piece_lines(run.home)
        ):
            return
        if run.proc.poll() is not None:
            pytest.fail("dfget ended before taking a piece from the dfpeer")
        time.sleep(0.05)
    pytest.fail(f"no piece from {peer_id} within {timeout}s")


def _whole_and_right(run: DfgetRun, source: SourceServer, timeout: float) -> list[dict]:
    result = run.finish(timeout)
    assert result.code == 0, result.stderr
    expected = hashlib.sha256((source.root / "file.bin").read_bytes()).hexdigest()
    assert sha256_of(result.output) == expected
    assert "back to source" not in result.stdout, result.stdout
    return piece_lines(run.home)


def test_a_serving_peer_killed_mid_transfer(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    A dfpeer serving a (rate-limited) download is SIGKILLed after the first
    piece: the pieces it had in flight fail, the downloader reports them and
    gets them from the supernode, and the file ends whole and right.
    """
    supernode = start_supernode(processes, work / "supernode")
    peer, peer_id, url = _seeded_dfpeer(processes, work, source, supernode.node)
    run = dfget.start(url, node=supernode.node, ip="127.0.0.3", extra=["-s", "6M"])
    _wait_for_piece_from(run, peer_id)
    peer.proc.send_signal(signal.SIGKILL)
    lines = _whole_and_right(run, source, timeout=60)
    assert any(p["dstCid"] == peer_id and p["result"] == FAILED for p in lines), lines
    assert any(p["dstCid"].startswith("cdnnode:") for p in lines), lines


def test_a_peer_serving_corrupted_pieces_is_banned(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    A dfpeer whose data went bad on disk serves pieces that fail their
    sha256: the downloader rejects every one, reports it, the supernode bans
    that peer for the task, and the download finishes right from the
    supernode.
    """
    supernode = start_supernode(processes, work / "supernode")
    peer, peer_id, url = _seeded_dfpeer(processes, work, source, supernode.node)
    (data,) = [p for p in (peer.home / "data").rglob("*") if p.is_file()]
    with data.open("r+b") as held:
        for piece in range(SIZE // PIECE):
            held.seek(piece * PIECE + 100)
            held.write(os.urandom(64))
    run = dfget.start(url, node=supernode.node, ip="127.0.0.3")
    lines = _whole_and_right(run, source, timeout=60)
    from_peer = [p for p in lines if p["dstCid"] == peer_id]
    assert from_peer and all(p["result"] == FAILED for p in from_peer), lines
    (task,) = supernode.get_json("/api/v1/tasks")["tasks"]
    assert peer_id in task["banned"]


def test_a_stalled_peer_is_left_for_another_within_the_stall_timeout(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    A dfpeer that stops sending in the middle (SIGSTOP: its connections stay
    open, nothing moves) holds up the downloader no longer than its stall
    timeout: the stalled pieces move to the supernode and the download ends
    right, well before the default timeouts.
    """
    supernode = start_supernode(processes, work / "supernode")
    peer, peer_id, url = _seeded_dfpeer(processes, work, source, supernode.node)
    run = dfget.start(
        url,
        node=supernode.node,
        ip="127.0.0.3",
        extra=["-s", "6M", "--stall-timeout", "2s"],
    )
    _wait_for_piece_from(run, peer_id)
    stopped = time.monotonic()
    peer.proc.send_signal(signal.SIGSTOP)
    try:
        lines = _whole_and_right(run, source, timeout=60)
        assert time.monotonic() - stopped < 30
    finally:
        peer.proc.send_signal(signal.SIGCONT)
    assert any(p["dstCid"].startswith("cdnnode:") for p in lines), lines


@pytest.fixture
def small_disk(work: Path) -> Iterator[Path]:
    """
    An 8 MiB tmpfs mounted for the test (root only), unmounted afterwards.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = work / "small-disk"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
        check=True,
        timeout=10,
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, timeout=10)


def _used(mount: Path) -> int:
    stat = os.statvfs(mount)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def test_a_full_disk_in_the_peer_home_is_a_clear_error(
    processes: Processes,
    work: Path,
    source: SourceServer,
    dfget: Dfget,
    small_disk: Path,
) -> None:
    """
    A dfget whose home cannot hold the file exits 7 with a no-space message,
    leaves no output, and gives the space back; the same download with a
    roomy home then succeeds against the same supernode.
    """
    source.add_file("file.bin", SIZE)
    supernode = start_supernode(processes, work / "supernode")
    url = source.url("file.bin")
    run = dfget.start(
        url, node=supernode.node, ip="127.0.0.3", extra=["--home", str(small_disk)]
    )
    result = run.finish(60)
    assert result.code == 7, (result.stdout, result.stderr)
    assert "No space left" in result.stderr, result.stderr
    assert not result.output.exists()
    assert _used(small_disk) < 1 * MIB
    retry = dfget.start(url, node=supernode.node, ip="127.0.0.3")
    _whole_and_right(retry, source, timeout=60)


def test_a_full_supernode_cache_fails_the_task_not_the_daemon(
    processes: Processes,
    work: Path,
    source: SourceServer,
    dfget: Dfget,
    small_disk: Path,
) -> None:
    """
    A supernode whose cache disk fills up fails that task with a clear
    error (a --notbs download exits 6 saying so), deletes the partial cache,
    and goes on serving: a file that fits is then distributed normally.
    """
    source.add_file("file.bin", SIZE)
    small = source.add_file("small.bin", 3 * MIB)
    supernode = start_supernode(processes, small_disk / "supernode")
    run = dfget.start(
        source.url("file.bin"), node=supernode.node, ip="127.0.0.3", extra=["--notbs"]
    )
    result = run.finish(60)
    assert result.code == 6, (result.stdout, result.stderr)
    assert "No space left" in result.stderr, result.stderr
    assert not result.output.exists()
    assert _used(small_disk) < 2 * MIB
    other = dfget.start(
        source.url("small.bin"), node=supernode.node, ip="127.0.0.3", extra=["--notbs"]
    )
    done = other.finish(60)
    assert done.code == 0, done.stderr
    assert sha256_of(done.output) == small.sha256


def test_sigterm_of_dfpeer_during_a_pull_ends_it_and_restarts_clean(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    SIGTERM to a dfpeer while a local program waits for a (slow) download
    through it: the program gets an error promptly, not a hang; the dfpeer
    exits cleanly, and one started again on the same home serves the file.
    """
    source.add_file("file.bin", SIZE)
    supernode = start_supernode(processes, work / "supernode")
    url = source.url("file.bin")
    peer = start_dfpeer(
        processes,
        work / "dfpeer",
        supernode.node,
        ip="127.0.0.2",
        extra=["--totallimit", "2M"],
    )
    outcome: list[object] = []

    def pull() -> None:
        try:
            outcome.append(http_get(peer.url(f"/api/v1/files?url={url}"), timeout=60))
        except Exception as e:
            outcome.append(e)

    puller = threading.Thread(target=pull)
    puller.start()
    time.sleep(1.5)
    asked = time.monotonic()
    assert peer.stop() in (0, -signal.SIGTERM)
    puller.join(timeout=30)
    assert not puller.is_alive()
    assert time.monotonic() - asked < 20
    (answer,) = outcome
    assert isinstance(answer, Exception) or answer[0] >= 500, answer

    again = start_dfpeer(
        processes, work / "dfpeer-again", supernode.node, ip="127.0.0.2"
    )
    status, _, body = http_get(again.url(f"/api/v1/files?url={url}"), timeout=60)
    assert status == 200
    assert (
        hashlib.sha256(body).hexdigest()
        == hashlib.sha256((source.root / "file.bin").read_bytes()).hexdigest()
    )


def test_supernode_killed_and_restarted_mid_transfer(
    processes: Processes, work: Path, dfget: Dfget
) -> None:
    """
    The supernode is SIGKILLed while it is still fetching a file from a slow
    source for three running dfgets, and started again on the same ports
    and home.  The dfgets register again with it and finish right, without
    going back to source; the restarted supernode resumes its cache after
    the pieces it had saved, so the source sends less than two copies.
    """
    size = 48 * MIB
    source = start_source(processes, work, rate=12 * MIB)
    data = source.add_file("file.bin", size)
    supernode_dir = work / "supernode"
    supernode = start_supernode(processes, supernode_dir, extra=["--piece-size", "1M"])
    ports = (supernode.port, supernode.extra["piece_port"])
    url = source.url("file.bin")
    runs = [
        dfget.start(url, node=supernode.node, ip=ip)
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    ]
    deadline = time.monotonic() + 30
    cached = 0
    while time.monotonic() < deadline and cached < 20:
        tasks = supernode.get_json("/api/v1/tasks")["tasks"]
        cached = tasks[0]["pieces_cached"] if tasks else 0
        time.sleep(0.05)
    assert 20 <= cached < 48, cached
    supernode.proc.send_signal(signal.SIGKILL)
    supernode.proc.wait(10)
    killed = time.monotonic()

    again = start_supernode(
        processes, supernode_dir, extra=["--piece-size", "1M"], ports=ports
    )
    restarted = time.monotonic() - killed
    for run in runs:
        result = run.finish(90)
        assert result.code == 0, result.stderr
        assert sha256_of(result.output) == data.sha256
        assert "back to source" not in result.stdout, result.stdout
    # Only the supernodes read the source, and less than twice the file.
    requests = source.requests("file.bin")
    assert {r["client"] for r in requests} == {"127.0.0.1"}, requests
    sent = source.bytes_sent("file.bin")
    print(f"restart took {restarted:.1f}s; source sent {sent / size:.2f} copies")
    assert sent < 2 * size, requests
    # The restarted supernode resumed after the pieces its meta file had
    # recorded (saved every 16 pieces), not from the start.
    first, resumed = requests
    assert first["range"] is None and not first["complete"]
    assert resumed["status"] == 206, resumed
    start = int(resumed["range"].removeprefix("bytes=").rstrip("-"))
    assert start >= 16 * MIB and start % MIB == 0, resumed
    (task,) = again.get_json("/api/v1/tasks")["tasks"]
    assert task["status"] == "done" and task["file_sha256"] == data.sha256
