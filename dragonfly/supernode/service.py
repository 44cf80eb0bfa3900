"""
The supernode's core: registrations, scheduling calls, heartbeats and
housekeeping, over a L{SwarmState} and the CDN.

Scheduling calls are long polls: when nothing can be assigned yet (the CDN
has not cut the next piece, or every holder is busy) the call waits, up to
the time the peer allows, for the swarm to change, instead of having peers
poll in a loop.

A change wakes every call waiting on the task, at the end of the reactor
turn rather than at once: a busy swarm reports many pieces per turn, and
waking the waiters at each report made each of them schedule again once
per report (a thousand parked calls times the reports of the turn).  The
waiters of a turn are woken once, after all its reports are recorded.
"""

import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from dragonfly.gc import DiskSpace, Entry, FreeSpace, Watermarks, choose, disk_space
from dragonfly.metrics import SupernodeMetrics
from dragonfly.store import DEFAULT_MAX_OPEN_FILES, PieceStore, TaskFile
from dragonfly.supernode import scheduler
from dragonfly.supernode.cdn import (
    CdnFetch,
    ContentMismatch,
    SourceError,
    damaged_pieces,
)
from dragonfly.supernode.state import (
    SUPERNODE,
    PeerInfo,
    Swarm,
    SwarmState,
    TaskInfo,
    TaskStatus,
)
from dragonfly.supernode.transfers import TransferLog
from dragonfly.tasks import (
    InvalidRequest,
    check_digest,
    check_task_id,
    check_url,
    piece_bounds,
    piece_size_for,
    task_id_for,
)

MAX_WAIT = 10.0
MAX_WANT = 64
MAX_REPORT = 4096
_REASONS = frozenset({"digest", "stalled", "error"})


class UnknownTask(LookupError):
    pass


@dataclass
class Settings:
    advertise_ip: str = "127.0.0.1"
    download_port: int = 8001
    piece_size: int | None = None
    limits: scheduler.Limits = field(default_factory=scheduler.Limits)
    task_expire: float = 1800.0
    peer_expire: float = 60.0
    cache_limit: int = 0
    min_free: FreeSpace = field(default_factory=FreeSpace)
    header_timeout: float = 30.0
    max_open_files: int = DEFAULT_MAX_OPEN_FILES


@dataclass
class Registration:
    url: str
    peer: PeerInfo
    headers: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""
    identifier: str = ""
    filters: list[str] = field(default_factory=list)


@dataclass
class FailedPiece:
    piece: int
    source: str
    reason: str


