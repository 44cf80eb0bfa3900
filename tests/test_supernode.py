"""
The supernode core (L{dragonfly.supernode.service.Supernode} and its CDN,
L{dragonfly.supernode.cdn.CdnFetch}) against a real HTTP source.

The source is a C{twisted.web} site listening on 127.0.0.1 in this process,
serving documents whose behaviour each test chooses (validators, Range,
conditional requests, a dropped connection, an error status, a chunked or a
short body, a body held back at a point the test releases), and recording
every request it gets and every body byte it sends.  The supernode is built
directly with the real reactor, an in-memory swarm state and the project's
treq client.
"""

import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from dragonfly.http import http_client
from dragonfly.supernode import cdn
from dragonfly.supernode.cdn import CacheMeta, SourceError, meta_path
from dragonfly.supernode.scheduler import Limits
from dragonfly.supernode.service import (
    FailedPiece,
    Registration,
    Settings,
    Supernode,
    UnknownTask,
)
from dragonfly.supernode.state import InMemorySwarmState, PeerInfo, TaskStatus
from dragonfly.tasks import MIB, InvalidRequest, piece_size_for, task_id_for

KIB = 1 << 10
PIECE = 256 * KIB
TIMEOUT = 10.0
LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"


# The source ------------------------------------------------------------------


@dataclass
class Seen:
    """
    One request the source got, and what it sent back.
    """

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    bytes_sent: int = 0


@dataclass
class Doc:
    """
    A document of the source and how it misbehaves.

    @ivar gate_at: hold the body at this offset (0: before even the
        headers) until C{gate} fires.
    @ivar drop_after: close the connection after this many body bytes, once.
    @ivar short_by: announce the full length, send this many bytes fewer on
        every request and close the connection.
    @ivar announce: the length to announce instead of the body's (a huge
        file whose body is never sent).
    """

    body: bytes
    etag: str | None = '"v1"'
    last_modified: str | None = LAST_MODIFIED
    status: int = 200
    content_length: bool = True
    honour_range: bool = True
    gate_at: int | None = None
    drop_after: int | None = None
    short_by: int = 0
    announce: int | None = None
    gate: Deferred[None] = field(default_factory=Deferred)
    dropped: bool = False

    def release(self) -> None:
        if not self.gate.called:
            self.gate.callback(None)


