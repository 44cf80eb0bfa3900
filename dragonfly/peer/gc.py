"""
dfpeer's store garbage collector: expiry of idle tasks, a size cap and a
free-space minimum (see L{dragonfly.gc} for the watermarks).

A task is never deleted while it is in use: being downloaded, having a
piece read by the piece server, or being streamed to a local client (see
L{PeerEngine.in_use}).  A deleted task also leaves its swarm, so that the
supernode stops sending other peers to fetch pieces this peer no longer
holds.  Only this process's own files are counted and deleted: processes
sharing a home each name their files with their process id.
"""

from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from dragonfly.gc import DiskSpace, Entry, Watermarks, choose, disk_space
from dragonfly.peer.engine import PeerEngine
from dragonfly.peer.supernode_client import SupernodeRefused, SupernodeUnavailable


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
    ) -> None:
        """
        @param expire: delete a task unused for this many seconds (0: never).
        @param space_of: measures the store's filesystem (on a thread).
        """
        self._engine = engine
        self._marks = marks
        self._expire = expire
        self._space_of = space_of
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
