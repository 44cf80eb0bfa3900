"""
Task files on disk and the piece store that serves them.
"""

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers import failure_of, piece_bytes, result_of
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from dragonfly import wire
from dragonfly.piece_protocol import PieceUnavailable
from dragonfly.store import OpenFiles, PieceDigestMismatch, PieceStore, TaskFile

TASK = "ab" * 32
PIECE_SIZE = 1000


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class InlineThreadPool:
    """
    Runs "threaded" work at once on the calling thread (deterministic).
    """

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any
    ) -> None:
        try:
            result = f(*a)
        except BaseException:
            onResult(False, Failure())
        else:
            onResult(True, result)


class InlineReactor(Clock):
    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


@pytest.fixture
def store(tmp_path: Path) -> PieceStore:
    return PieceStore(tmp_path / "store", InlineReactor(), InlineThreadPool())


def test_write_verified_writes_at_piece_offset(tmp_path: Path) -> None:
    """
    A verified piece lands at piece * piece_size, whatever order pieces
    arrive in; the file is exactly the concatenation in the end.
    """
    f = TaskFile(TASK, tmp_path / "t", PIECE_SIZE, 2500)
    p0, p1 = (piece_bytes(n, PIECE_SIZE) for n in range(2))
    p2 = piece_bytes(2, 500)
    f.write_verified(2, p2, sha(p2))
    f.write_verified(0, p0, sha(p0))
    f.write_verified(1, p1, sha(p1))
    f.close()
    assert (tmp_path / "t").read_bytes() == p0 + p1 + p2


def test_write_verified_rejects_wrong_digest_without_writing(tmp_path: Path) -> None:
    """
    Bytes whose sha256 differs from the expected one raise
    PieceDigestMismatch and nothing reaches the file.
    """
    f = TaskFile(TASK, tmp_path / "t", PIECE_SIZE, 3000)
    good = piece_bytes(1, PIECE_SIZE)
    bad = b"\0" + good[1:]
    with pytest.raises(PieceDigestMismatch, match="piece 1"):
        f.write_verified(1, bad, sha(good))
    assert (tmp_path / "t").read_bytes() == b""
    f.write_verified(1, bytearray(good), sha(good))
    assert f.read(PIECE_SIZE, PIECE_SIZE) == good


def test_task_file_bounds_need_length(tmp_path: Path) -> None:
    """
    Piece bounds come from the length; without one they cannot be known.
    """
    f = TaskFile(TASK, tmp_path / "t", PIECE_SIZE, 2500)
    assert f.bounds(2) == (2000, 500)
    f.length = None
    with pytest.raises(ValueError):
        f.bounds(0)


def test_closed_task_file_refuses_io(tmp_path: Path) -> None:
    """
    After close, reads fail clearly instead of using a stale descriptor;
    closing twice is harmless; remove deletes the file.
    """
    f = TaskFile(TASK, tmp_path / "d" / "t", PIECE_SIZE, 10)
    assert (tmp_path / "d" / "t").exists()
    f.close()
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read(0, 1)
    f.remove()
    assert not (tmp_path / "d" / "t").exists()


def test_hash_range(tmp_path: Path) -> None:
    """
    hash_range is the sha256 of exactly bytes [start, end), however small
    the read blocks; asking past the end of the file is an OSError.
    """
    data = piece_bytes(0, 5000)
    f = TaskFile(TASK, tmp_path / "t", PIECE_SIZE, len(data))
    f.write_at(0, data)
    assert f.hash_range(0, 5000) == sha(data)
    assert f.hash_range(1000, 2500, block=7) == sha(data[1000:2500])
    assert f.hash_range(10, 10) == sha(b"")
    with pytest.raises(OSError, match="shorter"):
        f.hash_range(4000, 6000)


def test_truncate(tmp_path: Path) -> None:
    """
    truncate sets the file's size.
    """
    f = TaskFile(TASK, tmp_path / "t", PIECE_SIZE, None)
    f.write_at(0, b"x" * 100)
    f.truncate(40)
    assert (tmp_path / "t").stat().st_size == 40


def test_open_piece_unknown_task(store: PieceStore) -> None:
    """
    A task the store does not have is UNKNOWN_TASK.
    """
    with pytest.raises(PieceUnavailable) as e:
        store.open_piece(TASK, 0)
    assert e.value.code == wire.ErrorCode.UNKNOWN_TASK