class SourceResource(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.docs: dict[str, Doc] = {}
        self.seen: list[Seen] = []

    def render(self, request: Request) -> Any:
        path = request.path.decode()
        seen = Seen(
            request.method.decode(),
            path,
            {
                k.decode().lower(): v[0].decode()
                for k, v in request.requestHeaders.getAllRawHeaders()
            },
        )
        self.seen.append(seen)
        doc = self.docs.get(path)
        if doc is None:
            seen.status = 404
            request.setResponseCode(404)
            return b"no such document"
        d = Deferred.fromCoroutine(self._serve(request, doc, seen))
        d.addErrback(lambda f: print("source failed:", f.getTraceback()))
        return NOT_DONE_YET

    async def _serve(self, request: Request, doc: Doc, seen: Seen) -> None:
        lost: list[object] = []
        request.notifyFinish().addErrback(lost.append)
        body = doc.body
        length = doc.announce or len(body)
        if doc.status != 200:
            seen.status = doc.status
            request.setResponseCode(doc.status)
            message = b"source error"
            request.setHeader("content-length", str(len(message)))
            self._write(request, seen, message)
            request.finish()
            return
        if doc.etag:
            request.setHeader("etag", doc.etag)
        if doc.last_modified:
            request.setHeader("last-modified", doc.last_modified)
        if_none_match = request.getHeader("if-none-match")
        if_modified_since = request.getHeader("if-modified-since")
        if (doc.etag and if_none_match == doc.etag) or (
            if_none_match is None
            and doc.last_modified
            and if_modified_since == doc.last_modified
        ):
            seen.status = 304
            request.setResponseCode(304)
            request.finish()
            return
        start = 0
        range_ = request.getHeader("range")
        if range_ and doc.honour_range:
            if_range = request.getHeader("if-range")
            if if_range is None or if_range in (doc.etag, doc.last_modified):
                start = int(range_.removeprefix("bytes=").partition("-")[0])
        if start:
            seen.status = 206
            request.setResponseCode(206)
            request.setHeader("content-range", f"bytes {start}-{length - 1}/{length}")
        else:
            seen.status = 200
        if doc.content_length:
            request.setHeader("content-length", str(length - start))
        end = length - doc.short_by
        if doc.drop_after is not None and not doc.dropped:
            doc.dropped = True
            end = min(end, start + doc.drop_after)
        position = start
        if doc.gate_at is not None and not doc.gate.called:
            if doc.gate_at > position:
                self._write(request, seen, body[position : min(doc.gate_at, end)])
                position = min(doc.gate_at, end)
            await doc.gate
            if lost:
                return
        self._write(request, seen, body[position:end])
        if lost:
            return
        if end < length:
            request.loseConnection()
        else:
            request.finish()

    def _write(self, request: Request, seen: Seen, data: bytes) -> None:
        for at in range(0, len(data), 64 * KIB):
            chunk = data[at : at + 64 * KIB]
            seen.bytes_sent += len(chunk)
            request.write(chunk)

    def release_all(self) -> None:
        for doc in self.docs.values():
            doc.release()


class TrackingSite(Site):
    def __init__(self, resource: Resource) -> None:
        super().__init__(resource)
        self.protocols: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        self.protocols.append(protocol)
        return protocol

    def log(self, request: Request) -> None:
        pass


@dataclass
class Source:
    resource: SourceResource
    port: int

    def add(self, name: str, body: bytes, **kwargs: Any) -> Doc:
        doc = Doc(body, **kwargs)
        self.resource.docs[f"/{name}"] = doc
        return doc

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def requests(self, name: str) -> list[Seen]:
        return [s for s in self.resource.seen if s.path == f"/{name}"]

    def bytes_sent(self, name: str) -> int:
        return sum(s.bytes_sent for s in self.requests(name))


@pytest_twisted.async_yield_fixture
async def source() -> AsyncIterator[Source]:
    """
    A recording HTTP source on 127.0.0.1.
    """
    resource = SourceResource()
    site = TrackingSite(resource)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield Source(resource, port.getHost().port)
    resource.release_all()
    for protocol in site.protocols:
        transport = getattr(protocol, "transport", None)
        if transport is not None and transport.connected:
            transport.abortConnection()
    await port.stopListening()


# The supernode ---------------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def make_supernode(tmp_path: Path) -> AsyncIterator[Callable[..., Supernode]]:
    """
    Builds supernodes (home C{tmp_path/home} unless told, 256 KiB pieces
    unless told); stops them and closes their HTTP pools afterwards.
    """
    made: list[tuple[Supernode, Any]] = []

    def make(home: Path | None = None, **settings: Any) -> Supernode:
        settings.setdefault("piece_size", PIECE)
        client = http_client(reactor)
        supernode = Supernode(
            reactor,
            home or tmp_path / "home",
            InMemorySwarmState(),
            client,
            Settings(**settings),
        )
        made.append((supernode, client))
        return supernode

    yield make
    for supernode, client in made:
        supernode.stop()
        pool = getattr(getattr(client, "_agent", None), "_pool", None)
        if pool is not None:
            await pool.closeCachedConnections()


def body_of(size: int, seed: int = 0) -> bytes:
    """
    C{size} deterministic pseudo-random bytes (every piece different).
    """
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(b"%d-%d" % (seed, counter)).digest() * 64
        counter += 1
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def piece_digests(body: bytes, piece_size: int = PIECE) -> dict[int, str]:
    return {
        n: sha(body[offset : offset + piece_size])
        for n, offset in enumerate(range(0, len(body), piece_size))
    }


def peer(n: int) -> PeerInfo:
    return PeerInfo(f"peer-{n}", f"127.0.0.1:{9000 + n}")


def registration(url: str, n: int = 1, **kwargs: Any) -> Registration:
    return Registration(url=url, peer=peer(n), **kwargs)


async def bounded(d: Any, timeout: float = TIMEOUT) -> Any:
    """
    Await a Deferred or coroutine for at most C{timeout} seconds.
    """
    if not isinstance(d, Deferred):
        d = Deferred.fromCoroutine(d)
    d.addTimeout(timeout, reactor)
    return await d


async def wait_until(
    predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT
) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def task_of(supernode: Supernode, task_id: str) -> Any:
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    return swarm.task


async def wait_status(supernode: Supernode, task_id: str, status: TaskStatus) -> Any:
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    await wait_until(
        lambda: swarm.task.status is status, f"task {task_id} to be {status}"
    )
    return swarm.task


async def wait_ended(supernode: Supernode, task_id: str) -> None:
    """
    Until the task's fetch is over (its status settled and the fetch
    forgotten, so its bytes are counted).
    """
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    await wait_until(
        lambda: (
            swarm.task.status is not TaskStatus.FETCHING
            and task_id not in supernode._fetches
        ),
        f"the fetch of {task_id} to end",
    )


def cached_bytes(supernode: Supernode, task_id: str) -> bytes:
    return supernode.store.path_for(task_id).read_bytes()


async def schedule(
    supernode: Supernode,
    task_id: str,
    peer_id: str,
    finished: list[int] | None = None,
    failed: list[FailedPiece] | None = None,
    want: int = 0,
    wait: float = 0.0,
) -> dict[str, Any]:
    return await bounded(
        supernode.schedule(task_id, peer_id, finished or [], failed or [], want, wait)
    )


# Registration and the single GET ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_register_learns_length_from_the_single_get(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Registration returns the task id, piece size, length and piece count
    learnt from the one GET that also fetches the body: the source sees
    exactly one request, a plain GET without Range, and sends the body once;
    every piece ends up cached and held with the sha256 of its bytes.
    """
    body = body_of(2 * MIB + 1234)
    source.add("file.bin", body)
    supernode = make_supernode()
    url = source.url("file.bin")
    reply = await bounded(supernode.register(registration(url)))
    task_id = task_id_for(url)
    assert reply["task_id"] == task_id
    assert reply["piece_size"] == PIECE
    assert reply["length"] == len(body)
    assert reply["piece_count"] == 9
    assert reply["supernode"] == {
        "peer_id": f"cdnnode:127.0.0.1~{task_id}",
        "address": "127.0.0.1:8001",
    }
    task = await wait_status(supernode, task_id, TaskStatus.DONE)
    await wait_ended(supernode, task_id)
    requests = source.requests("file.bin")
    assert len(requests) == 1
    assert requests[0].method == "GET"
    assert "range" not in requests[0].headers
    assert source.bytes_sent("file.bin") == len(body)
    assert supernode.bytes_from_source == len(body)
    assert task.pieces == piece_digests(body)
    assert task.file_sha256 == sha(body)
    assert supernode.store.tasks[task_id].held == set(range(9))
    assert cached_bytes(supernode, task_id) == body
    meta = json.loads(meta_path(supernode.store, task_id).read_bytes())
    assert meta["complete"] is True
    assert meta["etag"] == '"v1"'
    assert meta["file_sha256"] == sha(body)


@pytest_twisted.ensureDeferred
async def test_piece_size_follows_piece_size_for_when_not_set(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Without Settings.piece_size the piece size comes from piece_size_for of
    the announced length: 4 MiB for a small file (one piece), and 5 MiB for
    a 300 MiB file, known from its headers before any of its body is needed.
    """
    small = body_of(MIB + 5)
    source.add("small.bin", small)
    huge_length = 300 * MIB
    # Only the first byte of the huge body is ever sent: the gate stays shut.
    source.add("huge.bin", b"x", announce=huge_length, gate_at=1)
    supernode = make_supernode(piece_size=None)

    reply = await bounded(supernode.register(registration(source.url("small.bin"))))
    assert reply["piece_size"] == piece_size_for(len(small)) == 4 * MIB
    assert reply["piece_count"] == 1
    task = await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    assert task.pieces == {0: sha(small)}

    reply = await bounded(supernode.register(registration(source.url("huge.bin"))))
    assert reply["length"] == huge_length
    assert reply["piece_size"] == piece_size_for(huge_length) == 5 * MIB
    assert reply["piece_count"] == 60
    assert reply["status"] == "fetching"
    assert source.bytes_sent("huge.bin") == 1


@pytest_twisted.ensureDeferred
async def test_register_waits_until_the_length_is_known(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A registration does not answer before the source's headers arrived:
    while the source holds its response it is pending, and it answers with
    the length as soon as the source sends.
    """
    body = body_of(600 * KIB)
    doc = source.add("slow.bin", body, gate_at=0)
    supernode = make_supernode()
    pending = Deferred.fromCoroutine(
        supernode.register(registration(source.url("slow.bin")))
    )
    await deferLater(reactor, 0.3, lambda: None)
    assert not pending.called
    assert len(source.requests("slow.bin")) == 1
    doc.release()
    reply = await bounded(pending)
    assert reply["length"] == len(body)
    assert reply["piece_count"] == 3


@pytest_twisted.ensureDeferred
async def test_concurrent_registrations_share_one_fetch(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Six peers registering the same URL at once share one CDN fetch: the
    source gets exactly one request, all get the same task, and all six are
    in its swarm.
    """
    body = body_of(MIB)
    doc = source.add("shared.bin", body, gate_at=0)
    supernode = make_supernode()
    url = source.url("shared.bin")
    pending = [
        Deferred.fromCoroutine(supernode.register(registration(url, n)))
        for n in range(6)
    ]
    await deferLater(reactor, 0.2, lambda: None)
    doc.release()
    replies = await bounded(gatherResults(pending))
    assert {r["task_id"] for r in replies} == {task_id_for(url)}
    assert {r["length"] for r in replies} == {len(body)}
    task_id = replies[0]["task_id"]
    await wait_status(supernode, task_id, TaskStatus.DONE)
    assert len(source.requests("shared.bin")) == 1
    assert source.bytes_sent("shared.bin") == len(body)
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    assert set(swarm.peers) == {f"peer-{n}" for n in range(6)}


@pytest_twisted.ensureDeferred
async def test_registration_of_a_done_task_makes_no_request(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A peer registering a task the supernode already cached gets status
    "done" with the full geometry and causes no new source request.
    """
    body = body_of(MIB)
    source.add("done.bin", body)
    supernode = make_supernode()
    url = source.url("done.bin")
    first = await bounded(supernode.register(registration(url, 1)))
    await wait_status(supernode, first["task_id"], TaskStatus.DONE)
    second = await bounded(supernode.register(registration(url, 2)))
    assert second["status"] == "done"
    assert second["length"] == len(body)
    assert second["piece_count"] == 4
    assert len(source.requests("done.bin")) == 1


# Pieces while the body streams -------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pieces_are_available_before_the_body_has_arrived(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    The first three pieces are cached, held and scheduled (from the
    supernode, with the right offset, length and sha256) while the source is
    still holding back the rest of the body; the task completes once it
    sends the rest.
    """
    body = body_of(8 * PIECE + 77)
    held_back = 3 * PIECE + 100
    doc = source.add("stream.bin", body, gate_at=held_back)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("stream.bin"))))
    task_id = reply["task_id"]
    await wait_until(
        lambda: (
            task_id in supernode.store.tasks
            and supernode.store.tasks[task_id].held == {0, 1, 2}
        ),
        "the first three pieces",
    )
    task = await task_of(supernode, task_id)
    assert task.status is TaskStatus.FETCHING
    assert task.pieces == {n: sha(body[n * PIECE : (n + 1) * PIECE]) for n in range(3)}
    answer = await schedule(supernode, task_id, "peer-1", want=8, wait=1.0)
    assert answer["status"] == "running"
    assert [p["piece"] for p in answer["pieces"]] == [0, 1, 2]
    for p in answer["pieces"]:
        n = p["piece"]
        assert p["offset"] == n * PIECE
        assert p["length"] == PIECE
        assert p["sha256"] == sha(body[n * PIECE : (n + 1) * PIECE])
        assert p["peer_id"] == f"cdnnode:127.0.0.1~{task_id}"
        assert p["address"] == "127.0.0.1:8001"
    assert source.bytes_sent("stream.bin") == held_back
    doc.release()
    task = await wait_status(supernode, task_id, TaskStatus.DONE)
    assert task.pieces == piece_digests(body)
    assert cached_bytes(supernode, task_id) == body


