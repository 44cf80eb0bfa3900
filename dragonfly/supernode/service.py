"""
The supernode's core: registrations, scheduling calls, heartbeats and
housekeeping, over a L{SwarmState} and the CDN.

Scheduling calls are long polls: when nothing can be assigned yet (the CDN
has not cut the next piece, or every holder is busy) the call waits, up to
the time the peer allows, for the swarm to change, instead of having peers
poll in a loop.
"""

import os
import random
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.logger import Logger

from dragonfly.store import PieceStore
from dragonfly.supernode import scheduler
from dragonfly.supernode.cdn import CdnFetch, ContentMismatch, SourceError
from dragonfly.supernode.state import (
    SUPERNODE,
    PeerInfo,
    Swarm,
    SwarmState,
    TaskInfo,
    TaskStatus,
)
from dragonfly.tasks import (
    InvalidRequest,
    check_digest,
    check_task_id,
    check_url,
    piece_size_for,
    task_id_for,
)

MAX_WAIT = 10.0
MAX_WANT = 64
MAX_REPORT = 4096


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
    header_timeout: float = 30.0


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
    ) -> None:
        self._reactor = reactor
        self.home = home
        self.state = state
        self._http = http
        self.settings = settings
        self._rng = rng or random.Random()
        self.store = PieceStore(home / "cache", reactor)
        self._fetches: dict[str, CdnFetch] = {}
        self._waiters: dict[str, list[Deferred[None]]] = {}
        self.bytes_from_source = 0
        self._stop_hooks: list[Callable[[], None]] = []

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
        )
        self._fetches[task_id] = fetch

        def ended(result: object) -> object:
            self._fetches.pop(task_id, None)
            self.bytes_from_source += fetch.bytes_from_source
            self._changed(task_id)
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
        scheduler.record_finished(swarm, peer_id, finished)
        for failure in failed:
            source = (
                SUPERNODE if failure.source.startswith("cdnnode:") else failure.source
            )
            scheduler.record_failed(
                swarm,
                peer_id,
                failure.piece,
                source,
                failure.reason == "digest",
                limits,
            )
            if source != SUPERNODE:
                self._log.warn(
                    "peer {peer_id} could not get piece {piece} of {task_id} from "
                    "{source}: {reason}",
                    peer_id=peer_id,
                    piece=failure.piece,
                    task_id=task_id,
                    source=source,
                    reason=failure.reason,
                )
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
            await self.state.put(swarm)
            if assignments or done or task.status is TaskStatus.FAILED:
                break
            if want == 0 or now >= deadline:
                break
            await self._wait_for_change(task_id, deadline - now)
            swarm = await self._swarm_of(task_id, peer_id)
        return self._schedule_reply(swarm, peer_id, assignments, done)

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
            if idle:
                self._log.info("task {task_id} expired", task_id=task_id)
                await self.state.drop(task_id)
                task_file = self.store.tasks.pop(task_id, None)
                if task_file is not None:
                    task_file.close()
                    # The data file's mtime records the last use, for the
                    # least-recently-used eviction below.
                    await self.store.in_thread(_touch, task_file.path)
            else:
                await self.state.put(swarm)
            if silent:
                self._changed(task_id)
        if self.settings.cache_limit:
            active = set(await self.state.task_ids())
            evicted = await self.store.in_thread(
                _evict, self.store.directory, self.settings.cache_limit, active
            )
            for task_id in evicted:
                self._log.info("evicted {task_id} from the cache", task_id=task_id)

    def stop(self) -> None:
        for hook in self._stop_hooks:
            hook()
        for fetch in list(self._fetches.values()):
            fetch.stop()
        for task_id in list(self._waiters):
            self._changed(task_id)
        self.store.close()


def _evict(directory: Path, limit: int, active: set[str]) -> list[str]:
    """
    Delete the least recently used cached tasks not in memory until the
    cache holds at most C{limit} bytes.  Runs on a thread.
    """
    entries = []
    total = 0
    for data in directory.glob("??/*"):
        if data.suffix:
            continue
        stat = data.stat()
        total += stat.st_size
        entries.append((stat.st_mtime, stat.st_size, data))
    evicted = []
    for _, size, data in sorted(entries):
        if total <= limit:
            break
        if data.name in active:
            continue
        data.unlink(missing_ok=True)
        data.with_suffix(".json").unlink(missing_ok=True)
        total -= size
        evicted.append(data.name)
    return evicted


def _touch(path: Path) -> None:
    with suppress(FileNotFoundError):
        os.utime(path)