def test_open_piece_not_held(store: PieceStore) -> None:
    """
    A piece that is written but not marked held (not verified) is
    PIECE_NOT_HELD: only verified pieces are served.
    """
    f = store.open(TASK, PIECE_SIZE, 2500)
    data = piece_bytes(0, PIECE_SIZE)
    f.write_verified(0, data, sha(data))
    with pytest.raises(PieceUnavailable) as e:
        store.open_piece(TASK, 0)
    assert e.value.code == wire.ErrorCode.PIECE_NOT_HELD
    assert e.value.message == "piece 0 not held"


def test_open_piece_reads_held_pieces(store: PieceStore) -> None:
    """
    A held piece reads back its own bytes at offsets relative to the piece,
    the last one short; readers are counted while open.
    """
    f = store.open(TASK, PIECE_SIZE, 2500)
    pieces = [piece_bytes(0, 1000), piece_bytes(1, 1000), piece_bytes(2, 500)]
    for n, data in enumerate(pieces):
        f.write_verified(n, data, sha(data))
        f.held.add(n)
    reader = store.open_piece(TASK, 1)
    last = store.open_piece(TASK, 2)
    assert f.readers == 2
    assert reader.length == 1000
    assert reader.read(0, 1000) == pieces[1]
    assert reader.read(990, 10) == pieces[1][990:]
    assert last.length == 500
    assert last.read(0, 500) == pieces[2]
    reader.close()
    last.close()
    assert f.readers == 0


def test_open_records_use_time_and_idle_tasks(store: PieceStore) -> None:
    """
    Opening a task or a piece stamps it with the reactor's time; idle_tasks
    lists those unused since a time and not being read.
    """
    clock = store._reactor
    clock.advance(100)
    f = store.open(TASK, PIECE_SIZE, 1000)
    f.held.add(0)
    assert f.last_used == 100
    assert list(store.idle_tasks(101)) == [f]
    assert list(store.idle_tasks(100)) == []
    clock.advance(50)
    reader = store.open_piece(TASK, 0)
    assert f.last_used == 150
    assert list(store.idle_tasks(1000)) == []  # being read
    reader.close()
    assert list(store.idle_tasks(1000)) == [f]


def test_store_layout_and_remove(store: PieceStore, tmp_path: Path) -> None:
    """
    Task files live under a two-hex-digit fan-out directory; open returns
    the same TaskFile again; remove forgets and deletes it.
    """
    f = store.open(TASK, PIECE_SIZE, 10)
    assert f.path == tmp_path / "store" / "ab" / TASK
    assert store.open(TASK, PIECE_SIZE, 10) is f
    store.remove(TASK)
    assert not f.path.exists()
    assert TASK not in store.tasks
    store.remove(TASK)  # no error the second time
    with pytest.raises(PieceUnavailable):
        store.open_piece(TASK, 0)


def test_in_thread_runs_work_and_reports_errors(store: PieceStore) -> None:
    """
    in_thread hands work to the pool and delivers its result or exception
    through a Deferred.
    """
    f = store.open(TASK, PIECE_SIZE, 1000)
    data = piece_bytes(0, 1000)
    assert result_of(store.in_thread(f.write_verified, 0, data, sha(data))) is None
    failure_of(
        store.in_thread(f.write_verified, 0, data, "0" * 64), PieceDigestMismatch
    )
    assert result_of(store.in_thread(f.hash_range, 0, 1000)) == sha(data)


def test_open_piece_serves_held_piece_while_length_unknown(store: PieceStore) -> None:
    """
    While a source streams without a length, the pieces already cut are full
    pieces and held; the store serves them at full piece size (regression:
    open_piece used to raise ValueError from TaskFile.bounds here).
    """
    f = store.open(TASK, PIECE_SIZE, None)
    data = piece_bytes(0, PIECE_SIZE)
    f.write_verified(0, data, sha(data))
    f.held.add(0)
    reader = store.open_piece(TASK, 0)
    assert reader.length == PIECE_SIZE
    assert reader.read(0, PIECE_SIZE) == data