# Dropped connections ---------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_dropped_connection_is_resumed_with_range_and_if_range(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    The source closes the connection 2 pieces and 1000 bytes into the body:
    the CDN asks again from the last complete piece with Range and an
    If-Range carrying the ETag (and the client's Authorization again), gets
    206, and the cached file is the source's file; only the partial piece
    is fetched twice.
    """
    body = body_of(6 * PIECE + 999)
    dropped_at = 2 * PIECE + 1000
    source.add("drop.bin", body, drop_after=dropped_at)
    supernode = make_supernode()
    reply = await bounded(
        supernode.register(
            registration(
                source.url("drop.bin"), headers={"Authorization": ["Bearer s3cret"]}
            )
        )
    )
    task = await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    first, second = source.requests("drop.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={2 * PIECE}-"
    assert second.headers["if-range"] == '"v1"'
    assert second.status == 206
    assert first.headers["authorization"] == "Bearer s3cret"
    assert second.headers["authorization"] == "Bearer s3cret"
    assert source.bytes_sent("drop.bin") == dropped_at + len(body) - 2 * PIECE
    assert sha(cached_bytes(supernode, reply["task_id"])) == sha(body)
    assert task.file_sha256 == sha(body)
    assert task.pieces == piece_digests(body)


@pytest_twisted.ensureDeferred
async def test_resume_uses_last_modified_when_there_is_no_etag(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A source giving only Last-Modified is resumed with If-Range set to that
    date.
    """
    body = body_of(4 * PIECE + 3)
    source.add("lm.bin", body, etag=None, drop_after=PIECE + 5)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("lm.bin"))))
    task = await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    second = source.requests("lm.bin")[1]
    assert second.headers["range"] == f"bytes={PIECE}-"
    assert second.headers["if-range"] == LAST_MODIFIED
    assert task.file_sha256 == sha(body)
    assert cached_bytes(supernode, reply["task_id"]) == body


@pytest_twisted.ensureDeferred
async def test_resume_against_a_source_ignoring_range_starts_over(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    When the source answers the resuming Range request with a full 200, the
    CDN takes the body from the start and still caches the right file.
    """
    body = body_of(5 * PIECE + 17)
    source.add("norange.bin", body, honour_range=False, drop_after=3 * PIECE + 1)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("norange.bin"))))
    task = await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    requests = source.requests("norange.bin")
    assert len(requests) == 2
    assert requests[1].headers["range"] == f"bytes={3 * PIECE}-"
    assert requests[1].status == 200
    assert task.file_sha256 == sha(body)
    assert task.pieces == piece_digests(body)
    assert cached_bytes(supernode, reply["task_id"]) == body


# Failures --------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 500])
@pytest_twisted.ensureDeferred
async def test_error_status_fails_the_task_and_a_later_register_retries(
    source: Source, make_supernode: Callable[..., Supernode], status: int
) -> None:
    """
    A source answering 404 (or 500) makes register raise SourceError with
    that status and leaves the task FAILED with nothing cached; a later
    registration starts a new fetch and succeeds once the source answers 200.
    """
    doc = source.add("flaky.bin", b"", status=status)
    supernode = make_supernode()
    url = source.url("flaky.bin")
    with pytest.raises(SourceError) as caught:
        await bounded(supernode.register(registration(url)))
    assert caught.value.status == status
    assert str(status) in str(caught.value)
    task_id = task_id_for(url)
    task = await task_of(supernode, task_id)
    assert task.status is TaskStatus.FAILED
    assert task.source_status == status
    assert str(status) in task.error
    assert not supernode.store.path_for(task_id).exists()
    await wait_ended(supernode, task_id)

    body = body_of(PIECE + 1)
    doc.body, doc.status = body, 200
    reply = await bounded(supernode.register(registration(url, 2)))
    assert reply["length"] == len(body)
    task = await wait_status(supernode, task_id, TaskStatus.DONE)
    assert task.error == ""
    assert task.file_sha256 == sha(body)
    assert len(source.requests("flaky.bin")) == 2
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    assert "peer-2" in swarm.peers


@pytest_twisted.ensureDeferred
async def test_short_body_fails_the_task(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A source that announces a Content-Length and always closes the
    connection before sending it all fails the task (after its bounded
    resume attempts, each a Range request), and its partial cache is
    removed.
    """
    body = body_of(3 * PIECE + 10)
    source.add("short.bin", body, short_by=1000)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("short.bin"))))
    task_id = reply["task_id"]
    task = await wait_status(supernode, task_id, TaskStatus.FAILED)
    assert task.error
    requests = source.requests("short.bin")
    assert len(requests) == 4
    # 1000 bytes short of the end leaves two complete pieces.
    assert all(r.headers.get("range") == f"bytes={2 * PIECE}-" for r in requests[1:])
    await wait_ended(supernode, task_id)
    await wait_until(
        lambda: not meta_path(supernode.store, task_id).exists(), "meta removal"
    )
    assert not supernode.store.path_for(task_id).exists()
    # The next registration starts a fresh fetch (a plain GET again).
    await bounded(supernode.register(registration(source.url("short.bin"), 2)))
    assert len(source.requests("short.bin")) == 5
    assert "range" not in source.requests("short.bin")[4].headers


@pytest_twisted.ensureDeferred
async def test_source_that_never_answers_times_out_registration(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    When the source does not send its headers within header_timeout,
    register raises SourceError with status 504.
    """
    source.add("hang.bin", b"x" * 1000, gate_at=0)
    supernode = make_supernode(header_timeout=0.5)
    started = reactor.seconds()
    with pytest.raises(SourceError) as caught:
        await bounded(supernode.register(registration(source.url("hang.bin"))))
    assert caught.value.status == 504
    assert reactor.seconds() - started < 5


# Unknown length --------------------------------------------------------------


@pytest.mark.parametrize("size", [5 * PIECE + 321, 4 * PIECE, 0])
@pytest_twisted.ensureDeferred
async def test_unknown_length_completes_with_right_length(
    source: Source, make_supernode: Callable[..., Supernode], size: int
) -> None:
    """
    A chunked body without Content-Length: registration answers with the
    length unknown, and the task completes with the right length, piece
    count, pieces and file.
    """
    body = body_of(size)
    source.add("chunked.bin", body, content_length=False)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("chunked.bin"))))
    task_id = reply["task_id"]
    task = await wait_status(supernode, task_id, TaskStatus.DONE)
    assert len(source.requests("chunked.bin")) == 1
    assert "content-length" not in source.requests("chunked.bin")[0].headers
    assert task.length == size
    assert task.piece_count == (size + PIECE - 1) // PIECE
    assert task.pieces == piece_digests(body)
    assert task.file_sha256 == sha(body)
    assert cached_bytes(supernode, task_id) == body
    assert supernode.store.tasks[task_id].length == size


@pytest_twisted.ensureDeferred
async def test_unknown_length_registration_reports_no_length(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Registration of a chunked source answers before the end with length and
    piece count None.
    """
    body = body_of(3 * PIECE)
    doc = source.add("chunked.bin", body, content_length=False, gate_at=PIECE + 1)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("chunked.bin"))))
    assert reply["length"] is None
    assert reply["piece_count"] is None
    assert reply["piece_size"] == PIECE
    doc.release()
    task = await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    assert task.length == len(body)


