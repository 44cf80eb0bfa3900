"""
dfpeer's store garbage collector: expiry of idle tasks, a size cap and a
free-space minimum (see L{dragonfly.gc} for the watermarks).

A task is never deleted while it is in use: being downloaded, having a
piece read by the piece server, or being streamed to a local client (see
L{PeerEngine.in_use}).  A deleted task also leaves its swarm, so that the
supernode stops sending other peers to fetch pieces this peer no longer
holds.  Only this process's own files are counted and deleted: processes
sharing a home each name their files with their process id.

Files of earlier processes (named with another pid) are never used again,
since a new process writes under its own pid: they are orphans once their
owner has exited, and each round (the first one at startup) deletes those
older than a grace period.  The owner counts as alive while its pid exists
and its command line looks like a dfget or twistd process; a pid reused by
anything else does not keep the files.  A live owner of another user, whose
command line cannot be read, keeps its files.
"""

import os
import re
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dragonfly.gc import DiskSpace, Entry, Watermarks, choose, disk_space
from dragonfly.peer.engine import PeerEngine
from dragonfly.peer.supernode_client import SupernodeRefused, SupernodeUnavailable

ORPHAN_GRACE = 600.0

_STORE_FILE = re.compile(r"([0-9a-f]{64})\.([0-9]+)")
# What the command line of a process that writes a store looks like: dfget,
# or dfpeer under twistd (also as "python -m twisted").
_OWNER_WORDS = (b"dfget", b"dfpeer", b"twistd", b"twisted", b"dragonfly")


def owner_alive(pid: int) -> bool:
    """
    Whether process C{pid} exists and may be the dfget or dfpeer that
    wrote a store file.  Runs on a thread.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, under another user
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False  # exited since
    except OSError:
        return True  # cannot tell: keep its files
    return any(word in cmdline.lower() for word in _OWNER_WORDS)


def reclaim_orphans(
    directory: Path,
    own_suffix: str,
    older_than: float,
    alive: Callable[[int], bool] = owner_alive,
) -> list[tuple[Path, int]]:
    """
    Delete the store files under C{directory} of processes that are gone,
    last modified before C{older_than} (wall-clock time); the files deleted,
    with their sizes.  Runs on a thread.

    @param own_suffix: the suffix of this process's files, never touched.
    """
    removed = []
    for path in directory.glob("??/*"):
        named = _STORE_FILE.fullmatch(path.name)
        if named is None or f".{named.group(2)}" == own_suffix:
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if stat.st_mtime >= older_than or alive(int(named.group(2))):
            continue
        with suppress(FileNotFoundError):
            path.unlink()
            removed.append((path, stat.st_size))
    return removed


class StoreCollector:
    """
    Keeps one peer's store within its limits.
    """

    _log = Logger()

    def __init__(
        self,
        engine: PeerEngine,
        marks: Watermarks,
        expire: float,
        *,
        space_of: Callable[[Path], DiskSpace] = disk_space,
        orphan_grace: float = ORPHAN_GRACE,
        alive: Callable[[int], bool] = owner_alive,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """
        @param expire: delete a task unused for this many seconds (0: never).
        @param space_of: measures the store's filesystem (on a thread).
        @param orphan_grace: keep other processes' files modified less than
            this many seconds ago, whatever their owner.
        @param alive: tells whether a pid may own files (on a thread).
        @param wall_clock: the time files' modification times are in.
        """
        self._engine = engine
        self._marks = marks
        self._expire = expire
        self._space_of = space_of
        self._orphan_grace = orphan_grace
        self._alive = alive
        self._wall_clock = wall_clock
        self._running: Deferred[None] | None = None
        self._again = False

    def collect(self) -> "Deferred[None]":
        """
        One round; a call while a round runs makes one more round after it.
        Errors are logged, never raised.
        """
        if self._running is not None:
            self._again = True
            return succeed(None)
        self._running = Deferred.fromCoroutine(self._collect())

        def done(result: object) -> None:
            self._running = None
            if isinstance(result, Failure):
                self._log.failure("store garbage collection failed", result)
            if self._again:
                self._again = False
                self.collect()

        self._running.addBoth(done)
        return self._running

    async def _collect(self) -> None:
        engine = self._engine
        store = engine.store
        orphans = await store.in_thread(
            reclaim_orphans,
            store.directory,
            store.suffix,
            self._wall_clock() - self._orphan_grace,
            self._alive,
        )
        for path, size in orphans:
            engine.metrics.evictions.record("orphaned", size)
            self._log.info(
                "deleted {path}, left by an exited process: {bytes_freed} bytes "
                "freed (reason: {reason})",
                path=str(path),
                bytes_freed=size,
                reason="orphaned",
            )
        paths = {task_id: t.path for task_id, t in store.tasks.items()}
        sizes = await store.in_thread(_sizes, paths)
        space = None
        if self._marks.min_free:
            space = await store.in_thread(self._space_of, store.directory)
        # From here on the reactor thread decides against the state as it is
        # now, with no wait until the files are gone.
        now = engine.reactor.seconds()
        used = sum(sizes.get(task_id, 0) for task_id in store.tasks)
        dropped: list[tuple[str, int, str]] = []
        if self._expire:
            for task_file in store.idle_tasks(now - self._expire):
                if not engine.in_use(task_file.task_id):
                    dropped.append(
                        (task_file.task_id, sizes.get(task_file.task_id, 0), "expired")
                    )
        gone = {task_id for task_id, _, _ in dropped}
        used -= sum(size for _, size, _ in dropped)
        entries = [
            Entry(task_id, sizes.get(task_id, 0), task_file.last_used)
            for task_id, task_file in store.tasks.items()
            if task_id not in gone and not engine.in_use(task_id)
        ]
        for entry, reason in choose(entries, used, space, self._marks):
            dropped.append((entry.task_id, entry.size, reason))
            used -= entry.size
        for task_id, size, reason in dropped:
            store.remove(task_id)
            engine.metrics.evictions.record(reason, size)
            self._log.info(
                "deleted {task_id} from the store: {bytes_freed} bytes freed "
                "(reason: {reason})",
                task_id=task_id,
                bytes_freed=size,
                reason=reason,
            )
        engine.metrics.store_bytes.set(used)
        registered = [
            task_id
            for task_id, _, _ in dropped
            if engine.registrations.pop(task_id, None) is not None
        ]
        for task_id in registered:
            # Best effort: a supernode that cannot be told drops us when our
            # heartbeats for the task stop.
            with suppress(SupernodeUnavailable, SupernodeRefused):
                await engine.supernodes.leave(task_id, engine.peer_id)


def _sizes(paths: dict[str, Path]) -> dict[str, int]:
    """
    The size of each task file.  Runs on a thread.
    """
    sizes = {}
    for task_id, path in paths.items():
        with suppress(FileNotFoundError):
            sizes[task_id] = path.stat().st_size
    return sizes