class Supernode:
    """
    Tasks, swarms and the CDN of one supernode.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        home: Path,
        state: SwarmState,
        http: Any,
        settings: Settings,
        rng: random.Random | None = None,
        metrics: SupernodeMetrics | None = None,
        space_of: Callable[[Path], DiskSpace] = disk_space,
    ) -> None:
        """
        @param space_of: measures the cache's filesystem (on a thread).
        """
        self._reactor = reactor
        self.home = home
        self.state = state
        self._http = http
        self.settings = settings
        self._rng = rng or random.Random()
        self.store = PieceStore(
            home / "cache", reactor, max_open_files=settings.max_open_files
        )
        self._fetches: dict[str, CdnFetch] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self._waking: dict[str, IDelayedCall] = {}
        self.bytes_from_source = 0
        self.metrics = metrics if metrics is not None else SupernodeMetrics()
        self._space_of = space_of
        self._collecting: Deferred[None] | None = None
        self._collect_again = False
        self._counting: IDelayedCall | None = None
        self.transfers = TransferLog(reactor)
        self._stop_hooks: list[Callable[[], None]] = []
        # Tasks whose cache is being checked after a peer found a piece
        # from us to be wrong.
        self._checking: set[str] = set()

    @property
    def source_bytes(self) -> int:
        """
        Bytes read from sources so far, by finished and running fetches.
        """
        running = sum(fetch.bytes_from_source for fetch in self._fetches.values())
        return self.bytes_from_source + running

    @property
    def reactor(self) -> Any:
        return self._reactor

    @property
    def http(self) -> Any:
        """
        The treq client the CDN fetches sources with.
        """
        return self._http

    def on_stop(self, hook: Callable[[], None]) -> None:
        """
        Call C{hook} when the supernode stops, before its fetches are ended
        (for work built on top of it, such as preheats).
        """
        self._stop_hooks.append(hook)

    @property
    def address(self) -> str:
        return f"{self.settings.advertise_ip}:{self.settings.download_port}"

    def supernode_peer_id(self, task_id: str) -> str:
        """
        How the supernode names itself as a piece source, as Dragonfly does.
        """
        return f"cdnnode:{self.settings.advertise_ip}~{task_id}"

    # Registration ---------------------------------------------------------

    async def register(self, registration: Registration) -> dict[str, Any]:
        """
        Add a peer to a task's swarm, starting the source fetch if needed,
        and return what the peer needs to schedule.

        @raise InvalidRequest: bad URL or digest.
        @raise SourceError: the source refused or failed.
        """
        swarm = await self.open_task(
            registration.url,
            registration.headers,
            registration.digest,
            registration.identifier,
            registration.filters,
        )
        task = swarm.task
        task_id = task.task_id
        now = self._reactor.seconds()
        registration.peer.last_seen = now
        swarm.peers[registration.peer.peer_id] = registration.peer
        swarm.holdings.setdefault(registration.peer.peer_id, set())
        task.last_access = now
        await self.state.put(swarm)
        self._log.info(
            "peer {peer_id} at {address} joined {task_id} ({url})",
            peer_id=registration.peer.peer_id,
            address=registration.peer.address,
            task_id=task_id,
            url=task.url,
        )
        self._swarms_changed()
        return {
            "task_id": task_id,
            "piece_size": task.piece_size,
            "length": task.length,
            "piece_count": task.piece_count,
            "status": task.status.value,
            "supernode": {
                "peer_id": self.supernode_peer_id(task_id),
                "address": self.address,
            },
        }

    async def open_task(
        self,
        url: str,
        headers: dict[str, list[str]],
        digest: str = "",
        identifier: str = "",
        filters: list[str] | None = None,
    ) -> Swarm:
        """
        The swarm of a task, created with its source fetch started when the
        supernode does not have it (or it failed and is not being fetched),
        once the source has answered with the length.  A registration does
        this before adding its peer; a preheat does only this.

        @raise InvalidRequest: bad URL or digest.
        @raise SourceError: the source refused or failed.
        """
        check_url(url)
        if digest:
            check_digest(digest)
        task_id = task_id_for(url, filters or [], digest, identifier)
        now = self._reactor.seconds()
        swarm = await self.state.get(task_id)
        if swarm is None or (
            swarm.task.status is TaskStatus.FAILED and task_id not in self._fetches
        ):
            swarm = Swarm(
                TaskInfo(
                    task_id,
                    url,
                    self.settings.piece_size or piece_size_for(None),
                    digest=digest,
                    created=now,
                    last_access=now,
                ),
                peers=swarm.peers if swarm else {},
            )
            await self.state.put(swarm)
            self._start_fetch(swarm.task, headers)
        fetch = self._fetches.get(task_id)
        if fetch is not None:
            waiting = fetch.headers_known()
            waiting.addTimeout(self.settings.header_timeout, self._reactor)
            try:
                await waiting
            except DeferredTimeout:
                raise SourceError("the source did not answer in time", 504) from None
            swarm = await self.state.get(task_id)
            assert swarm is not None
        task = swarm.task
        if task.status is TaskStatus.FAILED:
            if task.error_kind == "digest":
                raise ContentMismatch(task.error)
            raise SourceError(task.error, task.source_status)
        return swarm

    async def wait_fetched(self, task_id: str, timeout: float) -> TaskInfo | None:
        """
        Wait, at most C{timeout} seconds, until the CDN has fetched a task
        whole or failed, waking at each piece; the task as it then is
        (C{None} if the supernode dropped it).
        """
        deadline = self._reactor.seconds() + timeout
        while True:
            swarm = await self.state.get(task_id)
            if swarm is None:
                return None
            now = self._reactor.seconds()
            if swarm.task.status is not TaskStatus.FETCHING or now >= deadline:
                return swarm.task
            await self._wait_for_change(task_id, deadline - now)

    def _start_fetch(self, task: TaskInfo, headers: dict[str, list[str]]) -> None:
        task_id = task.task_id
        fetch = CdnFetch(
            self._reactor,
            self._http,
            self.store,
            task,
            headers,
            lambda: self._changed(task_id),
            piece_size=self.settings.piece_size,
            response_timeout=self.settings.header_timeout,
            source_bytes=self.metrics.source_bytes,
        )
        self._fetches[task_id] = fetch

        def ended(result: object) -> object:
            self._fetches.pop(task_id, None)
            self.bytes_from_source += fetch.bytes_from_source
            self._changed(task_id)
            self._swarms_changed()
            # A fetch that ended grew the cache.
            self.collect_garbage()
            return None

        fetch.start().addBoth(ended)

    # Scheduling -----------------------------------------------------------

    async def schedule(
        self,
        task_id: str,
        peer_id: str,
        finished: list[int],
        failed: list[FailedPiece],
        want: int,
        wait: float,
    ) -> dict[str, Any]:
        """
        Record a peer's progress and hand it its next pieces.
        """
        check_task_id(task_id)
        if not 0 <= want <= MAX_WANT:
            raise InvalidRequest(f"want must be between 0 and {MAX_WANT}")
        if len(finished) + len(failed) > MAX_REPORT:
            raise InvalidRequest(f"at most {MAX_REPORT} pieces per report")
        wait = max(0.0, min(wait, MAX_WAIT))
        deadline = self._reactor.seconds() + wait
        swarm = await self._swarm_of(task_id, peer_id)
        limits = self.settings.limits
        # CPU time of the decisions, not the clock of the long poll.
        started = time.perf_counter()
        self._record_report(task_id, swarm, peer_id, finished, failed)
        if finished or failed:
            self._changed(task_id)
        while True:
            now = self._reactor.seconds()
            swarm.peers[peer_id].last_seen = now
            swarm.task.last_access = now
            task = swarm.task
            have = swarm.holdings.get(peer_id, set())
            done = task.status is TaskStatus.DONE and len(have) == task.piece_count
            assignments: list[scheduler.Assignment] = []
            if done:
                swarm.finished.add(peer_id)
            elif task.status is not TaskStatus.FAILED:
                assignments = scheduler.schedule(
                    swarm, peer_id, want, now, limits, self._rng
                )
            self.metrics.schedule_duration.observe(time.perf_counter() - started)
            await self.state.put(swarm)
            if assignments or done or task.status is TaskStatus.FAILED:
                break
            if want == 0 or now >= deadline:
                break
            await self._wait_for_change(task_id, deadline - now)
            swarm = await self._swarm_of(task_id, peer_id)
            started = time.perf_counter()
        return self._schedule_reply(swarm, peer_id, assignments, done)

    def _record_report(
        self,
        task_id: str,
        swarm: Swarm,
        peer_id: str,
        finished: list[int],
        failed: list[FailedPiece],
    ) -> None:
        """
        Take in the pieces a peer reports: who sent each verified one (for
        the transfer log and the delivered bytes), and each failure (for the
        blacklist and bans).
        """
        task = swarm.task
        limits = self.settings.limits
        for piece, source in scheduler.record_finished(swarm, peer_id, finished):
            size = (
                piece_bounds(piece, task.piece_size, task.length)[1]
                if task.length is not None
                else task.piece_size
            )
            self.transfers.record(task_id, source, peer_id, size)
            tier = "supernode" if source == SUPERNODE else "peer"
            self.metrics.delivered_bytes.labels(tier=tier).inc(size)
        for failure in failed:
            source = (
                SUPERNODE if failure.source.startswith("cdnnode:") else failure.source
            )
            # Peers choose the reason: unknown ones must not add series.
            reason = failure.reason if failure.reason in _REASONS else "other"
            self.metrics.failures_reported.labels(reason=reason).inc()
            if source == SUPERNODE and failure.reason == "digest":
                self._check_cache(task_id, failure.piece)
            was_listed = source in swarm.blacklist.get(peer_id, ())
            was_banned = source in swarm.banned
            scheduler.record_failed(
                swarm,
                peer_id,
                failure.piece,
                source,
                failure.reason == "digest",
                limits,
            )
            if source != SUPERNODE:
                if not was_listed:
                    self.metrics.blacklist.labels(action="blacklist").inc()
                if not was_banned and source in swarm.banned:
                    self.metrics.blacklist.labels(action="ban").inc()
                    self._log.warn(
                        "peer {source} banned from {task_id}",
                        source=source,
                        task_id=task_id,
                    )
                self._log.warn(
                    "peer {peer_id} could not get piece {piece} of {task_id} from "
                    "{source}: {reason}",
                    peer_id=peer_id,
                    piece=failure.piece,
                    task_id=task_id,
                    source=source,
                    reason=failure.reason,
                )

    def _schedule_reply(
        self,
        swarm: Swarm,
        peer_id: str,
        assignments: list[scheduler.Assignment],
        done: bool,
    ) -> dict[str, Any]:
        task = swarm.task
        pieces = []
        for assignment in assignments:
            offset = assignment.piece * task.piece_size
            length = (
                min(task.piece_size, task.length - offset)
                if task.length is not None
                else task.piece_size
            )
            if assignment.source == SUPERNODE:
                source_id, address = self.supernode_peer_id(task.task_id), self.address
            else:
                source_id = assignment.source
                address = swarm.peers[assignment.source].address
            pieces.append(
                {
                    "piece": assignment.piece,
                    "offset": offset,
                    "length": length,
                    "sha256": task.pieces[assignment.piece],
                    "peer_id": source_id,
                    "address": address,
                }
            )
        if task.status is TaskStatus.FAILED:
            status = "failed"
        elif done:
            status = "done"
        else:
            status = "running"
        return {
            "status": status,
            "error": task.error,
            "error_kind": task.error_kind,
            "source_status": task.source_status,
            "length": task.length,
            "piece_size": task.piece_size,
            "piece_count": task.piece_count if task.status is TaskStatus.DONE else None,
            "file_sha256": task.file_sha256 if task.status is TaskStatus.DONE else "",
            "pieces": pieces,
            "downloading": swarm.downloading,
            "cached": len(task.pieces),
        }

    async def _swarm_of(self, task_id: str, peer_id: str) -> Swarm:
        swarm = await self.state.get(task_id)
        if swarm is None:
            raise UnknownTask(f"unknown task {task_id}")
        if peer_id not in swarm.peers:
            raise UnknownTask(f"peer {peer_id} is not in the swarm of {task_id}")
        return swarm

    def _changed(self, task_id: str) -> None:
        """
        Wake the calls waiting on C{task_id}, once per reactor turn however
        many changes the turn makes.
        """
        if task_id in self._waiters and task_id not in self._waking:
            self._waking[task_id] = self._reactor.callLater(0, self._wake, task_id)

    def _wake(self, task_id: str) -> None:
        self._waking.pop(task_id, None)
        for waiter in self._waiters.pop(task_id, []):
            if not waiter.called:
                waiter.callback(None)

    async def _wait_for_change(self, task_id: str, timeout: float) -> None:
        waiter: Deferred[None] = Deferred()
        self._waiters.setdefault(task_id, []).append(waiter)
        waiter.addTimeout(timeout, self._reactor)
        try:
            await waiter
        except DeferredTimeout:
            waiters = self._waiters.get(task_id, [])
            if waiter in waiters:
                waiters.remove(waiter)

    # Membership -----------------------------------------------------------

    async def heartbeat(self, peer_id: str, task_ids: list[str]) -> list[str]:
        """
        Keep a peer alive in the swarms it serves; return the task ids the
        supernode does not know it in (it should register again to serve them).
        """
        now = self._reactor.seconds()
        unknown = []
        for task_id in task_ids:
            swarm = await self.state.get(task_id)
            if swarm is None or peer_id not in swarm.peers:
                unknown.append(task_id)
                continue
            swarm.peers[peer_id].last_seen = now
            await self.state.put(swarm)
        return unknown

    async def leave(self, task_id: str, peer_id: str) -> None:
        swarm = await self.state.get(task_id)
        if swarm is None:
            return
        swarm.remove_peer(peer_id)
        await self.state.put(swarm)
        self._changed(task_id)
        self._swarms_changed()

    async def task_info(self, task_id: str) -> dict[str, Any]:
        check_task_id(task_id)
        swarm = await self.state.get(task_id)
        if swarm is None:
            raise UnknownTask(f"unknown task {task_id}")
        task = swarm.task
        return {
            "task_id": task.task_id,
            "url": task.url,
            "status": task.status.value,
            "length": task.length,
            "piece_size": task.piece_size,
            "piece_count": task.piece_count,
            "pieces_cached": len(task.pieces),
            "file_sha256": task.file_sha256,
            "error": task.error,
            "peers": {
                peer_id: {
                    "address": peer.address,
                    "pieces": len(swarm.holdings.get(peer_id, ())),
                    "finished": peer_id in swarm.finished,
                }
                for peer_id, peer in swarm.peers.items()
            },
            "pieces_served": {
                (self.supernode_peer_id(task_id) if k == SUPERNODE else k): v
                for k, v in swarm.served.items()
            },
            "banned": sorted(swarm.banned),
        }

    async def list_tasks(self) -> list[dict[str, Any]]:
        return [
            await self.task_info(task_id) for task_id in await self.state.task_ids()
        ]

    # Housekeeping ---------------------------------------------------------

    async def collect(self) -> None:
        """
        Drop silent peers and idle tasks, and keep the cache under its cap.
        """
        now = self._reactor.seconds()
        for task_id in await self.state.task_ids():
            swarm = await self.state.get(task_id)
            if swarm is None:
                continue
            silent = [
                peer_id
                for peer_id, peer in swarm.peers.items()
                if peer.last_seen < now - self.settings.peer_expire
            ]
            for peer_id in silent:
                self._log.info(
                    "dropping silent peer {peer_id} from {task_id}",
                    peer_id=peer_id,
                    task_id=task_id,
                )
                swarm.remove_peer(peer_id)
            scheduler.expire_leases(swarm, now)
            idle = (
                not swarm.peers
                and task_id not in self._fetches
                and swarm.task.last_access < now - self.settings.task_expire
            )
            being_read = self.store.tasks.get(task_id)
            if idle and being_read is not None and being_read.readers:
                # A peer that left may still be streaming a piece: closing
                # the file would cut it off.  A later round expires the task.
                self._log.info(
                    "task {task_id} expiry postponed: {readers} pieces being served",
                    task_id=task_id,
                    readers=being_read.readers,
                )
                idle = False
            if idle:
                # Only memory is freed: the cached file stays for a later
                # registration, until the watermarks evict it.
                self._log.info(
                    "task {task_id} expired: forgotten, {bytes_freed} bytes freed "
                    "on disk (reason: {reason})",
                    task_id=task_id,
                    bytes_freed=0,
                    reason="expired",
                )
                self.metrics.evictions.record("expired", 0)
                task_file = await self._forget(task_id)
                if task_file is not None:
                    # The data file's mtime records the last use, for the
                    # least-recently-used eviction below.
                    await self.store.in_thread(_touch, task_file.path)
            else:
                await self.state.put(swarm)
            if silent:
                self._changed(task_id)
        await self._count_swarms()
        await self.collect_garbage()

    def _check_cache(self, task_id: str, piece: int) -> None:
        """
        A peer says C{piece}, which we served, does not match its digest:
        hash our copy again, on a thread, in the background (one check at a
        time per task; a report during a check is not queued).  Only that
        piece: a whole file hashed per report would let a peer keep the
        supernode's disk and a core busy.
        """
        if task_id in self._checking:
            return
        self._checking.add(task_id)
        d = Deferred.fromCoroutine(self._verify_cache(task_id, piece))
        d.addErrback(
            lambda f: self._log.failure(
                "checking the cache of {task_id} failed", f, task_id=task_id
            )
        )
        d.addBoth(lambda _: self._checking.discard(task_id))

    async def _verify_cache(self, task_id: str, piece: int) -> None:
        """
        Re-hash a cached piece of a complete task; when it no longer has its
        recorded sha256 (the disk changed under us), drop the task and its
        cache, so that no peer is sent to a damaged piece again: the swarm's
        peers register again (the supernode "forgot the task"), keep what
        they verified, and the cache is fetched afresh from the source.
        """
        swarm = await self.state.get(task_id)
        task_file = self.store.tasks.get(task_id)
        expected = swarm.task.pieces.get(piece) if swarm is not None else None
        if (
            swarm is None
            or expected is None
            or task_file is None
            or swarm.task.status is not TaskStatus.DONE
            or task_id in self._fetches
        ):
            return
        damaged = await self.store.in_thread(
            damaged_pieces, task_file, {piece: expected}
        )
        if not damaged:
            self._log.info(
                "piece {piece} of {task_id} checked after a digest report: intact",
                piece=piece,
                task_id=task_id,
            )
            return
        if await self.state.get(task_id) is not swarm or task_id in self._fetches:
            # Replaced meanwhile (expired, registered afresh): not ours to drop.
            return
        self._log.warn(
            "cache of {task_id} is damaged on disk in piece {piece}: dropped, "
            "to be fetched again",
            task_id=task_id,
            piece=piece,
        )
        self.metrics.cache_damaged.inc()
        await self._forget(task_id)
        trash = self.store.directory / ".trash"
        _retire(self.store.path_for(task_id), trash)
        await self.store.in_thread(shutil.rmtree, trash, True)
        # Long polls on the task answer now (404: the peers register again).
        self._changed(task_id)

    async def _forget(self, task_id: str) -> TaskFile | None:
        """
        Take a task out of memory and close its file (which stays on disk);
        returns that file, if it was open.
        """
        await self.state.drop(task_id)
        self.transfers.forget(task_id)
        task_file = self.store.tasks.pop(task_id, None)
        if task_file is not None:
            task_file.close()
        return task_file

    def _unused(self, swarm: Swarm) -> bool:
        """
        Whether a task in memory can lose its cache now: no peer in its
        swarm (nobody downloads it, nobody will ask for its pieces), no
        fetch from its source, no piece of it being served.
        """
        task_id = swarm.task.task_id
        task_file = self.store.tasks.get(task_id)
        return (
            not swarm.peers
            and task_id not in self._fetches
            and not (task_file is not None and task_file.readers)
        )

    def _swarms_changed(self) -> None:
        """
        Recount tasks and peers for the gauges soon: at most once a second,
        since a count walks every swarm.
        """
        if self._counting is None:
            self._counting = self._reactor.callLater(1.0, self._recount)

    def _recount(self) -> None:
        self._counting = None
        Deferred.fromCoroutine(self._count_swarms()).addErrback(
            lambda f: self._log.failure("counting swarms failed", f)
        )

    async def _count_swarms(self) -> None:
        by_status = dict.fromkeys(TaskStatus, 0)
        peers: set[str] = set()
        for task_id in await self.state.task_ids():
            swarm = await self.state.get(task_id)
            if swarm is not None:
                by_status[swarm.task.status] += 1
                peers.update(swarm.peers)
        for status, count in by_status.items():
            self.metrics.tasks.labels(status=status.value).set(count)
        self.metrics.peers.set(len(peers))

    def collect_garbage(self) -> "Deferred[None]":
        """
        Measure the cache and, when it is over its cap or the filesystem
        under its free-space minimum, evict the least recently used cached
        files of tasks no longer in memory.  A call while a round runs
        makes one more round afterwards.
        """
        if self._collecting is not None:
            self._collect_again = True
            return succeed(None)
        self._collecting = Deferred.fromCoroutine(self._collect_garbage())

        def done(result: object) -> None:
            self._collecting = None
            if isinstance(result, Failure):
                self._log.failure("cache garbage collection failed", result)
            if self._collect_again:
                self._collect_again = False
                self.collect_garbage()

        self._collecting.addBoth(done)
        return self._collecting

    async def _collect_garbage(self) -> None:
        marks = Watermarks(self.settings.cache_limit, self.settings.min_free)
        directory = self.store.directory
        files = await self.store.in_thread(_scan, directory)
        space = await self.store.in_thread(self._space_of, directory) if marks else None
        used = sum(size for _, size, _ in files)
        # Decided here, on the reactor thread, against what is in memory
        # now: a task registered while the disk was measured is kept.
        active = set(await self.state.task_ids())
        # Tasks in memory whose swarm is empty may go too, by their last
        # access: otherwise a burst of downloads within --task-expire would
        # keep the cache over its cap until they expire.
        unused: dict[str, float] = {}
        for task_id in active:
            swarm = await self.state.get(task_id)
            if swarm is not None and self._unused(swarm):
                unused[task_id] = swarm.task.last_access
        entries = [
            Entry(task_id, size, unused.get(task_id, mtime))
            for task_id, size, mtime in files
            if task_id not in active or task_id in unused
        ]
        trash = directory / ".trash"
        moved = False
        for entry, reason in choose(entries, used, space, marks):
            task_id = entry.task_id
            if task_id in unused:
                # Checked again: a peer may have joined since.
                swarm = await self.state.get(task_id)
                if swarm is not None:
                    if not self._unused(swarm):
                        continue
                    await self._forget(task_id)
            if task_id in self._fetches or task_id in self.store.tasks:
                continue
            # A rename is one quick metadata operation: done here, it takes
            # the file away before anything can open it again; the slow
            # unlink of its blocks happens on a thread.
            _retire(self.store.path_for(task_id), trash)
            moved = True
            used -= entry.size
            self.metrics.evictions.record(reason, entry.size)
            self._log.info(
                "evicted {task_id} from the cache: {bytes_freed} bytes freed "
                "(reason: {reason})",
                task_id=task_id,
                bytes_freed=entry.size,
                reason=reason,
            )
        if moved:
            await self.store.in_thread(shutil.rmtree, trash, True)
        self.metrics.cache_bytes.set(used)

    def stop(self) -> None:
        for hook in self._stop_hooks:
            hook()
        if self._counting is not None and self._counting.active():
            self._counting.cancel()
        self._counting = None
        for fetch in list(self._fetches.values()):
            fetch.stop()
        for call in self._waking.values():
            if call.active():
                call.cancel()
        self._waking.clear()
        for task_id in list(self._waiters):
            self._wake(task_id)
        self.store.close()


def _scan(directory: Path) -> list[tuple[str, int, float]]:
    """
    Every cached data file's task id, size and last use (its mtime).  Runs
    on a thread.
    """
    # What an interrupted round left behind.
    shutil.rmtree(directory / ".trash", ignore_errors=True)
    files = []
    for data in directory.glob("??/*"):
        if data.suffix:
            continue
        with suppress(FileNotFoundError):
            stat = data.stat()
            files.append((data.name, stat.st_size, stat.st_mtime))
    return files


def _retire(data: Path, trash: Path) -> None:
    """
    Move a cached file and its meta out of the cache, into C{trash}.
    """
    trash.mkdir(exist_ok=True)
    for path in (data, data.with_suffix(".json")):
        with suppress(FileNotFoundError):
            os.replace(path, trash / path.name)


def _touch(path: Path) -> None:
    with suppress(FileNotFoundError):
        os.utime(path)