@pytest_twisted.ensureDeferred
async def test_unknown_length_last_piece_is_scheduled_with_its_real_length(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A peer long-polling while a chunked body ends is handed the last piece
    with the length of its bytes, not a whole piece size.
    """
    size = 2 * PIECE + PIECE // 2
    body = body_of(size)
    doc = source.add("tail.bin", body, content_length=False, gate_at=2 * PIECE + 10)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("tail.bin"))))
    task_id = reply["task_id"]
    first = await schedule(supernode, task_id, "peer-1", want=8, wait=5.0)
    while len(first["pieces"]) < 2:
        more = await schedule(supernode, task_id, "peer-1", want=8, wait=5.0)
        first["pieces"] += more["pieces"]
    assert [p["piece"] for p in first["pieces"]] == [0, 1]
    poll = Deferred.fromCoroutine(
        supernode.schedule(task_id, "peer-1", [0, 1], [], 8, 5.0)
    )
    await deferLater(reactor, 0.1, lambda: None)
    doc.release()
    answer = await bounded(poll)
    assert [p["piece"] for p in answer["pieces"]] == [2]
    assert answer["pieces"][0]["length"] == PIECE // 2


@pytest_twisted.ensureDeferred
async def test_unknown_length_scheduled_piece_can_be_served(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A piece the scheduler hands out from the supernode while a chunked body
    is still arriving can be opened for serving from the supernode's store.
    """
    body = body_of(4 * PIECE)
    source.add("serve.bin", body, content_length=False, gate_at=2 * PIECE + 10)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("serve.bin"))))
    task_id = reply["task_id"]
    answer = await schedule(supernode, task_id, "peer-1", want=1, wait=5.0)
    assert answer["pieces"][0]["piece"] == 0
    reader = supernode.store.open_piece(task_id, 0)
    try:
        assert reader.length == PIECE
        assert reader.read(0, PIECE) == body[:PIECE]
    finally:
        reader.close()


# Digests and the cache of earlier runs ----------------------------------------


