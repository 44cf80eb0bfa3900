"""
The peer engine, shared by C{dfget} and C{dfpeer}: downloads tasks through
the swarm into a local store and serves the pieces it holds to other peers.

Download
========
Register with a supernode, then keep two kinds of calls going: one
scheduling call (a long poll asking for as many pieces as there are free
download slots) and, whenever pieces finish while that call waits, one
report-only call, so that other peers learn at once that this peer holds a
piece (the supernode makes them wait for such a copy rather than serving a
piece twice).  Each piece is fetched from the node the supernode named,
checked against the sha256 the supernode recorded before it is written, and
served to others from then on.  A piece that fails is reported with the
reason; the supernode blacklists the node and assigns the piece again.

When no supernode can be reached, or the swarm fails for a reason that is not
the source's, the engine downloads straight from the source (back to source)
unless told not to.  An output is only ever produced from a complete,
verified task file.
"""

import hashlib
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dragonfly.clientlog import PIECE_NAMESPACE
from dragonfly.metrics import PeerMetrics
from dragonfly.peer.supernode_client import (
    SupernodeClient,
    SupernodeRefused,
    SupernodeUnavailable,
)
from dragonfly.piece_protocol import PieceClientPool, PieceRequestError
from dragonfly.ratelimit import TokenBucket, delay_for
from dragonfly.store import PieceDigestMismatch, PieceStore, TaskFile
from dragonfly.tasks import piece_size_for, task_id_for

SCHEDULE_WAIT = 5.0
REGISTER_TIMEOUT = 60.0
# How long to keep trying to register again after losing the supernode
# mid-download, before going back to source.
RECONNECT_WINDOW = 10.0
# Give up on the swarm (and go back to source) when nothing moves for this
# long: neither a piece here nor a new piece in the supernode's cache.
NO_PROGRESS_TIMEOUT = 120.0
# ... or when this many piece fetches in a row fail.
MAX_FAILURES_IN_A_ROW = 16
# Bytes of pieces being received or written at once, per download: 64 MiB
# is four or five of the biggest pieces (15 MiB), enough to keep loopback or
# a LAN busy, and keeps a download's memory the same for 1 GiB and 100 GiB.
IN_FLIGHT_BYTES = 64 * 1024 * 1024
# Pieces reported per scheduling call (the supernode takes up to 4096).
MAX_REPORT = 1024


class DownloadError(Exception):
    """
    A download failed.

    @ivar kind: C{"source"} (the source refused or failed), C{"digest"}
        (content does not match the expected digest), C{"timeout"},
        C{"supernode"} (no supernode and back to source forbidden), C{"io"}
        (local disk) or C{"swarm"}.
    """

    def __init__(self, kind: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


@dataclass
class DownloadRequest:
    url: str
    headers: dict[str, list[str]] = field(default_factory=dict)
    digest: str = ""
    identifier: str = ""
    filters: list[str] = field(default_factory=list)
    back_to_source: bool = True
    local_limit: int = 0
    timeout: float = 0.0
    progress: Callable[[int, int | None], None] | None = None


@dataclass
class DownloadResult:
    task_id: str
    task_file: TaskFile
    length: int
    sha256: str
    bytes_by_tier: dict[str, int]
    pieces_by_tier: dict[str, int]
    seconds: float
    back_to_source_reason: str = ""


@dataclass
class _Report:
    finished: list[int] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.finished or self.failed)

    def take(self) -> "_Report":
        taken = _Report(self.finished[:MAX_REPORT], self.failed[:MAX_REPORT])
        del self.finished[:MAX_REPORT]
        del self.failed[:MAX_REPORT]
        return taken

    def give_back(self, other: "_Report") -> None:
        self.finished[:0] = other.finished
        self.failed[:0] = other.failed


