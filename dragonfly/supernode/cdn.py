"""
The supernode's CDN: fetch a task from its source once, cut it into pieces,
hash and cache each piece, and make each piece available the moment it is on
disk, long before the whole file has arrived.

Design
======
  - No length probe: the one GET that fetches the body also tells the length
    (Content-Length, or Content-Range on a resumed fetch).  When the source
    sends neither, pieces are cut as bytes come and the length is known at
    the end.
  - The body streams under backpressure: at most L{MAX_PENDING_WRITES}
    pieces wait for the disk thread, and the source connection is paused
    beyond that.  Each byte is copied once, into its piece's buffer; hashing
    (per piece and, in order, for the whole file) and writing run on a
    thread.
  - A dropped connection is resumed with C{Range} (guarded by C{If-Range}
    when the source gave a validator) from the last complete piece, a few
    times.  A cache left by an earlier run is reused: complete and
    content-addressed (the task has a digest and the file matches it) it is
    trusted as it is; otherwise it is revalidated with a conditional GET, or
    resumed when it was partial.
  - Everything about a cached task lives in a small JSON file beside its
    data, rewritten on a thread every few pieces and at the end.
"""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter
from twisted.internet.defer import Deferred, DeferredLock, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dragonfly.store import PieceStore, TaskFile
from dragonfly.supernode.state import TaskInfo, TaskStatus
from dragonfly.tasks import piece_size_for

MAX_PENDING_WRITES = 3
MAX_ATTEMPTS = 4
SAVE_EVERY_PIECES = 16
# Hashed and written in blocks of this size (see _hash_and_write).
_BLOCK = 256 * 1024