@pytest_twisted.ensureDeferred
async def test_digest_mismatch_fails_the_task(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A task registered with a digest whose source content hashes differently
    ends FAILED with a message naming both digests, and nothing is cached.
    """
    body = body_of(3 * PIECE + 5)
    wrong = "sha256:" + sha(b"something else")
    source.add("digest.bin", body)
    supernode = make_supernode()
    reply = await bounded(
        supernode.register(registration(source.url("digest.bin"), digest=wrong))
    )
    task_id = reply["task_id"]
    assert task_id == task_id_for(source.url("digest.bin"), digest=wrong)
    task = await wait_status(supernode, task_id, TaskStatus.FAILED)
    assert wrong in task.error
    assert sha(body) in task.error
    await wait_until(
        lambda: not meta_path(supernode.store, task_id).exists(), "meta removal"
    )
    assert not supernode.store.path_for(task_id).exists()
    answer = await schedule(supernode, task_id, "peer-1", want=1, wait=5.0)
    assert answer["status"] == "failed"
    assert answer["error"] == task.error
    assert answer["pieces"] == []


async def _cache_digest_task(
    source: Source, make_supernode: Callable[..., Supernode], body: bytes
) -> str:
    digest = "sha256:" + sha(body)
    source.add("a.bin", body)
    first = make_supernode()
    reply = await bounded(
        first.register(registration(source.url("a.bin"), digest=digest))
    )
    task = await wait_status(first, reply["task_id"], TaskStatus.DONE)
    assert task.file_sha256 == sha(body)
    first.stop()
    return str(reply["task_id"])


@pytest_twisted.ensureDeferred
async def test_digest_task_cache_is_trusted_by_a_new_supernode(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A task with the right digest completes; a new supernode on the same home
    registering it again trusts the content-addressed cache without any
    source request, and hands out its pieces with their digests.
    """
    body = body_of(3 * PIECE + 5)
    task_id = await _cache_digest_task(source, make_supernode, body)
    second = make_supernode()
    reply = await bounded(
        second.register(registration(source.url("a.bin"), digest="sha256:" + sha(body)))
    )
    assert reply["task_id"] == task_id
    assert reply["status"] == "done"
    assert reply["length"] == len(body)
    assert reply["piece_count"] == 4
    assert len(source.requests("a.bin")) == 1
    await wait_ended(second, task_id)
    assert second.bytes_from_source == 0
    assert second.store.tasks[task_id].held == {0, 1, 2, 3}
    answer = await schedule(second, task_id, "peer-1", want=4)
    assert {p["piece"]: p["sha256"] for p in answer["pieces"]} == piece_digests(body)
    reader = second.store.open_piece(task_id, 3)
    try:
        assert reader.read(0, PIECE) == body[3 * PIECE :]
    finally:
        reader.close()


@pytest_twisted.ensureDeferred
async def test_damaged_cache_piece_is_fetched_again_never_served(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A cached piece damaged on disk while the supernode was down is found
    when a new supernode takes the cache over (its bytes no longer have the
    recorded sha256): the piece is not held, the file is fetched again, and
    every piece then served has the right bytes.
    """
    body = body_of(3 * PIECE + 5)
    task_id = await _cache_digest_task(source, make_supernode, body)
    second = make_supernode()
    data = second.store.path_for(task_id)
    with data.open("r+b") as cache:
        cache.seek(PIECE + 10)
        cache.write(b"\xff" * 16)
    reply = await bounded(
        second.register(registration(source.url("a.bin"), digest="sha256:" + sha(body)))
    )
    assert reply["task_id"] == task_id
    await wait_status(second, task_id, TaskStatus.DONE)
    assert len(source.requests("a.bin")) == 2
    assert data.read_bytes() == body
    for piece, digest in piece_digests(body).items():
        reader = second.store.open_piece(task_id, piece)
        try:
            assert sha(reader.read(0, PIECE)) == digest
        finally:
            reader.close()


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = reactor.seconds() + timeout
    while not await check():
        assert reactor.seconds() < deadline, "timed out"
        await deferLater(reactor, 0.05, lambda: None)


@pytest_twisted.ensureDeferred
async def test_cache_damaged_while_running_is_dropped_on_a_digest_report(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    When a peer reports that a piece from the supernode failed its digest,
    the supernode hashes its cache again: a piece damaged on disk since it
    was cached drops the task and its files (counted in the metrics), so no
    peer is sent there again; the peers' next calls are told the task is
    unknown, and a new registration fetches it afresh, every piece right.
    A report against an intact cache changes nothing.
    """
    supernode = make_supernode()
    task_id, body = await _done_task(source, supernode, "rot.bin", 4 * PIECE, peers=1)
    cdn = f"cdnnode:127.0.0.1~{task_id}"

    def damaged_count() -> Any:
        return supernode.metrics.registry.get_sample_value(
            "dragonfly_supernode_cache_damaged_total"
        )

    async def checked() -> bool:
        return not supernode._checking

    await schedule(supernode, task_id, "peer-1", failed=[FailedPiece(1, cdn, "digest")])
    await _until(checked)
    assert await supernode.state.get(task_id) is not None
    assert damaged_count() == 0

    data = supernode.store.path_for(task_id)
    with data.open("r+b") as cache:
        cache.seek(PIECE + 10)
        cache.write(b"\xff" * 16)
    await schedule(supernode, task_id, "peer-1", failed=[FailedPiece(1, cdn, "digest")])

    async def dropped() -> bool:
        return await supernode.state.get(task_id) is None and not data.exists()

    await _until(dropped)
    assert damaged_count() == 1
    assert not meta_path(supernode.store, task_id).exists()
    with pytest.raises(UnknownTask):
        await schedule(supernode, task_id, "peer-1", want=1)

    reply = await bounded(supernode.register(registration(source.url("rot.bin"))))
    assert reply["task_id"] == task_id
    await wait_status(supernode, task_id, TaskStatus.DONE)
    assert len(source.requests("rot.bin")) == 2
    assert data.read_bytes() == body


@pytest_twisted.ensureDeferred
async def test_digest_task_cache_is_trusted_whatever_the_url(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    The same digest registered through another URL (another mirror) after a
    restart is the same task, and its content-addressed cache is trusted
    without asking that URL.
    """
    body = body_of(2 * PIECE + 5)
    task_id = await _cache_digest_task(source, make_supernode, body)
    source.add("mirror.bin", body)
    second = make_supernode()
    reply = await bounded(
        second.register(
            registration(source.url("mirror.bin"), digest="sha256:" + sha(body))
        )
    )
    assert reply["task_id"] == task_id
    assert source.requests("mirror.bin") == []
    assert reply["status"] == "done"


@pytest_twisted.ensureDeferred
async def test_url_task_cache_is_revalidated_with_if_none_match(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A new supernode on the same home revalidates a URL task's cache with
    If-None-Match (and If-Modified-Since): the source answers 304, sends no
    body byte, and the task is DONE from the cache with all pieces held.
    """
    body = body_of(4 * PIECE + 1)
    source.add("etag.bin", body)
    first = make_supernode()
    url = source.url("etag.bin")
    reply = await bounded(first.register(registration(url)))
    task_id = reply["task_id"]
    await wait_status(first, task_id, TaskStatus.DONE)
    first.stop()

    second = make_supernode()
    reply = await bounded(second.register(registration(url, 2)))
    assert reply["status"] == "done"
    assert reply["length"] == len(body)
    requests = source.requests("etag.bin")
    assert len(requests) == 2
    assert requests[1].headers["if-none-match"] == '"v1"'
    assert requests[1].headers["if-modified-since"] == LAST_MODIFIED
    assert requests[1].status == 304
    assert requests[1].bytes_sent == 0
    await wait_ended(second, task_id)
    assert second.bytes_from_source == 0
    task = await task_of(second, task_id)
    assert task.pieces == piece_digests(body)
    assert task.file_sha256 == sha(body)
    assert second.store.tasks[task_id].held == set(range(5))


@pytest_twisted.ensureDeferred
async def test_cache_with_only_last_modified_is_revalidated_with_if_modified_since(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Without an ETag the revalidation uses If-Modified-Since alone, and a 304
    reuses the cache.
    """
    body = body_of(2 * PIECE)
    source.add("lm.bin", body, etag=None)
    first = make_supernode()
    url = source.url("lm.bin")
    reply = await bounded(first.register(registration(url)))
    await wait_status(first, reply["task_id"], TaskStatus.DONE)
    first.stop()
    second = make_supernode()
    reply = await bounded(second.register(registration(url)))
    assert reply["status"] == "done"
    second_request = source.requests("lm.bin")[1]
    assert "if-none-match" not in second_request.headers
    assert second_request.headers["if-modified-since"] == LAST_MODIFIED
    assert second_request.status == 304


@pytest_twisted.ensureDeferred
async def test_changed_source_replaces_the_cached_content(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    When revalidation finds a new ETag (200), that response becomes the
    cached content: new length, pieces and sha256, served from the store,
    and a third run revalidates with the new ETag.
    """
    old = body_of(4 * PIECE + 1, seed=1)
    new = body_of(6 * PIECE + 2, seed=2)
    doc = source.add("changing.bin", old)
    url = source.url("changing.bin")
    first = make_supernode()
    reply = await bounded(first.register(registration(url)))
    task_id = reply["task_id"]
    await wait_status(first, task_id, TaskStatus.DONE)
    first.stop()

    doc.body, doc.etag = new, '"v2"'
    second = make_supernode()
    reply = await bounded(second.register(registration(url)))
    assert reply["length"] == len(new)
    task = await wait_status(second, task_id, TaskStatus.DONE)
    requests = source.requests("changing.bin")
    assert requests[1].headers["if-none-match"] == '"v1"'
    assert requests[1].status == 200
    assert len(requests) == 2
    assert task.pieces == piece_digests(new)
    assert task.file_sha256 == sha(new)
    assert cached_bytes(second, task_id) == new
    second.stop()

    third = make_supernode()
    reply = await bounded(third.register(registration(url)))
    assert reply["status"] == "done"
    assert source.requests("changing.bin")[2].headers["if-none-match"] == '"v2"'
    assert source.requests("changing.bin")[2].status == 304


@pytest.mark.parametrize("content_length", [True, False])
@pytest_twisted.ensureDeferred
async def test_changed_source_with_shorter_content(
    source: Source, make_supernode: Callable[..., Supernode], content_length: bool
) -> None:
    """
    When the changed source content is shorter than the cached one, the
    task gets the new length and the cache file holds exactly the new bytes.
    """
    old = body_of(6 * PIECE + 2, seed=1)
    new = body_of(2 * PIECE + 7, seed=2)
    doc = source.add("shrink.bin", old, content_length=content_length)
    url = source.url("shrink.bin")
    first = make_supernode()
    reply = await bounded(first.register(registration(url)))
    task_id = reply["task_id"]
    await wait_status(first, task_id, TaskStatus.DONE)
    first.stop()

    doc.body, doc.etag = new, '"v2"'
    second = make_supernode()
    await bounded(second.register(registration(url)))
    task = await wait_status(second, task_id, TaskStatus.DONE)
    assert task.length == len(new)
    assert task.pieces == piece_digests(new)
    assert cached_bytes(second, task_id) == new


@pytest_twisted.ensureDeferred
async def test_partial_cache_of_an_earlier_run_is_resumed(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A partial cache left by an earlier run (three complete pieces in its
    meta) is resumed with one Range request from the end of that prefix,
    guarded by If-Range; the whole-file sha256 still covers the prefix.
    """
    body = body_of(7 * PIECE + 11)
    source.add("partial.bin", body)
    url = source.url("partial.bin")
    supernode = make_supernode()
    task_id = task_id_for(url)
    data = supernode.store.path_for(task_id)
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_bytes(body[: 3 * PIECE + 500])
    meta = CacheMeta(
        task_id,
        url,
        PIECE,
        len(body),
        etag='"v1"',
        last_modified=LAST_MODIFIED,
        pieces={n: sha(body[n * PIECE : (n + 1) * PIECE]) for n in range(3)},
    )
    meta_path(supernode.store, task_id).write_bytes(meta.to_json())

    reply = await bounded(supernode.register(registration(url)))
    assert reply["length"] == len(body)
    task = await wait_status(supernode, task_id, TaskStatus.DONE)
    (request,) = source.requests("partial.bin")
    assert request.headers["range"] == f"bytes={3 * PIECE}-"
    assert request.headers["if-range"] == '"v1"'
    assert request.status == 206
    assert source.bytes_sent("partial.bin") == len(body) - 3 * PIECE
    assert task.file_sha256 == sha(body)
    assert task.pieces == piece_digests(body)
    assert cached_bytes(supernode, task_id) == body


@pytest_twisted.ensureDeferred
async def test_stop_ends_the_fetch(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    After stop(), a fetch in mid-body makes no further source request.
    """
    body = body_of(8 * PIECE)
    source.add("stop.bin", body, gate_at=3 * PIECE)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("stop.bin"))))
    task_id = reply["task_id"]
    await wait_until(
        lambda: len(supernode.store.tasks[task_id].held) == 3, "three pieces"
    )
    supernode.stop()
    await deferLater(reactor, 1.0, lambda: None)
    assert len(source.requests("stop.bin")) == 1


@pytest_twisted.ensureDeferred
async def test_partial_fetch_survives_a_graceful_stop(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A fetch stopped at shutdown after its meta was saved (every 16 pieces)
    leaves its partial cache, which the next run resumes with a Range
    request from the saved prefix.
    """
    piece = 64 * KIB
    body = body_of(24 * piece + 3)
    source.add("restart.bin", body, gate_at=18 * piece)
    url = source.url("restart.bin")
    first = make_supernode(piece_size=piece)
    reply = await bounded(first.register(registration(url)))
    task_id = reply["task_id"]
    await wait_until(
        lambda: meta_path(first.store, task_id).exists(), "the first meta save"
    )
    first.stop()
    await deferLater(reactor, 1.0, lambda: None)
    assert len(source.requests("restart.bin")) == 1
    assert first.store.path_for(task_id).exists()
    assert meta_path(first.store, task_id).exists()

    source.resource.docs["/restart.bin"].release()
    second = make_supernode(piece_size=piece)
    await bounded(second.register(registration(url)))
    task = await wait_status(second, task_id, TaskStatus.DONE)
    assert source.requests("restart.bin")[1].headers["range"] == f"bytes={16 * piece}-"
    assert cached_bytes(second, task_id) == body
    assert task.file_sha256 == sha(body)


# Client headers --------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_headers_reach_the_source_but_not_their_range(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Headers given at registration (Authorization, a custom one) are sent to
    the source; a client's Range header is not, so the whole file is
    fetched.
    """
    body = body_of(2 * PIECE + 9)
    source.add("private.bin", body)
    supernode = make_supernode()
    reply = await bounded(
        supernode.register(
            registration(
                source.url("private.bin"),
                headers={
                    "Authorization": ["Basic dXNlcjpwYXNz"],
                    "X-Trace": ["abc"],
                    "Range": ["bytes=0-9"],
                },
            )
        )
    )
    assert reply["length"] == len(body)
    task = await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    (request,) = source.requests("private.bin")
    assert request.headers["authorization"] == "Basic dXNlcjpwYXNz"
    assert request.headers["x-trace"] == "abc"
    assert "range" not in request.headers
    assert task.file_sha256 == sha(body)


# Scheduling ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_long_poll_waits_for_the_first_piece(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A schedule call with want>0 and nothing ready waits; it answers as soon
    as the first piece is cached, with a full reply.  With nothing coming it
    returns empty after its wait.
    """
    body = body_of(3 * PIECE)
    doc = source.add("poll.bin", body, gate_at=1000)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("poll.bin"))))
    task_id = reply["task_id"]

    started = reactor.seconds()
    empty = await schedule(supernode, task_id, "peer-1", want=2, wait=0.3)
    assert 0.25 <= reactor.seconds() - started < 3
    assert empty["status"] == "running"
    assert empty["pieces"] == []

    poll = Deferred.fromCoroutine(supernode.schedule(task_id, "peer-1", [], [], 2, 8.0))
    await deferLater(reactor, 0.3, lambda: None)
    assert not poll.called
    doc.release()
    answer = await bounded(poll)
    assert answer["status"] == "running"
    assert answer["pieces"]
    first = answer["pieces"][0]
    assert first == {
        "piece": 0,
        "offset": 0,
        "length": PIECE,
        "sha256": sha(body[:PIECE]),
        "peer_id": f"cdnnode:127.0.0.1~{task_id}",
        "address": "127.0.0.1:8001",
    }
    assert set(answer) >= {
        "status",
        "error",
        "source_status",
        "length",
        "piece_size",
        "piece_count",
        "file_sha256",
        "pieces",
        "downloading",
    }
    assert answer["length"] == len(body)
    assert answer["piece_size"] == PIECE
    assert answer["downloading"] == 1


@pytest_twisted.ensureDeferred
async def test_want_zero_returns_at_once(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A report with want=0 does not wait even with a long wait allowed.
    """
    body = body_of(2 * PIECE)
    source.add("zero.bin", body, gate_at=1000)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("zero.bin"))))
    started = reactor.seconds()
    answer = await schedule(supernode, reply["task_id"], "peer-1", want=0, wait=5.0)
    assert reactor.seconds() - started < 1
    assert answer["pieces"] == []