def open_fds_under(directory: Path) -> int:
    """
    The descriptors this process holds on files under C{directory}.
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if target.startswith(f"{directory}/"):
            count += 1
    return count


def task_id(n: int) -> str:
    return f"{n:02x}" * 32


def test_store_keeps_at_most_max_open_files(tmp_path: Path) -> None:
    """
    With a cap of 4, writing and reading 20 tasks in turn never holds more
    than 4 descriptors on the store's files: the least recently used idle
    ones are closed and reopened on their next use, and every task's bytes
    stay right.
    """
    directory = tmp_path / "store"
    store = PieceStore(directory, InlineReactor(), InlineThreadPool(), max_open_files=4)
    peak = 0
    for round in range(2):
        for n in range(20):
            f = store.open(task_id(n), PIECE_SIZE, 2 * PIECE_SIZE)
            data = piece_bytes(n, PIECE_SIZE)
            f.write_verified(round, data, sha(data))
            f.held.add(round)
            peak = max(peak, open_fds_under(directory))
            # An earlier task, often one whose descriptor was closed.
            earlier = (n * 7) % (n + 1)
            reader = store.open_piece(task_id(earlier), 0)
            assert reader.read(0, PIECE_SIZE) == piece_bytes(earlier, PIECE_SIZE)
            reader.close()
            peak = max(peak, open_fds_under(directory))
    assert peak <= 4
    assert len(store.open_files) <= 4
    for n in range(20):
        f = store.tasks[task_id(n)]
        assert f.read(0, 2 * PIECE_SIZE) == piece_bytes(n, PIECE_SIZE) * 2
        assert f.hash_range(0, PIECE_SIZE) == sha(piece_bytes(n, PIECE_SIZE))
    assert open_fds_under(directory) <= 4
    store.close()
    assert open_fds_under(directory) == 0


def test_task_in_use_keeps_its_descriptor(tmp_path: Path) -> None:
    """
    A task with a piece reader open, or with a read or write running, is
    never the one closed to make room, however many others are used after
    it; the cap is met again once it is idle.
    """
    directory = tmp_path / "store"
    store = PieceStore(directory, InlineReactor(), InlineThreadPool(), max_open_files=2)
    read = store.open(task_id(0), PIECE_SIZE, PIECE_SIZE)
    read.write_at(0, piece_bytes(0, PIECE_SIZE))
    read.held.add(0)
    reader = store.open_piece(task_id(0), 0)
    written = store.open(task_id(1), PIECE_SIZE, PIECE_SIZE)
    with written._using():  # as a thread-pool write in progress
        for n in range(2, 12):
            store.open(task_id(n), PIECE_SIZE, PIECE_SIZE).write_at(0, b"x")
        assert read.is_open and written.is_open
        assert reader.read(0, PIECE_SIZE) == piece_bytes(0, PIECE_SIZE)
    reader.close()
    store.open(task_id(12), PIECE_SIZE, PIECE_SIZE)
    store.open(task_id(13), PIECE_SIZE, PIECE_SIZE)
    assert not read.is_open and not written.is_open
    assert open_fds_under(directory) == 2


def test_close_during_use_waits_for_the_user(tmp_path: Path) -> None:
    """
    A final close while a thread uses the descriptor leaves it open until
    that use ends (its number must not be reused under a running pread);
    uses after the close fail.
    """
    f = TaskFile(TASK, tmp_path / "t", PIECE_SIZE, 10)
    with f._using() as fd:
        f.close()
        os.fstat(fd)  # still ours
        assert f.is_open
        with pytest.raises(ValueError, match="closed"):
            f.read(0, 1)
    assert not f.is_open


def test_concurrent_use_under_a_small_cap(tmp_path: Path) -> None:
    """
    Eight threads writing and reading back 20 tasks at random under a cap
    of 3 never see a wrong byte or a closed descriptor.
    """
    directory = tmp_path / "store"
    store = PieceStore(directory, InlineReactor(), InlineThreadPool(), max_open_files=3)
    files = [store.open(task_id(n), PIECE_SIZE, 64 * PIECE_SIZE) for n in range(20)]

    def work(worker: int) -> None:
        for step in range(200):
            f = files[(worker * 7 + step * 3) % 20]
            piece = (worker * 8 + step) % 64
            data = piece_bytes(piece, PIECE_SIZE)
            f.write_at(piece * PIECE_SIZE, data)
            assert f.read(piece * PIECE_SIZE, PIECE_SIZE) == data

    with ThreadPoolExecutor(8) as pool:
        for done in [pool.submit(work, worker) for worker in range(8)]:
            done.result()
    # Once every thread is done, another use brings the count back down.
    files[0].read(0, 1)
    assert len(store.open_files) <= 3
    assert open_fds_under(directory) <= 3


def test_open_files_needs_a_positive_limit() -> None:
    """
    A cap below one is refused with a clear error.
    """
    with pytest.raises(ValueError, match="at least one"):
        OpenFiles(0)