class SourceError(Exception):
    """
    The source could not provide the file; C{status} is its HTTP status (0
    when it never answered).
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ContentMismatch(SourceError):
    """
    The source's content does not have the task's digest.
    """


@dataclass
class CacheMeta:
    """
    What is known of a cached task, saved next to its data.
    """

    task_id: str
    url: str
    piece_size: int
    length: int | None
    etag: str = ""
    last_modified: str = ""
    pieces: dict[int, str] = field(default_factory=dict)
    complete: bool = False
    file_sha256: str = ""
    digest: str = ""

    def to_json(self) -> bytes:
        data = asdict(self)
        data["pieces"] = {str(k): v for k, v in self.pieces.items()}
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "CacheMeta":
        data = json.loads(raw)
        data["pieces"] = {int(k): v for k, v in data["pieces"].items()}
        return cls(**data)


def meta_path(store: PieceStore, task_id: str) -> Path:
    return store.path_for(task_id).with_suffix(".json")


def _read_meta(path: Path) -> CacheMeta | None:
    try:
        return CacheMeta.from_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        # A damaged meta file only costs a refetch.
        return None


def _write_meta(path: Path, meta: bytes) -> None:
    temporary = path.with_suffix(".json.tmp")
    temporary.write_bytes(meta)
    os.replace(temporary, path)


def _header(headers: Headers, name: str) -> str:
    values = headers.getRawHeaders(name)
    return values[0] if values else ""


class _BodyReceiver(Protocol):
    def __init__(self, fetch: "CdnFetch") -> None:
        self._fetch = fetch

    def connectionMade(self) -> None:
        self._fetch._transport = self.transport

    def dataReceived(self, data: bytes) -> None:
        self._fetch._on_data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._fetch._on_body_end(reason)


class CdnFetch:
    """
    One task's fetch from its source into the cache.

    C{run} drives it to the end; L{headers_known} tells registrations as soon
    as the length (or its absence) and piece size are settled.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        http: Any,
        store: PieceStore,
        task: TaskInfo,
        headers: dict[str, list[str]],
        on_progress: Callable[[], None],
        *,
        piece_size: int | None = None,
        response_timeout: float = 30.0,
        stall_timeout: float = 60.0,
        source_bytes: Counter | None = None,
    ) -> None:
        """
        @param source_bytes: counts the bytes received from the source.
        """
        self._reactor = reactor
        self._http = http
        self._store = store
        self.task = task
        self._headers = {k: list(v) for k, v in headers.items()}
        self._on_progress = on_progress
        self._fixed_piece_size = piece_size
        self._response_timeout = response_timeout
        self._stall_timeout = stall_timeout
        self._header_waiters: list[Deferred[None]] = []
        self._headers_settled = False
        self._meta = CacheMeta(
            task.task_id, task.url, task.piece_size, None, digest=task.digest
        )
        self._file: TaskFile | None = None
        self._file_hash = hashlib.sha256()
        self._next_piece = 0
        self._buffer = bytearray()
        self._filled = 0
        self._pending = 0
        self._chain: Deferred[Any] = succeed(None)
        self._body_done: Deferred[None] | None = None
        self._transport: Any = None
        self._paused = False
        self._watchdog: IDelayedCall | None = None
        self._running: Deferred[None] | None = None
        self.bytes_from_source = 0
        self._source_bytes = source_bytes
        self._write_error: SourceError | None = None
        self._stall_stopped = False
        self._stopped = False
        # Saves of the meta file run one at a time, in order: two at once
        # would race on its temporary file, and an older snapshot could
        # land after a newer one.
        self._meta_lock = DeferredLock()

    def headers_known(self) -> "Deferred[None]":
        """
        Fires once the length and piece size are settled (or the fetch failed).
        """
        if self._headers_settled:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._header_waiters.append(d)
        return d

    def _settle_headers(self) -> None:
        self._headers_settled = True
        waiters, self._header_waiters = self._header_waiters, []
        for d in waiters:
            d.callback(None)

    def start(self) -> "Deferred[None]":
        """
        Run the fetch; the result fires when it ends (the task's status says
        how).  Cancelling it stops the fetch.
        """
        self._running = Deferred.fromCoroutine(self._run())
        return self._running

    async def _run(self) -> None:
        task = self.task
        try:
            await self._fetch()
        except Exception as e:
            status = e.status if isinstance(e, SourceError) else 0
            message = str(e) or type(e).__name__
            task.status = TaskStatus.FAILED
            task.error = message
            task.source_status = status
            task.error_kind = "digest" if isinstance(e, ContentMismatch) else "source"
            self._log.warn(
                "source fetch of {task_id} from {url} failed: {error}",
                task_id=task.task_id,
                url=task.url,
                error=message,
            )
            if self._file is not None and not self._stopped:
                self._store.remove(task.task_id)
                await self._store.in_thread(
                    meta_path(self._store, task.task_id).unlink, True
                )
        finally:
            self._stop_watchdog()
            self._settle_headers()
            self._on_progress()

    async def _fetch(self) -> None:
        task = self.task
        path = meta_path(self._store, task.task_id)
        cached = await self._store.in_thread(_read_meta, path)
        reusable = (
            cached is not None
            and cached.digest == task.digest
            # A digest names the content, whatever URL fetched it.
            and (cached.url == task.url or bool(task.digest))
        )
        if reusable and cached is not None and await self._reuse(cached):
            return
        offset = self._next_piece * task.piece_size
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                response = await self._request(offset)
                offset = await self._accept(response, offset)
                await self._stream(response)
                break
            except SourceError:
                raise
            except Exception as e:
                if self._stopped:
                    raise
                if self._write_error is not None:
                    raise self._write_error from e
                if attempt == MAX_ATTEMPTS:
                    raise SourceError(f"source connection failed: {e}") from e
                await self._chain
                # Resume after the last complete piece; the partial one is
                # fetched again.
                self._filled = 0
                offset = self._next_piece * task.piece_size
                self._log.info(
                    "source connection for {task_id} failed at {offset} bytes "
                    "({error}); retry {attempt}",
                    task_id=task.task_id,
                    offset=offset,
                    error=e,
                    attempt=attempt,
                )
                await deferLater(self._reactor, 0.5 * attempt)
        await self._finish()

    async def _reuse(self, cached: CacheMeta) -> bool:
        """
        Take over what an earlier run cached; C{True} when nothing is left
        to fetch.
        """
        task = self.task
        data_path = self._store.path_for(task.task_id)
        if not data_path.exists():
            return False
        content_addressed = bool(
            task.digest
        ) and cached.file_sha256 == task.digest.removeprefix("sha256:")
        if cached.complete and not content_addressed:
            if not (cached.etag or cached.last_modified):
                return False
            response = await self._request(0, revalidate=cached)
            if response.code != 304:
                # The source changed (or ignores validators): this response
                # is the new content, so use it instead of asking again.
                self._meta.etag = _header(response.headers, "ETag")
                self._meta.last_modified = _header(response.headers, "Last-Modified")
                await self._accept(response, 0)
                await self._stream(response)
                await self._finish()
                return True
        await self._adopt(cached)
        if cached.complete:
            self._log.info("reusing cached {task_id}", task_id=task.task_id)
            task.file_sha256 = cached.file_sha256
            task.status = TaskStatus.DONE
            self._settle_headers()
            return True
        # Partial: keep the complete prefix, resume after it.
        prefix = 0
        while prefix in cached.pieces:
            prefix += 1
        if prefix == 0 or not (cached.etag or cached.last_modified):
            # Nothing usable: start afresh, learning the length again.
            self._forget_pieces()
            task.length = None
            if self._file is not None:
                self._file.length = None
            return False
        assert self._file is not None
        self._file_hash = await self._store.in_thread(
            _hash_prefix, self._file, prefix * task.piece_size
        )
        for piece in [p for p in task.pieces if p >= prefix]:
            del task.pieces[piece]
            self._file.held.discard(piece)
        self._next_piece = prefix
        return False

    async def _adopt(self, cached: CacheMeta) -> None:
        """
        Take the cached pieces whose bytes on disk still have their recorded
        sha256; a damaged piece is dropped (and the cache no longer counts
        as complete), so it is fetched again rather than ever served.
        """
        task = self.task
        task.piece_size = cached.piece_size
        task.length = cached.length
        self._file = self._store.open(task.task_id, task.piece_size, task.length)
        damaged = await self._store.in_thread(damaged_pieces, self._file, cached.pieces)
        if damaged:
            self._log.warn(
                "cache of {task_id} is damaged in pieces {pieces}; fetching again",
                task_id=task.task_id,
                pieces=damaged,
            )
            for piece in damaged:
                del cached.pieces[piece]
            cached.complete = False
        self._meta = cached
        task.pieces.update(cached.pieces)
        self._file.held.update(cached.pieces)
        self._on_progress()

    def _forget_pieces(self) -> None:
        self.task.pieces.clear()
        if self._file is not None:
            self._file.held.clear()

    async def _request(
        self, offset: int, revalidate: CacheMeta | None = None
    ) -> IResponse:
        headers = Headers({k: v for k, v in self._headers.items()})
        headers.removeHeader("Range")
        if revalidate is not None:
            if revalidate.etag:
                headers.setRawHeaders("If-None-Match", [revalidate.etag])
            if revalidate.last_modified:
                headers.setRawHeaders("If-Modified-Since", [revalidate.last_modified])
        elif offset:
            headers.setRawHeaders("Range", [f"bytes={offset}-"])
            validator = self._meta.etag or self._meta.last_modified
            if validator:
                headers.setRawHeaders("If-Range", [validator])
        response: IResponse = await self._http.get(
            self.task.url,
            headers=headers,
            unbuffered=True,
            timeout=self._response_timeout,
        )
        return response

    async def _accept(self, response: IResponse, offset: int) -> int:
        """
        Check the status and learn the length; return the offset the body
        starts at.
        """
        task = self.task
        if response.code == 206 and offset:
            total = _header(response.headers, "Content-Range").rpartition("/")[2]
            if total.isdigit():
                self._set_length(int(total))
            self._start_watchdog()
            return offset
        if response.code != 200:
            await _discard(response)
            raise SourceError(
                f"source answered HTTP {response.code} for {task.url}", response.code
            )
        if offset:
            # The source ignored our Range: start over, checking the pieces
            # already given out against what comes now.
            self._log.info("source ignored Range for {task_id}", task_id=task.task_id)
            self._next_piece = 0
            self._file_hash = hashlib.sha256()
        self._meta.etag = _header(response.headers, "ETag")
        self._meta.last_modified = _header(response.headers, "Last-Modified")
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        self._set_length(length)
        self._start_watchdog()
        return 0

    def _set_length(self, length: int | None) -> None:
        task = self.task
        if task.length is not None and length is not None and length != task.length:
            raise SourceError(
                f"source length changed from {task.length} to {length} bytes"
            )
        if task.length is None:
            task.length = length
            if not task.pieces:
                task.piece_size = self._fixed_piece_size or piece_size_for(length)
        self._meta.length = task.length
        self._meta.piece_size = task.piece_size
        if self._file is None:
            self._file = self._store.open(task.task_id, task.piece_size, task.length)
        self._file.length = task.length
        self._buffer = bytearray(task.piece_size)
        self._filled = 0
        self._settle_headers()

    async def _stream(self, response: IResponse) -> None:
        # Keep our own reference: an empty body ends inside deliverBody,
        # which clears self._body_done before we get to await it.
        done: Deferred[None] = Deferred()
        self._body_done = done
        self._paused = False
        self._stall_stopped = False
        response.deliverBody(_BodyReceiver(self))
        await done

    def _on_data(self, data: bytes) -> None:
        self._watchdog_reset()
        self.bytes_from_source += len(data)
        if self._source_bytes is not None:
            self._source_bytes.inc(len(data))
        view = memoryview(data)
        size = self.task.piece_size
        while view:
            take = min(size - self._filled, len(view))
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == size:
                self._emit_piece()
        if self._pending >= MAX_PENDING_WRITES and not self._paused:
            self._paused = True
            self._transport.pauseProducing()

    def _emit_piece(self) -> None:
        piece = self._next_piece
        data = self._buffer
        if self._filled < len(data):
            data = data[: self._filled]
        self._next_piece += 1
        self._buffer = bytearray(self.task.piece_size)
        self._filled = 0
        self._pending += 1
        assert self._file is not None
        task_file, file_hash = self._file, self._file_hash
        known = self.task.pieces.get(piece)

        def write(_: object) -> Deferred[str | None]:
            if self._write_error is not None:
                return succeed(None)
            return self._store.in_thread(
                _hash_and_write, task_file, piece, data, file_hash
            )

        def written(sha256: str | None) -> None:
            self._pending -= 1
            if sha256 is None:
                return
            if known is not None and known != sha256:
                raise SourceError("source content changed during the download")
            self.task.pieces[piece] = sha256
            task_file.held.add(piece)
            self._meta.pieces[piece] = sha256
            self._on_progress()
            if self._paused and self._pending < MAX_PENDING_WRITES:
                self._paused = False
                self._transport.resumeProducing()
            if piece % SAVE_EVERY_PIECES == SAVE_EVERY_PIECES - 1:
                self._save_meta().addErrback(
                    lambda f: self._log.failure("saving cache meta", f)
                )

        self._chain.addCallback(write).addCallback(written).addErrback(
            self._write_failed
        )

    def _write_failed(self, failure: Failure) -> None:
        """
        A piece could not be written (disk full, ...) or no longer matches:
        stop the body; the fetch fails with this error, never retried.
        """
        self._pending = 0
        if self._write_error is None:
            error = failure.value
            self._write_error = (
                error
                if isinstance(error, SourceError)
                else SourceError(f"cannot write the cache: {failure.getErrorMessage()}")
            )
        if self._transport is not None:
            self._transport.stopProducing()

    def _on_body_end(self, reason: Failure) -> None:
        done, self._body_done = self._body_done, None
        self._stop_watchdog()
        if done is None:
            return
        if self._stall_stopped:
            done.errback(
                _Stalled(f"no data from the source for {self._stall_timeout:g}s")
            )
        elif reason.check(ResponseDone) or (
            reason.check(PotentialDataLoss) and self.task.length is None
        ):
            done.callback(None)
        else:
            done.errback(reason)

    async def _finish(self) -> None:
        task = self.task
        assert self._file is not None
        if task.length is None:
            # The body ended: settle the length before the last piece is
            # announced, so that it is handed out with its real size.
            task.length = self._next_piece * task.piece_size + self._filled
            self._file.length = task.length
        if self._filled:
            self._emit_piece()
        await self._chain
        if self._write_error is not None:
            raise self._write_error
        received = sum(self._file.bounds(p)[1] for p in task.pieces)
        if received != task.length:
            raise SourceError(
                f"source sent {received} of {task.length} bytes announced"
            )
        # New content replacing a longer cached file must not keep its tail.
        await self._store.in_thread(self._file.truncate, task.length)
        file_sha256 = self._file_hash.hexdigest()
        if task.digest and file_sha256 != task.digest.removeprefix("sha256:"):
            raise ContentMismatch(
                f"source content has sha256:{file_sha256}, expected {task.digest}"
            )
        task.file_sha256 = file_sha256
        self._meta.length = task.length
        self._meta.file_sha256 = file_sha256
        self._meta.complete = True
        await self._save_meta()
        task.status = TaskStatus.DONE
        self._log.info(
            "cached {task_id}: {length} bytes in {pieces} pieces, {source_bytes} "
            "bytes from the source",
            task_id=task.task_id,
            length=task.length,
            pieces=len(task.pieces),
            source_bytes=self.bytes_from_source,
        )

    def _save_meta(self) -> "Deferred[None]":
        path = meta_path(self._store, self.task.task_id)
        saved: Deferred[None] = self._meta_lock.run(
            self._store.in_thread, _write_meta, path, self._meta.to_json()
        )
        return saved

    def _start_watchdog(self) -> None:
        self._stop_watchdog()
        self._watchdog = self._reactor.callLater(self._stall_timeout, self._stalled)

    def _watchdog_reset(self) -> None:
        if self._watchdog is not None and self._watchdog.active() and not self._paused:
            self._watchdog.reset(self._stall_timeout)

    def _stop_watchdog(self) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.cancel()
        self._watchdog = None

    def _stalled(self) -> None:
        self._watchdog = None
        if self._paused:
            self._start_watchdog()
            return
        if self._transport is not None:
            # Dropping a body of unknown length looks like its end: remember
            # that it was a stall.
            self._stall_stopped = True
            self._transport.stopProducing()

    def stop(self) -> None:
        """
        Abandon the fetch (at shutdown), keeping what is cached for the
        next run to resume.
        """
        self._stopped = True
        if self._transport is not None:
            self._transport.stopProducing()
        if self._running is not None:
            self._running.cancel()