async def _done_task(
    source: Source, supernode: Supernode, name: str, size: int, peers: int = 2
) -> tuple[str, bytes]:
    body = body_of(size)
    source.add(name, body)
    url = source.url(name)
    reply = None
    for n in range(1, peers + 1):
        reply = await bounded(supernode.register(registration(url, n)))
    assert reply is not None
    await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    return reply["task_id"], body


@pytest_twisted.ensureDeferred
async def test_second_peer_is_sent_to_the_first(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    The first peer gets every piece from the supernode; after it reports
    them finished it is told "done", and a second peer is told to fetch them
    all from the first peer (its peer id and address), not the supernode.
    """
    supernode = make_supernode()
    task_id, body = await _done_task(source, supernode, "swarm.bin", 4 * PIECE)
    cdn = f"cdnnode:127.0.0.1~{task_id}"

    a = await schedule(supernode, task_id, "peer-1", want=4)
    assert sorted(p["piece"] for p in a["pieces"]) == [0, 1, 2, 3]
    assert {p["peer_id"] for p in a["pieces"]} == {cdn}
    b_early = await schedule(supernode, task_id, "peer-2", want=4)
    # Each piece is in flight from the supernode to peer-1: peer-2 waits.
    assert b_early["pieces"] == []

    a_done = await schedule(supernode, task_id, "peer-1", finished=[0, 1, 2, 3])
    assert a_done["status"] == "done"
    assert a_done["piece_count"] == 4
    assert a_done["file_sha256"] == sha(body)
    assert a_done["downloading"] == 1

    b = await schedule(supernode, task_id, "peer-2", want=4)
    assert sorted(p["piece"] for p in b["pieces"]) == [0, 1, 2, 3]
    assert {(p["peer_id"], p["address"]) for p in b["pieces"]} == {
        ("peer-1", "127.0.0.1:9001")
    }
    assert {p["piece"]: p["sha256"] for p in b["pieces"]} == piece_digests(body)
    b_done = await schedule(supernode, task_id, "peer-2", finished=[0, 1, 2, 3])
    assert b_done["status"] == "done"
    assert b_done["downloading"] == 0
    info = await supernode.task_info(task_id)
    assert info["pieces_served"] == {cdn: 4, "peer-1": 4}
    assert info["peers"]["peer-2"]["finished"] is True


@pytest_twisted.ensureDeferred
async def test_digest_failure_bans_the_source_peer(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A report that a piece from a peer failed its digest bans that peer for
    the task: nobody is sent to it any more and the piece comes from the
    supernode instead.
    """
    supernode = make_supernode(limits=Limits(peer_upload_limit=10))
    task_id, _ = await _done_task(source, supernode, "ban.bin", 4 * PIECE, peers=3)
    cdn = f"cdnnode:127.0.0.1~{task_id}"
    await schedule(supernode, task_id, "peer-1", want=4)
    await schedule(supernode, task_id, "peer-1", finished=[0, 1, 2, 3])
    b = await schedule(supernode, task_id, "peer-2", want=1)
    assert b["pieces"][0]["peer_id"] == "peer-1"
    piece = b["pieces"][0]["piece"]

    again = await schedule(
        supernode,
        task_id,
        "peer-2",
        failed=[FailedPiece(piece, "peer-1", "digest")],
        want=1,
    )
    assert again["pieces"] == [{**again["pieces"][0], "piece": piece, "peer_id": cdn}]
    info = await supernode.task_info(task_id)
    assert info["banned"] == ["peer-1"]
    c = await schedule(supernode, task_id, "peer-3", want=4)
    assert c["pieces"]
    assert all(p["peer_id"] != "peer-1" for p in c["pieces"])


@pytest_twisted.ensureDeferred
async def test_plain_failure_blacklists_for_the_requester_only(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    One connection failure (reason "error") stops the requester asking that
    peer but bans nobody: another peer is still sent there.  A failure
    reported against the supernode ("cdnnode:...") bans nothing either.
    """
    supernode = make_supernode()
    task_id, _ = await _done_task(source, supernode, "bl.bin", 2 * PIECE, peers=3)
    cdn = f"cdnnode:127.0.0.1~{task_id}"
    await schedule(supernode, task_id, "peer-1", want=2)
    await schedule(supernode, task_id, "peer-1", finished=[0, 1])
    b = await schedule(supernode, task_id, "peer-2", want=1)
    piece = b["pieces"][0]["piece"]
    assert b["pieces"][0]["peer_id"] == "peer-1"
    b2 = await schedule(
        supernode, task_id, "peer-2", failed=[FailedPiece(piece, "peer-1", "error")]
    )
    assert b2["pieces"] == []
    b3 = await schedule(supernode, task_id, "peer-2", want=2)
    assert {p["peer_id"] for p in b3["pieces"]} <= {cdn}
    c = await schedule(supernode, task_id, "peer-3", want=2)
    assert {p["peer_id"] for p in c["pieces"]} == {"peer-1"}
    c2 = await schedule(
        supernode,
        task_id,
        "peer-3",
        failed=[FailedPiece(c["pieces"][0]["piece"], cdn, "digest")],
    )
    assert c2["status"] == "running"
    assert (await supernode.task_info(task_id))["banned"] == []


@pytest_twisted.ensureDeferred
async def test_schedule_rejects_bad_calls(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Unknown tasks and peers not in the swarm raise UnknownTask; a malformed
    task id or want out of range raise InvalidRequest.
    """
    supernode = make_supernode()
    task_id, _ = await _done_task(source, supernode, "bad.bin", PIECE, peers=1)
    with pytest.raises(UnknownTask):
        await schedule(supernode, "0" * 64, "peer-1")
    with pytest.raises(UnknownTask):
        await schedule(supernode, task_id, "stranger")
    with pytest.raises(InvalidRequest):
        await schedule(supernode, "not-a-task", "peer-1")
    with pytest.raises(InvalidRequest):
        await schedule(supernode, task_id, "peer-1", want=65)
    with pytest.raises(InvalidRequest):
        await schedule(supernode, task_id, "peer-1", want=-1)


@pytest_twisted.ensureDeferred
async def test_failed_task_is_reported_by_schedule(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A peer long-polling a task whose source fails mid-body is answered at
    once with status "failed" and the error.
    """
    body = body_of(4 * PIECE)
    source.add("dies.bin", body, short_by=PIECE, gate_at=PIECE // 2)
    supernode = make_supernode()
    reply = await bounded(supernode.register(registration(source.url("dies.bin"))))
    task_id = reply["task_id"]
    source.resource.docs["/dies.bin"].release()
    answer = await schedule(supernode, task_id, "peer-1", want=64, wait=8.0)
    while answer["status"] == "running":
        answer = await schedule(supernode, task_id, "peer-1", want=64, wait=8.0)
    assert answer["status"] == "failed"
    assert answer["error"]


# Membership ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_heartbeat_and_leave(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A heartbeat refreshes last_seen in the swarms that know the peer and
    names the task ids that do not; leaving removes the peer, its holdings
    and its leases.
    """
    supernode = make_supernode()
    task_id, _ = await _done_task(source, supernode, "hb.bin", 2 * PIECE)
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    swarm.peers["peer-1"].last_seen = 0.0
    unknown = await supernode.heartbeat("peer-1", [task_id, "f" * 64])
    assert unknown == ["f" * 64]
    assert swarm.peers["peer-1"].last_seen >= reactor.seconds() - 5
    assert await supernode.heartbeat("nobody", [task_id]) == [task_id]

    await schedule(supernode, task_id, "peer-1", want=2)
    await schedule(supernode, task_id, "peer-1", finished=[0])
    assert swarm.holdings["peer-1"] == {0}
    await supernode.leave(task_id, "peer-1")
    assert "peer-1" not in swarm.peers
    assert "peer-1" not in swarm.holdings
    assert not [key for key in swarm.leases if key[0] == "peer-1"]
    # Leaving an unknown task is harmless.
    await supernode.leave("e" * 64, "peer-1")
    b = await schedule(supernode, task_id, "peer-2", want=2)
    assert {p["peer_id"] for p in b["pieces"]} == {f"cdnnode:127.0.0.1~{task_id}"}


# Housekeeping ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_collect_drops_silent_peers(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    collect() removes a peer not heard of for longer than peer_expire, and
    keeps one seen recently; the task stays while a peer is in it.
    """
    supernode = make_supernode(peer_expire=5.0)
    task_id, _ = await _done_task(source, supernode, "silent.bin", PIECE)
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    await schedule(supernode, task_id, "peer-1", want=1)
    swarm.peers["peer-1"].last_seen = reactor.seconds() - 10
    await supernode.collect()
    assert set(swarm.peers) == {"peer-2"}
    assert "peer-1" not in swarm.holdings
    assert not [k for k in swarm.leases if k[0] == "peer-1"]
    assert await supernode.state.get(task_id) is swarm


@pytest_twisted.ensureDeferred
async def test_collect_expires_idle_tasks_but_keeps_their_cache(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A task with no peers, no fetch and no access for longer than task_expire
    is dropped from the state and its file closed, while its cache stays on
    disk; registering it again revalidates that cache (304) instead of
    fetching the body.
    """
    supernode = make_supernode(task_expire=60.0)
    task_id, body = await _done_task(source, supernode, "idle.bin", 2 * PIECE)
    other_id, _ = await _done_task(source, supernode, "busy.bin", PIECE)
    await wait_ended(supernode, task_id)
    for n in (1, 2):
        await supernode.leave(task_id, f"peer-{n}")
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    swarm.task.last_access = reactor.seconds() - 120
    await supernode.collect()
    assert await supernode.state.get(task_id) is None
    assert task_id not in supernode.store.tasks
    assert supernode.store.path_for(task_id).read_bytes() == body
    assert meta_path(supernode.store, task_id).exists()
    assert await supernode.state.get(other_id) is not None

    reply = await bounded(supernode.register(registration(source.url("idle.bin"))))
    assert reply["status"] == "done"
    assert source.requests("idle.bin")[-1].status == 304
    assert source.bytes_sent("idle.bin") == len(body)


@pytest_twisted.ensureDeferred
async def test_collect_postpones_expiry_of_a_task_being_served(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    An expired task with a piece still being read by the piece server is
    kept, its file open and the read whole; the first round after the
    reader closed expires it.
    """
    supernode = make_supernode(task_expire=60.0)
    task_id, body = await _done_task(source, supernode, "served.bin", 2 * PIECE)
    await wait_ended(supernode, task_id)
    for n in (1, 2):
        await supernode.leave(task_id, f"peer-{n}")
    reader = supernode.store.open_piece(task_id, 1)
    swarm = await supernode.state.get(task_id)
    assert swarm is not None
    swarm.task.last_access = reactor.seconds() - 120
    await supernode.collect()
    assert await supernode.state.get(task_id) is swarm
    assert task_id in supernode.store.tasks
    assert reader.read(0, PIECE) == body[PIECE:]
    reader.close()
    await supernode.collect()
    assert await supernode.state.get(task_id) is None
    assert task_id not in supernode.store.tasks


@pytest_twisted.ensureDeferred
async def test_collect_keeps_recent_and_peopled_tasks(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    A task without peers but accessed recently is kept.
    """
    supernode = make_supernode(task_expire=60.0)
    task_id, _ = await _done_task(source, supernode, "recent.bin", PIECE)
    for n in (1, 2):
        await supernode.leave(task_id, f"peer-{n}")
    await supernode.collect()
    assert await supernode.state.get(task_id) is not None


async def _ended_tasks(
    source: Source, supernode: Supernode, prefix: str, count: int, size: int
) -> list[str]:
    """
    C{count} tasks of C{size} bytes, each fetched whole for one peer
    ("peer-1", still in the swarm), named C{<prefix><n>.bin}.
    """
    ids = []
    for n in range(count):
        task_id, _ = await _done_task(source, supernode, f"{prefix}{n}.bin", size, 1)
        await wait_ended(supernode, task_id)
        ids.append(task_id)
    return ids


@pytest_twisted.ensureDeferred
async def test_collect_evicts_least_recently_used_cache_beyond_limit(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    With cache_limit set, collect() deletes the least recently used cached
    files (data and meta; last use is the data file's mtime, set when the
    task leaves memory) of tasks no longer in memory until the cache is under
    the limit, and never a task with a peer in its swarm, even the oldest.
    """
    size = 4 * PIECE  # 1 MiB each
    supernode = make_supernode(task_expire=60.0)
    ids = await _ended_tasks(source, supernode, "lru", 4, size)
    active = ids[3]
    before = supernode.store.path_for(active).stat().st_mtime
    for task_id in ids[:3]:
        await supernode.leave(task_id, "peer-1")
        swarm = await supernode.state.get(task_id)
        assert swarm is not None
        swarm.task.last_access = reactor.seconds() - 120
    await supernode.collect()
    assert await supernode.state.task_ids() == [active]
    for task_id in ids[:3]:
        # Leaving memory counts as a use: the file is now the most recent.
        assert supernode.store.path_for(task_id).stat().st_mtime >= before

    # Last use: the active task oldest, then ids[0], ids[1], ids[2].
    base = 1_600_000_000
    for age, task_id in enumerate([active, ids[0], ids[1], ids[2]]):
        path = supernode.store.path_for(task_id)
        os.utime(path, (base + age * 1000, base + age * 1000))
    supernode.settings.cache_limit = int(2.5 * MIB)
    await supernode.collect()
    exists = {t: supernode.store.path_for(t).exists() for t in ids}
    assert exists == {ids[0]: False, ids[1]: False, ids[2]: True, active: True}
    assert not meta_path(supernode.store, ids[0]).exists()
    assert not meta_path(supernode.store, ids[1]).exists()
    assert meta_path(supernode.store, ids[2]).exists()
    assert meta_path(supernode.store, active).exists()
    total = sum(
        p.stat().st_size for p in supernode.store.directory.glob("??/*") if not p.suffix
    )
    assert total <= 2.5 * MIB

    # The evicted task is fetched again when asked for.
    reply = await bounded(supernode.register(registration(source.url("lru0.bin"))))
    await wait_status(supernode, reply["task_id"], TaskStatus.DONE)
    assert len(source.requests("lru0.bin")) == 2
    assert "if-none-match" not in source.requests("lru0.bin")[1].headers


@pytest_twisted.ensureDeferred
async def test_cache_limit_also_evicts_tasks_in_memory_nobody_uses(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    Over the cap, tasks still in memory (not yet expired) lose their cache
    too, least recently accessed first, when their swarm is empty; a task
    with a peer, or with a piece being served, keeps it.  A task evicted
    this way is forgotten and fetched again when asked for.
    """
    size = 4 * PIECE  # 1 MiB each
    supernode = make_supernode(task_expire=3600.0)
    ids = await _ended_tasks(source, supernode, "mem", 4, size)
    peopled, served, oldest, newer = ids
    for task_id in (served, oldest, newer):
        await supernode.leave(task_id, "peer-1")
    now = reactor.seconds()
    for age, task_id in ((400, peopled), (300, served), (200, oldest), (100, newer)):
        swarm = await supernode.state.get(task_id)
        assert swarm is not None
        swarm.task.last_access = now - age
    reader = supernode.store.open_piece(served, 0)
    supernode.settings.cache_limit = int(1.5 * MIB)
    await supernode.collect()
    # Still over the cap with two files: what is in use cannot go.
    exists = {t: supernode.store.path_for(t).exists() for t in ids}
    assert exists == {peopled: True, served: True, oldest: False, newer: False}
    assert sorted(await supernode.state.task_ids()) == sorted([peopled, served])
    reader.close()
    await supernode.collect()
    assert not supernode.store.path_for(served).exists()
    assert await supernode.state.task_ids() == [peopled]
    assert supernode.store.path_for(peopled).exists()

    reply = await bounded(supernode.register(registration(source.url("mem2.bin"))))
    assert reply["task_id"] == oldest
    await wait_status(supernode, oldest, TaskStatus.DONE)
    assert len(source.requests("mem2.bin")) == 2


@pytest_twisted.ensureDeferred
async def test_collect_without_cache_limit_evicts_nothing(
    source: Source, make_supernode: Callable[..., Supernode]
) -> None:
    """
    With no cache_limit, expired tasks' caches all stay.
    """
    supernode = make_supernode(task_expire=60.0)
    ids = []
    for n in range(2):
        task_id, _ = await _done_task(source, supernode, f"keep{n}.bin", PIECE, peers=1)
        await wait_ended(supernode, task_id)
        await supernode.leave(task_id, "peer-1")
        swarm = await supernode.state.get(task_id)
        assert swarm is not None
        swarm.task.last_access = reactor.seconds() - 120
        ids.append(task_id)
    await supernode.collect()
    assert await supernode.state.task_ids() == []
    assert all(supernode.store.path_for(t).exists() for t in ids)


@pytest_twisted.ensureDeferred
async def test_cache_meta_saves_land_in_order(
    source: Source,
    make_supernode: Callable[..., Supernode],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    A file of exactly 16 pieces saves its meta after piece 15 and again at
    the end, at the same moment.  When the first save is slow, the second
    waits for it: the meta on disk ends complete (once, two saves at once
    raced on the temporary file and failed the task).
    """
    body = body_of(16 * PIECE)
    source.add("sixteen.bin", body)
    url = source.url("sixteen.bin")
    supernode = make_supernode()
    real_write = cdn._write_meta
    second_started = threading.Event()
    calls: list[bool] = []

    def slow_first(path: Path, meta: bytes) -> None:
        calls.append(json.loads(meta)["complete"])
        if len(calls) == 1:
            # Without ordering, the final save runs meanwhile and lands first.
            second_started.wait(1.0)
        else:
            second_started.set()
        real_write(path, meta)

    monkeypatch.setattr(cdn, "_write_meta", slow_first)
    task_id = task_id_for(url)
    await bounded(supernode.register(registration(url)))
    task = await wait_status(supernode, task_id, TaskStatus.DONE)
    assert task.file_sha256 == sha(body)
    assert calls == [False, True]
    meta = CacheMeta.from_json(meta_path(supernode.store, task_id).read_bytes())
    assert meta.complete and meta.file_sha256 == sha(body)