class PeerEngine:
    """
    One host's peer: its identity, store, piece connections and downloads.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: PieceStore,
        supernodes: SupernodeClient,
        pieces: PieceClientPool,
        *,
        peer_id: str,
        address: Callable[[], str],
        piece_log: ILogObserver | None = None,
        concurrency: int = 6,
        in_flight_bytes: int = IN_FLIGHT_BYTES,
        total_bucket: TokenBucket | None = None,
        source_http: Any = None,
        metrics: PeerMetrics | None = None,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.supernodes = supernodes
        self.pieces = pieces
        self.peer_id = peer_id
        self._address = address
        self._piece_log = (
            Logger(namespace=PIECE_NAMESPACE, observer=piece_log) if piece_log else None
        )
        self.concurrency = concurrency
        self.in_flight_bytes = in_flight_bytes
        self.total_bucket = total_bucket
        self.source_http = source_http
        self.registrations: dict[str, dict[str, Any]] = {}
        self.downloading: dict[str, _Running] = {}
        self.metrics = metrics if metrics is not None else PeerMetrics()
        self.metrics.watch_engine(
            lambda: len(self.downloading), lambda: len(self.store.tasks)
        )
        # Readers of finished tasks' files outside the piece server (a
        # mirror response streaming a blob): the GC must leave them alone.
        self._users: dict[str, int] = {}
        self.on_download_done: Callable[[str], object] | None = None

    @contextmanager
    def using(self, task_id: str) -> Iterator[None]:
        """
        Mark C{task_id}'s file in use for the duration of the block.
        """
        self._users[task_id] = self._users.get(task_id, 0) + 1
        try:
            yield
        finally:
            self._users[task_id] -= 1
            if not self._users[task_id]:
                del self._users[task_id]

    def in_use(self, task_id: str) -> bool:
        """
        Whether C{task_id} is being downloaded or read: not to be deleted.
        """
        if task_id in self.downloading or task_id in self._users:
            return True
        task_file = self.store.tasks.get(task_id)
        return task_file is not None and task_file.readers > 0

    @property
    def address(self) -> str:
        return self._address()

    def download(self, request: DownloadRequest) -> "Deferred[DownloadResult]":
        """
        Download a task into the store.

        Concurrent requests for one task share its download; each caller
        gets its own Deferred, and cancelling it withdraws that caller only:
        the download stops when the last one has withdrawn.
        """
        task_id = task_id_for(
            request.url, request.filters, request.digest, request.identifier
        )
        running = self.downloading.get(task_id)
        if running is None:
            running = self._start(request, task_id)

        def withdraw(mine: Deferred[DownloadResult]) -> None:
            running.followers.remove(mine)
            if not running.followers:
                running.deferred.cancel()

        mine: Deferred[DownloadResult] = Deferred(withdraw)
        running.followers.append(mine)
        return mine

    def _start(self, request: DownloadRequest, task_id: str) -> "_Running":
        download = _Download(self, request, task_id)
        d = Deferred.fromCoroutine(download.run())
        if request.timeout:
            d.addTimeout(request.timeout, self.reactor)
        running = _Running(download, d)
        self.downloading[task_id] = running

        def done(result: object) -> object:
            self.downloading.pop(task_id, None)
            if not self.downloading:
                self.pieces.buffers.clear()
            if isinstance(result, Failure) and result.check(DeferredTimeout):
                result = Failure(
                    DownloadError("timeout", f"download took over {request.timeout:g}s")
                )
            if isinstance(result, Failure):
                error = result.value
                kind = error.kind if isinstance(error, DownloadError) else "other"
                if not result.check(CancelledError):
                    self.metrics.downloads.labels(result=kind).inc()
            else:
                self.metrics.downloads.labels(result="ok").inc()
                if self.on_download_done is not None:
                    self.on_download_done(task_id)
            return result

        d.addBoth(done).addBoth(running.settle)
        return running

    def progress_of(self, task_id: str) -> "_Download | None":
        """
        The download of C{task_id} under way, to follow its progress.
        """
        running = self.downloading.get(task_id)
        return running.download if running is not None else None

    def log_piece(self, record: dict[str, Any]) -> None:
        if self._piece_log is not None:
            self._piece_log.info("downloading piece: {piece}", piece=record)

    async def heartbeat(self) -> None:
        """
        Tell the supernode this peer still serves its tasks; register again
        where it forgot us (it restarted, or dropped us).
        """
        held = [t for t in self.registrations if t in self.store.tasks]
        if not held:
            return
        try:
            reply = await self.supernodes.heartbeat(self.peer_id, held)
        except (SupernodeUnavailable, SupernodeRefused) as e:
            self._log.info("heartbeat failed: {error}", error=e)
            return
        for task_id in reply.get("unknown", []):
            body = self.registrations.get(task_id)
            if body is None:
                continue
            try:
                await self.supernodes.register(body, REGISTER_TIMEOUT)
                await self.supernodes.schedule(
                    task_id,
                    {
                        "peer_id": self.peer_id,
                        "finished": sorted(self.store.tasks[task_id].held),
                        "want": 0,
                    },
                    10.0,
                )
            except (SupernodeUnavailable, SupernodeRefused, KeyError) as e:
                self._log.info(
                    "re-registering {task_id} failed: {error}", task_id=task_id, error=e
                )

    async def leave_all(self) -> None:
        for task_id in list(self.registrations):
            # Leaving is a courtesy: a supernode that cannot be told drops
            # this peer when its heartbeats stop.
            with suppress(SupernodeUnavailable, SupernodeRefused):
                await self.supernodes.leave(task_id, self.peer_id)


@dataclass
class _Running:
    """
    A download under way and the callers still waiting for it.
    """

    download: "_Download"
    deferred: "Deferred[DownloadResult]"
    followers: "list[Deferred[DownloadResult]]" = field(default_factory=list)

    def settle(self, result: object) -> None:
        """
        Hand the outcome to every follower (which handle a failure).
        """
        followers, self.followers = self.followers, []
        for follower in followers:
            if isinstance(result, Failure):
                follower.errback(result)
            else:
                assert isinstance(result, DownloadResult)
                follower.callback(result)


class _Download:
    """
    One download, from registration to a complete, verified task file.
    """

    _log = Logger()

    def __init__(
        self, engine: PeerEngine, request: DownloadRequest, task_id: str
    ) -> None:
        self.engine = engine
        self.request = request
        self.task_id = task_id
        self.reactor = engine.reactor
        self.started = self.reactor.seconds()
        self.task_file: TaskFile | None = None
        self.piece_count: int | None = None
        self.piece_size = 0
        self.length: int | None = None
        self.file_sha256 = ""
        self.supernode_id = ""
        self.supernode_address = ""
        self.in_flight: dict[int, Deferred[None]] = {}
        self.report = _Report()
        self.last_progress = self.started
        self.cached_pieces = 0
        # Piece bytes received for this download (not for the others of
        # the process: in a dfpeer, one busy download must not keep a stuck
        # one's watchdog quiet), and their count at the last progress.
        self.bytes_arrived = 0
        self.bytes_seen = 0
        self.from_source = False
        self.source_offset = 0
        self.complete = False
        self.ended = False
        self.error: BaseException | None = None
        self._prefix_pieces = 0
        self._watchers: list[Deferred[None]] = []
        self.failures_in_a_row = 0
        self.poll: Deferred[Any] | None = None
        self.report_call: Deferred[Any] | None = None
        self.bytes_by_tier = {"peers": 0, "supernode": 0, "source": 0}
        self.pieces_by_tier = {"peers": 0, "supernode": 0, "source": 0}
        self.outcome: Deferred[None] = Deferred()
        self.buckets = [b for b in [engine.total_bucket] if b is not None]
        if request.local_limit:
            self.buckets.append(TokenBucket(request.local_limit, self.reactor))

    def _registration(self) -> dict[str, Any]:
        return {
            "url": self.request.url,
            "headers": self.request.headers,
            "digest": self.request.digest,
            "identifier": self.request.identifier,
            "filters": self.request.filters,
            "peer": {
                "peer_id": self.engine.peer_id,
                "address": self.engine.address,
                "hostname": socket.gethostname(),
            },
        }

    async def run(self) -> DownloadResult:
        self._log.info(
            "download of {url} started (task {task_id})",
            url=self.request.url,
            task_id=self.task_id,
        )
        try:
            reason = await self._through_swarm()
            if reason:
                self._stop_pieces()
                await self._from_source(reason)
            assert self.task_file is not None and self.length is not None
            sha256 = await self._verify()
            self.complete = True
            # Expiry counts from the end of a download, not its start.
            self.task_file.last_used = self.reactor.seconds()
        except BaseException as e:
            self.error = e
            raise
        finally:
            self.ended = True
            self._stop_pieces()
            self._notify()
        result = DownloadResult(
            self.task_id,
            self.task_file,
            self.length,
            sha256,
            self.bytes_by_tier,
            self.pieces_by_tier,
            self.reactor.seconds() - self.started,
            reason,
        )
        self._log.info(
            "download of {url} finished: {length} bytes in {seconds:.2f}s, "
            "{peers} from peers, {supernode} from the supernode, "
            "{source} from the source",
            url=self.request.url,
            length=self.length,
            seconds=result.seconds,
            **self.bytes_by_tier,
        )
        return result

    async def _through_swarm(self) -> str:
        """
        Download through the swarm; return why to go back to source instead
        (empty when done).
        """
        body = self._registration()
        try:
            reply = await self.engine.supernodes.register(body, REGISTER_TIMEOUT)
        except SupernodeUnavailable as e:
            return self._no_swarm(f"no supernode reachable: {e}")
        except SupernodeRefused as e:
            raise self._refusal(e) from None
        self.engine.registrations[self.task_id] = body
        self._accept_registration(reply)
        while True:
            self.outcome = Deferred()
            self._kick()
            try:
                await self.outcome
                return ""
            except SupernodeUnavailable as e:
                # The supernode stopped answering: try the others, keeping
                # the pieces already verified.
                self._stop_pieces()
                try:
                    reply = await self._register_again(body)
                except SupernodeUnavailable:
                    return self._no_swarm(f"lost the supernode: {e}")
                except SupernodeRefused as refused:
                    raise self._refusal(refused) from None
                self._accept_registration(reply)
                self.report.finished[:0] = (
                    sorted(self.task_file.held) if self.task_file else []
                )
            except _SwarmFailed as e:
                if e.kind == "digest":
                    # The supernode found the content differs from --digest:
                    # the source would give the same bytes again.
                    raise DownloadError("digest", str(e)) from None
                if 400 <= e.status < 500:
                    raise DownloadError("source", str(e), e.status) from None
                return self._no_swarm(str(e))

    async def _register_again(self, body: dict[str, Any]) -> dict[str, Any]:
        """
        Register again after losing the supernode: with the other nodes
        first, then with all of them in turn for up to L{RECONNECT_WINDOW}
        seconds, since a supernode being restarted takes a moment to listen
        again, and going back to source would cost another copy from it.

        @raise SupernodeUnavailable: when none answered within the window.
        """
        deadline = self.reactor.seconds() + RECONNECT_WINDOW
        delay = 0.25
        while True:
            self.engine.supernodes.next_node()
            try:
                return await self.engine.supernodes.register(body, REGISTER_TIMEOUT)
            except SupernodeUnavailable:
                if self.reactor.seconds() + delay > deadline:
                    raise
            await deferLater(self.reactor, delay)
            delay = min(2 * delay, 2.0)

    def _no_swarm(self, reason: str) -> str:
        if not self.request.back_to_source:
            raise DownloadError("supernode", f"{reason}; back to source is disabled")
        self._log.warn("going back to source: {reason}", reason=reason)
        self.engine.metrics.back_to_source.inc()
        return reason

    def _refusal(self, e: SupernodeRefused) -> DownloadError:
        status = int(e.body.get("source_status") or 0)
        if e.body.get("error") == "digest":
            return DownloadError("digest", str(e))
        if e.body.get("error") == "source":
            return DownloadError("source", str(e), status)
        return DownloadError("swarm", f"supernode refused the download: {e}")

    def _accept_registration(self, reply: dict[str, Any]) -> None:
        self.supernode_id = reply["supernode"]["peer_id"]
        self.supernode_address = str(self.engine.supernodes.node)
        piece_size = int(reply["piece_size"])
        length = reply.get("length")
        held = self.task_file or self.engine.store.tasks.get(self.task_id)
        if held is not None and (
            held.piece_size != piece_size
            or (None not in (held.length, length) and held.length != length)
        ):
            # Cut differently (another supernode) or other content under the
            # same task (the source changed): what is held is no use.
            self.engine.store.remove(self.task_id)
            self.task_file = None
        self.piece_size = piece_size
        self.length = length
        self.piece_count = reply.get("piece_count")
        self.task_file = self.engine.store.open(
            self.task_id, piece_size, length, fresh=True
        )
        if self.task_file.length is None:
            self.task_file.length = length
        self._prefix_pieces = 0
        self._notify()

    # The scheduling loop --------------------------------------------------

    def _kick(self) -> None:
        if self.outcome.called:
            return
        if self._complete():
            if self.poll is not None:
                # A long poll asking for more is pointless now; its report
                # (if any) goes back to the queue.
                self.poll.cancel()
            if self.report_call is None:
                if self.report:
                    self.report_call = self._call(0)
                else:
                    self.outcome.callback(None)
            return
        free = self._concurrency() - len(self.in_flight)
        if self.poll is None and free > 0:
            self.poll = self._call(free)
        elif self.report and self.report_call is None:
            self.report_call = self._call(0)

    def _concurrency(self) -> int:
        """
        How many pieces may be fetched at once: each is held whole in memory
        from its first byte until it is written, so big pieces mean fewer of
        them, and the memory a download needs does not grow with the file's
        size (which sets the piece size).
        """
        by_memory = self.engine.in_flight_bytes // max(1, self.piece_size or 1)
        return max(1, min(self.engine.concurrency, by_memory))

    def _complete(self) -> bool:
        return (
            self.piece_count is not None
            and self.task_file is not None
            and len(self.task_file.held) >= self.piece_count
        )

    def _call(self, want: int) -> "Deferred[Any]":
        report = self.report.take()
        body = {
            "peer_id": self.engine.peer_id,
            "finished": report.finished,
            "failed": report.failed,
            "want": want,
            "wait": SCHEDULE_WAIT if want else 0.0,
        }
        d = Deferred.fromCoroutine(
            self.engine.supernodes.schedule(self.task_id, body, SCHEDULE_WAIT + 15)
        )

        def answered(reply: dict[str, Any]) -> None:
            self._clear_call(d)
            self._apply(reply)

        def failed(failure: Failure) -> None:
            self._clear_call(d)
            self.report.give_back(report)
            if failure.check(CancelledError):
                return
            if failure.check(SupernodeRefused):
                error = failure.value
                assert isinstance(error, SupernodeRefused)
                if error.status == 404:
                    failure = Failure(
                        SupernodeUnavailable(f"supernode forgot the task: {error}")
                    )
            if not self.outcome.called:
                self.outcome.errback(failure)

        d.addCallbacks(answered, failed)
        return d

    def _clear_call(self, d: "Deferred[Any]") -> None:
        if self.poll is d:
            self.poll = None
        if self.report_call is d:
            self.report_call = None

    def _apply(self, reply: dict[str, Any]) -> None:
        if self.outcome.called:
            return
        status = reply.get("status")
        if status == "failed":
            self.outcome.errback(
                _SwarmFailed(
                    reply.get("error") or "task failed",
                    int(reply.get("source_status") or 0),
                    reply.get("error_kind") or "source",
                )
            )
            return
        if reply.get("length") is not None and self.length is None:
            self.length = int(reply["length"])
            assert self.task_file is not None
            self.task_file.length = self.length
        if reply.get("piece_count") is not None:
            self.piece_count = int(reply["piece_count"])
            self.file_sha256 = reply.get("file_sha256") or ""
        now = self.reactor.seconds()
        cached = int(reply.get("cached") or 0)
        received = self.bytes_arrived
        if cached > self.cached_pieces or received > self.bytes_seen:
            # Bytes arriving count, not only whole pieces: under a low rate
            # limit a piece may take minutes.
            self.cached_pieces = cached
            self.bytes_seen = received
            self.last_progress = now
        if now - self.last_progress > NO_PROGRESS_TIMEOUT:
            self.outcome.errback(
                _SwarmFailed(
                    f"no progress in the swarm for {NO_PROGRESS_TIMEOUT:g}s", 0
                )
            )
            return
        for assignment in reply.get("pieces", []):
            piece = int(assignment["piece"])
            if piece in self.in_flight:
                continue
            self.in_flight[piece] = Deferred.fromCoroutine(
                self._fetch_piece(assignment)
            )
        self._kick()

    def _arrived(self, size: int) -> None:
        self.bytes_arrived += size

    async def _fetch_piece(self, assignment: dict[str, Any]) -> None:
        piece = int(assignment["piece"])
        source_id = assignment["peer_id"]
        tier = "supernode" if source_id.startswith("cdnnode:") else "peers"
        started = self.reactor.seconds()
        offset, length = int(assignment["offset"]), int(assignment["length"])
        assert self.task_file is not None
        task_file = self.task_file
        result = 503
        try:
            data = await self.engine.pieces.fetch(
                assignment["address"],
                self.task_id,
                piece,
                length,
                self.buckets,
                self._arrived,
            )
            await self.engine.store.in_thread(
                task_file.write_verified,
                piece,
                data,
                assignment["sha256"],
                data.sha256,
            )
            # Written, and the thread is done with it: a later piece is
            # received into the same buffer.
            self.engine.pieces.give_back(data)
            del data
        except CancelledError:
            raise
        except PieceDigestMismatch as e:
            result = 500
            self._failed(piece, source_id, "digest", str(e))
        except PieceRequestError as e:
            result = 500
            self._failed(
                piece, source_id, "stalled" if "no data" in str(e) else "error", str(e)
            )
        except OSError as e:
            self.in_flight.pop(piece, None)
            if not self.outcome.called:
                self.outcome.errback(
                    DownloadError("io", f"cannot write {task_file.path}: {e}")
                )
            return
        else:
            task_file.held.add(piece)
            self.report.finished.append(piece)
            self.last_progress = self.reactor.seconds()
            self.failures_in_a_row = 0
            self._notify()
            self.bytes_by_tier[tier] += length
            self.pieces_by_tier[tier] += 1
            self.engine.metrics.download_bytes[tier].inc(length)
            if self.request.progress is not None:
                self.request.progress(sum(self.bytes_by_tier.values()), self.length)
        finally:
            self.in_flight.pop(piece, None)
        self.engine.log_piece(
            {
                "taskID": self.task_id,
                "superNode": self.supernode_address,
                "dstCid": source_id,
                "dstAddr": assignment["address"],
                "range": f"{offset}-{offset + length - 1}",
                "result": result,
                "status": 701,
                "pieceSize": length,
                "pieceNum": piece,
                "cost": round(self.reactor.seconds() - started, 3),
            }
        )
        self._kick()

    def _failed(self, piece: int, source_id: str, reason: str, detail: str) -> None:
        self._log.warn(
            "piece {piece} of {task_id} from {source} failed ({reason}): {detail}",
            piece=piece,
            task_id=self.task_id,
            source=source_id,
            reason=reason,
            detail=detail,
        )
        self.failures_in_a_row += 1
        self.engine.metrics.piece_failures.labels(reason=reason).inc()
        if self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW and not self.outcome.called:
            self.outcome.errback(
                _SwarmFailed(
                    f"{self.failures_in_a_row} piece fetches failed in a row", 0
                )
            )
        self.report.failed.append(
            {"piece": piece, "peer_id": source_id, "reason": reason}
        )

    def _stop_pieces(self) -> None:
        for d in list(self.in_flight.values()):
            d.cancel()
        self.in_flight.clear()
        for call in (self.poll, self.report_call):
            if call is not None:
                call.cancel()
        self.poll = self.report_call = None

    # Back to source -------------------------------------------------------

    async def _from_source(self, reason: str) -> None:
        """
        Fetch the whole file straight from the source into the task file.
        """
        if self.engine.source_http is None:
            raise DownloadError("swarm", f"{reason}, and no source client configured")
        headers = Headers({k: list(v) for k, v in self.request.headers.items()})
        try:
            response: IResponse = await self.engine.source_http.get(
                self.request.url, headers=headers, unbuffered=True, timeout=30
            )
        except CancelledError:
            raise
        except Exception as e:
            raise DownloadError("source", f"cannot reach the source: {e}") from e
        if response.code != 200:
            raise DownloadError(
                "source", f"source answered HTTP {response.code}", response.code
            )
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        self.engine.store.remove(self.task_id)
        piece_size = piece_size_for(length)
        task_file = self.engine.store.open(self.task_id, piece_size, length, fresh=True)
        self.task_file = task_file
        self.from_source = True
        self.source_offset = 0
        self.length = length
        self._notify()
        receiver = _SourceReceiver(
            self.engine.store, task_file, self.reactor, self.buckets, self._written
        )
        response.deliverBody(receiver)
        received = await receiver.done
        if length is not None and received != length:
            raise DownloadError("source", f"source sent {received} of {length} bytes")
        self.length = received
        task_file.length = received
        task_file.held.update(range((received + piece_size - 1) // piece_size))
        self.file_sha256 = receiver.sha256.hexdigest()
        self.bytes_by_tier["source"] += received
        self.pieces_by_tier["source"] += len(task_file.held)

    def _written(self, offset: int) -> None:
        # Counted block by block as written, so that a source download
        # that fails half-way still shows what it fetched.
        self.engine.metrics.download_bytes["source"].inc(offset - self.source_offset)
        self.source_offset = offset
        self._notify()

    # Following the download (to stream it while it runs) ------------------

    def changed(self) -> "Deferred[None]":
        """
        Fires at the next progress: a piece verified, source bytes written,
        the length learnt, or the end (success or not).
        """
        if self.ended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._watchers.append(d)
        return d

    def _notify(self) -> None:
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.called:
                watcher.callback(None)

    def contiguous(self) -> int:
        """
        How many bytes from the start of the file are on disk, each piece
        verified against the supernode's digest (or, back to source, as the
        source sent them; the whole is checked against the digest at the
        end).
        """
        if self.task_file is None or self.length is None:
            return 0
        if self.complete:
            return self.length
        if self.from_source:
            return self.source_offset
        while self._prefix_pieces in self.task_file.held:
            self._prefix_pieces += 1
        return min(self._prefix_pieces * self.piece_size, self.length)

    async def _verify(self) -> str:
        """
        The whole file's sha256, checked against the expected digest.

        The file is hashed again only when nobody gave its sha256: each piece
        was checked against the supernode's record as it arrived, and the
        supernode's whole-file sha256 is of the same bytes (or, back to
        source, the receiver hashed what it wrote).
        """
        assert self.task_file is not None and self.length is not None
        expected = self.request.digest.removeprefix("sha256:")
        sha256 = self.file_sha256
        if not sha256:
            sha256 = await self.engine.store.in_thread(
                self.task_file.hash_range, 0, self.length
            )
        if expected and sha256 != expected:
            self.engine.store.remove(self.task_id)
            raise DownloadError(
                "digest", f"content has sha256:{sha256}, expected {self.request.digest}"
            )
        return sha256


class _SwarmFailed(Exception):
    """
    The swarm cannot deliver: C{kind} is C{"digest"} when the supernode found
    the content does not match the task's digest, C{"source"} for a source
    failure (C{status} its HTTP status), C{"swarm"} otherwise.
    """

    def __init__(self, message: str, status: int, kind: str = "swarm") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


class _SourceReceiver(Protocol):
    """
    Streams a source body into a task file: bytes are gathered into blocks
    of L{BLOCK} and written (and hashed) on the store's thread.  The
    connection is paused while writes are behind or the rate limits say so,
    and dropped when no byte arrives for L{STALL_TIMEOUT}.
    """

    BLOCK = 1 << 20
    STALL_TIMEOUT = 60.0

    def __init__(
        self,
        store: PieceStore,
        task_file: TaskFile,
        reactor: Any,
        buckets: list[TokenBucket],
        on_written: Callable[[int], None],
    ) -> None:
        self._store = store
        self._on_written = on_written
        self._file = task_file
        self._reactor = reactor
        self._buckets = buckets
        self._block = bytearray()
        self._offset = 0
        self._pending = 0
        self._write_paused = False
        self._rate_pause: IDelayedCall | None = None
        self._chain: Deferred[Any] = succeed(None)
        self._error: DownloadError | None = None
        self._watchdog: IDelayedCall | None = None
        self.sha256 = hashlib.sha256()
        self.done: Deferred[int] = Deferred()

    def connectionMade(self) -> None:
        self._watchdog = self._reactor.callLater(self.STALL_TIMEOUT, self._stalled)

    def _stalled(self) -> None:
        self._watchdog = None
        if self._write_paused or self._rate_pause is not None:
            # Our own pause, not the source's silence.
            self._watchdog = self._reactor.callLater(self.STALL_TIMEOUT, self._stalled)
            return
        self._error = DownloadError(
            "source", f"no data from the source for {self.STALL_TIMEOUT:g}s"
        )
        self.transport.stopProducing()  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self._watchdog is not None:
            self._watchdog.reset(self.STALL_TIMEOUT)
        self._block += data
        if len(self._block) >= self.BLOCK:
            self._flush()
        delay = delay_for(self._buckets, len(data))
        if delay > 0 and self._rate_pause is None:
            if not self._write_paused:
                self.transport.pauseProducing()  # type: ignore[union-attr]
            self._rate_pause = self._reactor.callLater(delay, self._rate_resume)

    def _rate_resume(self) -> None:
        self._rate_pause = None
        if not self._write_paused:
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _flush(self) -> None:
        block, self._block = self._block, bytearray()
        offset = self._offset
        self._offset += len(block)
        self._pending += 1
        if self._pending > 2 and not self._write_paused:
            self._write_paused = True
            if self._rate_pause is None:
                self.transport.pauseProducing()  # type: ignore[union-attr]

        def write(_: object) -> Deferred[None]:
            if self._error is not None:
                return succeed(None)
            return self._store.in_thread(self._write, offset, block)

        def written(_: object) -> None:
            self._pending -= 1
            if self._error is None:
                self._on_written(offset + len(block))
            if self._write_paused and self._pending <= 1:
                self._write_paused = False
                if self._rate_pause is None:
                    self.transport.resumeProducing()  # type: ignore[union-attr]

        def failed(failure: Failure) -> None:
            self._pending -= 1
            if self._error is None:
                self._error = DownloadError(
                    "io", f"cannot write {self._file.path}: {failure.getErrorMessage()}"
                )
                self.transport.stopProducing()  # type: ignore[union-attr]

        self._chain.addCallback(write).addCallbacks(written, failed)

    def _write(self, offset: int, block: bytearray) -> None:
        self.sha256.update(block)
        self._file.write_at(offset, block)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in (self._watchdog, self._rate_pause):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._rate_pause = None
        if self._block and self._error is None:
            self._flush()
        ok = reason.check(ResponseDone, PotentialDataLoss)

        def finished(_: object) -> None:
            if self._error is not None:
                self.done.errback(self._error)
            elif not ok:
                self.done.errback(
                    DownloadError(
                        "source",
                        f"source connection failed: {reason.getErrorMessage()}",
                    )
                )
            else:
                self.done.callback(self._offset)

        self._chain.addBoth(finished)


def place(task_file: TaskFile, output: Path) -> None:
    """
    Make the task file appear at C{output}, atomically: linked (or copied
    when linking is not possible) to a hidden name beside it, then renamed.
    Runs on a thread.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.parent / f".{output.name}.dfget-{os.getpid()}.tmp"
    temporary.unlink(missing_ok=True)
    try:
        try:
            os.link(task_file.path, temporary)
        except OSError:
            _copy(task_file, temporary)
        os.replace(temporary, output)
    finally:
        temporary.unlink(missing_ok=True)


def _copy(task_file: TaskFile, target: Path) -> None:
    assert task_file.length is not None
    with open(target, "wb") as out:
        offset = 0
        while offset < task_file.length:
            data = task_file.read(offset, min(4 << 20, task_file.length - offset))
            if not data:
                raise OSError(f"{task_file.path} is shorter than expected")
            out.write(data)
            offset += len(data)