class _Stalled(Exception):
    """
    The source stopped sending: retried like a dropped connection.
    """


def _hash_and_write(
    task_file: TaskFile, piece: int, data: bytearray, file_hash: Any
) -> str:
    """
    The piece's sha256, with the piece added to the whole file's sha256 and
    written at its offset.  Runs on a thread.

    Done block by block: each block is hashed twice and copied to the page
    cache while it is in the processor's cache, so a piece (4 to 15 MiB,
    bigger than that cache) is read from memory once rather than three times.
    """
    piece_hash = hashlib.sha256()
    view = memoryview(data)
    offset = piece * task_file.piece_size
    for start in range(0, len(view), _BLOCK):
        block = view[start : start + _BLOCK]
        piece_hash.update(block)
        file_hash.update(block)
        task_file.write_at(offset + start, block)
    return piece_hash.hexdigest()


def damaged_pieces(task_file: TaskFile, pieces: dict[int, str]) -> list[int]:
    """
    The pieces whose bytes on disk do not have their recorded sha256 (or are
    missing).  Runs on a thread.
    """
    damaged = []
    for piece, sha256 in sorted(pieces.items()):
        try:
            offset, size = task_file.bounds(piece)
            actual = task_file.hash_range(offset, offset + size)
        except (OSError, ValueError):
            damaged.append(piece)
            continue
        if actual != sha256:
            damaged.append(piece)
    return damaged


def _hash_prefix(task_file: TaskFile, end: int) -> Any:
    digest = hashlib.sha256()
    offset = 0
    while offset < end:
        data = task_file.read(offset, min(1 << 20, end - offset))
        if not data:
            break
        digest.update(data)
        offset += len(data)
    return digest


async def _discard(response: IResponse) -> None:
    """
    Drop an unwanted response body without reading it all.
    """
    d: Deferred[None] = Deferred()

    class _Drop(Protocol):
        def connectionMade(self) -> None:
            self.transport.stopProducing()  # type: ignore[union-attr]

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            if not d.called:
                d.callback(None)

    response.deliverBody(_Drop())
    await d
