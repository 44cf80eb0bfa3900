"""
The piece protocol on a transport: a server that streams the pieces a node
holds, and a client (with a connection pool) that fetches them.

Server
======
After the handshake the server queues requests (at most
L{PieceServerFactory.max_queue}) and answers them one at a time, in order.
A piece goes out under a pull producer in L{CHUNK_SIZE} reads, so a slow
reader slows the disk reads instead of filling memory, and the upload rate
limit is a pause between chunks.  A connection that says nothing for the
idle timeout, or that stops reading while a piece is being sent, is closed
politely and then aborted.

Client
======
One connection per serving node, requests pipelined on it.  Each piece is
received into one buffer allocated at its full size when its header arrives
(its announced size is checked against the size the supernode promised
first).  Each read is copied once into place and hashed while it is still in
the processor's cache; the caller compares that digest with the trusted one
and writes the piece, and nothing else holds a copy.  Hashing the finished
piece on a thread instead reads every byte back from memory once more, which
on a 2-core machine cost more than the hashing itself.  A read is at most
L{RECEIVE_SIZE}, so hashing it holds the reactor well under a millisecond.

The socket is read in L{RECEIVE_SIZE} reads rather than Twisted's 64 KiB: at
loopback speed the per-read overhead (a poll, a system call, a protocol
callback) was a fifth of the receiving thread.

The buffers come from L{PieceBuffers}: the caller gives a piece's buffer
back once it has written it, and a later piece of the same size is received
into it.  A fresh buffer of several MiB costs more than the copy into it
(the allocator zeroes it, and the kernel maps and zeroes its pages first,
then unmaps them when it is freed); with the buffers reused, a bare client
verifying and writing 1 GiB over TLS went from 477 to 575 MiB/s (means of
two runs of three each) on this project's 2-core benchmark machine.

While requests are outstanding a no-progress watchdog fails them all if no
byte arrives for the stall timeout, so that the caller can ask another node.
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from typing import Protocol as TypingProtocol

from twisted.internet import endpoints
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocolFactory,
    IPullProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from dragonfly import wire
from dragonfly.ratelimit import TokenBucket, delay_for
from dragonfly.tls import TLSConfig

CHUNK_SIZE = 512 * 1024
RECEIVE_SIZE = 1024 * 1024
LIMITED_RECEIVE_SIZE = 64 * 1024


class PieceUnavailable(Exception):
    """
    A node cannot serve a requested piece; carries the wire error code.
    """

    def __init__(self, code: wire.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class PieceRequestError(Exception):
    """
    A piece request failed: refused, connection lost, stalled or malformed.

    @ivar code: the wire error code when the remote node refused the request,
        else C{None}.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class PieceReader(TypingProtocol):
    """
    Read access to one held piece.
    """

    length: int

    def read(self, offset: int, size: int) -> bytes:
        """
        Read up to C{size} bytes at C{offset} within the piece.
        """

    def close(self) -> None:
        """
        Release the piece (it may be evicted again).
        """


class PieceSource(TypingProtocol):
    """
    What a piece server serves from: the supernode's cache or a peer's store.
    """

    def open_piece(self, task_id: str, piece: int) -> PieceReader:
        """
        Open a held piece.

        @raise PieceUnavailable: if the task is unknown or the piece not held.
        """


@dataclass(frozen=True)
class Identity:
    """
    Who a node says it is in its HELLO: its peer id and advertised address.
    """

    peer_id: str
    address: str


@dataclass
class ServerStats:
    """
    What a piece server did, read by the metrics.

    @ivar failed: requests not served, by reason: the refusal's error code
        in lower case, or C{aborted} (the connection was lost mid-piece).
    """

    pieces_served: int = 0
    bytes_served: int = 0
    requests_refused: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + 1


class PieceServerFactory(Factory):
    """
    Shared state of a piece server: what it serves, limits and statistics.
    """

    noisy = False

    def __init__(
        self,
        source: PieceSource,
        identity: Identity,
        clock: IReactorTime,
        *,
        upload_buckets: list[TokenBucket] | None = None,
        max_uploads: int = 64,
        max_queue: int = 16,
        handshake_timeout: float = 10.0,
        idle_timeout: float = 60.0,
    ) -> None:
        self.source = source
        self.identity = identity
        self.clock = clock
        self.upload_buckets = upload_buckets or []
        self.max_uploads = max_uploads
        self.max_queue = max_queue
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.active_uploads = 0
        self.stats = ServerStats()
        self.connections: set[PieceServerProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> "PieceServerProtocol":
        return PieceServerProtocol(self)

    def close_all(self) -> None:
        """
        Drop every open connection (at shutdown).
        """
        for connection in list(self.connections):
            connection.transport.abortConnection()  # type: ignore[union-attr]


class PieceServerProtocol(Protocol, TimeoutMixin):
    """
    One inbound connection: handshake, then queued piece requests.
    """

    _log = Logger()

    def __init__(self, factory: PieceServerFactory) -> None:
        self.factory = factory
        self._decoder = wire.Decoder()
        self._greeted = False
        self._queue: list[wire.GetPiece] = []
        # Queued requests to answer with an ERROR when their turn comes: every
        # response, refusals included, goes out in request order, never
        # inside a piece's payload.
        self._refusals: dict[int, tuple[wire.ErrorCode, str]] = {}
        self._sender: _PieceSender | None = None
        self._closing = False

    def callLater(
        self, delay: float, f: Callable[..., Any], *args: Any
    ) -> IDelayedCall:
        # TimeoutMixin schedules through this: use the injected clock.
        clock: IReactorTime = self.factory.clock
        return clock.callLater(delay, f, *args)

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
        self.setTimeout(self.factory.handshake_timeout)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._greeted:
            # Before HELLO the handshake deadline is absolute: trickling
            # bytes does not extend it.
            self.resetTimeout()
        try:
            events = self._decoder.feed(data)
            for event in events:
                if self._closing:
                    break
                self._handle(event)
        except wire.ProtocolViolation as e:
            self._violation(str(e))

    def _handle(self, event: wire.Event) -> None:
        if not self._greeted:
            if not isinstance(event, wire.Hello):
                raise wire.ProtocolViolation("the first frame must be HELLO")
            self._hello(event)
            return
        match event:
            case wire.GetPiece():
                self._enqueue(event)
            case wire.Cancel(request_id):
                if any(r.request_id == request_id for r in self._queue):
                    self._refusals[request_id] = (wire.ErrorCode.CANCELLED, "cancelled")
            case _:
                raise wire.ProtocolViolation(f"unexpected {type(event).__name__}")

    def _hello(self, hello: wire.Hello) -> None:
        if hello.version != wire.PROTOCOL_VERSION:
            self._send(
                wire.Error(
                    0,
                    wire.ErrorCode.UNSUPPORTED_VERSION,
                    f"this node speaks version {wire.PROTOCOL_VERSION}",
                )
            )
            self._close()
            return
        self._greeted = True
        identity = self.factory.identity
        self._send(
            wire.Hello(wire.PROTOCOL_VERSION, identity.peer_id, identity.address)
        )
        self.setTimeout(self.factory.idle_timeout)

    def _enqueue(self, request: wire.GetPiece) -> None:
        if len(self._queue) >= 2 * self.factory.max_queue:
            raise wire.ProtocolViolation("too many pipelined requests")
        if len(self._queue) >= self.factory.max_queue:
            self._refusals[request.request_id] = (
                wire.ErrorCode.BUSY,
                "request queue full",
            )
        self._queue.append(request)
        self._serve_next()

    def _refuse(self, request_id: int, code: wire.ErrorCode, message: str) -> None:
        self.factory.stats.requests_refused += 1
        self.factory.stats.fail(code.name.lower())
        self._send(wire.Error(request_id, code, message))

    def _serve_next(self) -> None:
        while self._sender is None and self._queue and not self._closing:
            request = self._queue.pop(0)
            refusal = self._refusals.pop(request.request_id, None)
            if refusal is not None:
                self._refuse(request.request_id, *refusal)
                continue
            if self.factory.active_uploads >= self.factory.max_uploads:
                self._refuse(request.request_id, wire.ErrorCode.BUSY, "upload limit")
                continue
            try:
                reader = self.factory.source.open_piece(request.task_id, request.piece)
            except PieceUnavailable as e:
                self._refuse(request.request_id, e.code, e.message)
                continue
            self._send(
                wire.PieceHeader(request.request_id, request.piece, reader.length)
            )
            self.factory.active_uploads += 1
            self._sender = _PieceSender(self, reader)
            self.transport.registerProducer(self._sender, False)  # type: ignore[union-attr]

    def _piece_sent(self, sender: "_PieceSender") -> None:
        self.factory.active_uploads -= 1
        self.factory.stats.pieces_served += 1
        self._sender = None
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._serve_next()

    def _send(self, message: wire.Message) -> None:
        self.transport.write(wire.encode(message))  # type: ignore[union-attr]

    def _violation(self, reason: str) -> None:
        self._log.info(
            "closing piece connection from {peer}: {reason}",
            peer=self.transport.getPeer(),  # type: ignore[union-attr]
            reason=reason,
        )
        if self._sender is None:  # never inside a piece's payload
            self._send(wire.Error(0, wire.ErrorCode.BAD_REQUEST, reason[:200]))
        self._close()

    def _close(self) -> None:
        self._closing = True
        self._queue.clear()
        self.transport.loseConnection()  # type: ignore[union-attr]
        # loseConnection waits for the write buffer to drain, which a peer
        # that stopped reading never allows.
        self.setTimeout(self.factory.handshake_timeout)

    def timeoutConnection(self) -> None:
        if self._closing:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._close()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.setTimeout(None)
        self.factory.connections.discard(self)
        self._queue.clear()
        if self._sender is not None:
            self._sender.stopProducing()
            self.factory.active_uploads -= 1
            self.factory.stats.fail("aborted")
            self._sender = None


@implementer(IPullProducer)
class _PieceSender:
    """
    Writes one piece to the connection, a chunk each time it is asked.
    """

    def __init__(self, protocol: PieceServerProtocol, reader: PieceReader) -> None:
        self._protocol = protocol
        self._reader = reader
        self._offset = 0
        self._waiting: IDelayedCall | None = None
        self._paused_timeout: float | None = None
        self._done = False

    def resumeProducing(self) -> None:
        if self._done or self._waiting is not None:
            return
        size = min(CHUNK_SIZE, self._reader.length - self._offset)
        delay = delay_for(self._protocol.factory.upload_buckets, size)
        if delay > 0:
            # Waiting for our own upload limit is not the client being idle.
            self._paused_timeout = self._protocol.setTimeout(None)
            self._waiting = self._protocol.factory.clock.callLater(
                delay, self._write_after_wait
            )
            return
        self._write_chunk(size)

    def _write_after_wait(self) -> None:
        self._waiting = None
        self._protocol.setTimeout(self._paused_timeout)
        if not self._done:
            self._write_chunk(min(CHUNK_SIZE, self._reader.length - self._offset))

    def _write_chunk(self, size: int) -> None:
        data = self._reader.read(self._offset, size) if size else b""
        if len(data) != size:
            # The store shrank under us (evicted or truncated): the stream
            # cannot be completed, so the connection must go.
            self.stopProducing()
            self._protocol.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._offset += size
        stats = self._protocol.factory.stats
        stats.bytes_served += size
        self._protocol.resetTimeout()
        finished = self._offset >= self._reader.length
        if finished:
            self._done = True
            self._reader.close()
        if data:
            self._protocol.transport.write(data)  # type: ignore[union-attr]
        if finished:
            self._protocol._piece_sent(self)

    def stopProducing(self) -> None:
        if self._waiting is not None:
            self._waiting.cancel()
            self._waiting = None
        if not self._done:
            self._done = True
            self._reader.close()


class ReceivedPiece(bytearray):
    """
    A piece's bytes as received, with the sha256 of those bytes computed as
    they arrived (L{sha256}), to be compared with the trusted digest.
    """

    sha256: str = hashlib.sha256(b"").hexdigest()


class PieceBuffers:
    """
    Piece buffers given back after use, kept to receive later pieces of the
    same size in: at most C{limit} bytes of them.

    A buffer handed out again still holds its old bytes; a request completes
    only once every byte of the new piece has been written over them (a
    request that fails part-way drops its buffer).
    """

    def __init__(self, limit: int = 32 * 1024 * 1024) -> None:
        self.limit = limit
        self._free: list[ReceivedPiece] = []
        self._size = 0

    @property
    def kept(self) -> int:
        """
        Bytes of buffers kept for reuse.
        """
        return self._size

    def take(self, length: int) -> ReceivedPiece:
        """
        A buffer of exactly C{length} bytes: a kept one if there is one.
        """
        for index, buffer in enumerate(self._free):
            if len(buffer) == length:
                del self._free[index]
                self._size -= length
                return buffer
        return ReceivedPiece(length)

    def give_back(self, buffer: ReceivedPiece) -> None:
        """
        Keep C{buffer} for a later piece, if there is room.  Only for a
        buffer nothing else will read or write any more.
        """
        if self._size + len(buffer) > self.limit or any(
            kept is buffer for kept in self._free
        ):
            return
        self._free.append(buffer)
        self._size += len(buffer)

    def clear(self) -> None:
        """
        Drop every kept buffer (when no download is running).
        """
        self._free.clear()
        self._size = 0


@dataclass
class _Request:
    deferred: "Deferred[ReceivedPiece]"
    piece: int
    length: int
    buckets: list[TokenBucket]
    on_bytes: Callable[[int], None] | None = None
    buffer: ReceivedPiece = field(default_factory=ReceivedPiece)
    digest: Any = None
    received: int = 0
    started: bool = False
    discard: bool = False


class PieceClientProtocol(Protocol, TimeoutMixin):
    """
    One outbound connection to a node that serves pieces.
    """

    def __init__(
        self,
        identity: Identity,
        clock: IReactorTime,
        *,
        handshake_timeout: float = 10.0,
        stall_timeout: float = 15.0,
        idle_timeout: float = 30.0,
        on_lost: Callable[["PieceClientProtocol"], None] | None = None,
        buffers: PieceBuffers | None = None,
    ) -> None:
        self.identity = identity
        self._buffers = buffers if buffers is not None else PieceBuffers(limit=0)
        self._on_lost = on_lost
        self.ready: Deferred[wire.Hello] = Deferred()
        self.remote: wire.Hello | None = None
        self._clock = clock
        self._delay = 0.0
        self._paused_timeout: float | None = None
        self._stall_timeout = stall_timeout
        self._idle_timeout = idle_timeout
        self._handshake_timeout = handshake_timeout
        self._decoder = wire.Decoder()
        self._requests: dict[int, _Request] = {}
        self._next_id = 1
        self._resume_call: IDelayedCall | None = None
        self._lost = False
        self.bytes_received = 0

    def callLater(
        self, delay: float, f: Callable[..., Any], *args: Any
    ) -> IDelayedCall:
        # TimeoutMixin schedules through this: use the injected clock.
        return self._clock.callLater(delay, f, *args)

    def connectionMade(self) -> None:
        _set_read_size(self.transport, RECEIVE_SIZE)
        self.setTimeout(self._handshake_timeout)
        self.transport.write(  # type: ignore[union-attr]
            wire.encode(
                wire.Hello(
                    wire.PROTOCOL_VERSION, self.identity.peer_id, self.identity.address
                )
            )
        )

    @property
    def busy(self) -> int:
        """
        How many requests are outstanding on this connection.
        """
        return len(self._requests)

    def request(
        self,
        task_id: str,
        piece: int,
        length: int,
        buckets: list[TokenBucket] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> "Deferred[ReceivedPiece]":
        """
        Ask for piece C{piece} of C{task_id}, which must be C{length} bytes,
        receiving it no faster than C{buckets} allow; C{on_bytes} is told
        the size of each part of the piece as it arrives.

        Cancelling the result withdraws the request.
        """
        if self._lost:
            return fail(PieceRequestError("connection lost"))
        request_id = self._next_id
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF or 1
        d: Deferred[ReceivedPiece] = Deferred(lambda _: self._cancel(request_id))
        self._requests[request_id] = _Request(d, piece, length, buckets or [], on_bytes)
        self.transport.write(  # type: ignore[union-attr]
            wire.encode(wire.GetPiece(request_id, task_id, piece))
        )
        if len(self._requests) == 1:
            self.setTimeout(self._stall_timeout)
        return d

    def _cancel(self, request_id: int) -> None:
        request = self._requests.get(request_id)
        if request is None:
            return
        # The response may already be on its way: keep the entry to swallow
        # it, but never hand it to anyone.
        request.discard = True
        if not request.started and not self._lost:
            self.transport.write(wire.encode(wire.Cancel(request_id)))  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.remote is not None:
            # The handshake deadline is absolute; after it, any byte is
            # progress for the stall watchdog.
            self.resetTimeout()
        self.bytes_received += len(data)
        try:
            for event in self._decoder.feed(data):
                self._handle(event)
        except wire.ProtocolViolation as e:
            self._fail_all(PieceRequestError(f"bad response: {e}"))
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        delay, self._delay = self._delay, 0.0
        if delay > 0 and self._resume_call is None and not self._lost:
            # A rate limit is enforced after a read: small reads keep it
            # smooth (a 1 MiB read is half a second at 2 MiB/s).
            _set_read_size(self.transport, LIMITED_RECEIVE_SIZE)
            self.transport.pauseProducing()  # type: ignore[union-attr]
            # Our own rate limit holding the data back is not a stall.
            self._paused_timeout = self.setTimeout(None)
            self._resume_call = self._clock.callLater(delay, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        if not self._lost:
            self.setTimeout(self._paused_timeout)
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def _handle(self, event: wire.Event) -> None:
        match event:
            case wire.Hello():
                if self.remote is not None:
                    raise wire.ProtocolViolation("second HELLO")
                if event.version != wire.PROTOCOL_VERSION:
                    raise wire.ProtocolViolation(
                        f"node speaks protocol version {event.version}"
                    )
                self.remote = event
                self.setTimeout(
                    self._idle_timeout if not self._requests else self._stall_timeout
                )
                self.ready.callback(event)
            case wire.PieceHeader(request_id, piece, length):
                request = self._expect(request_id)
                if piece != request.piece or length != request.length:
                    raise wire.ProtocolViolation(
                        f"asked for piece {request.piece} ({request.length} bytes),"
                        f" got piece {piece} ({length} bytes)"
                    )
                request.started = True
                if not request.discard:
                    request.buffer = self._buffers.take(length)
                    request.digest = hashlib.sha256()
            case wire.PayloadChunk(request_id, data):
                request = self._expect(request_id)
                if not request.discard:
                    end = request.received + len(data)
                    request.buffer[request.received : end] = data
                    request.received = end
                    request.digest.update(data)
                    if request.on_bytes is not None:
                        request.on_bytes(len(data))
                self._delay = max(self._delay, delay_for(request.buckets, len(data)))
            case wire.PayloadEnd(request_id):
                request = self._requests.pop(request_id)
                self._after_response()
                if not request.discard:
                    if request.digest is not None:
                        request.buffer.sha256 = request.digest.hexdigest()
                    request.deferred.callback(request.buffer)
            case wire.Error(0, code, message):
                raise wire.ProtocolViolation(f"node closed the connection: {message}")
            case wire.Error(request_id, code, message):
                request = self._expect(request_id)
                del self._requests[request_id]
                self._after_response()
                if not request.discard:
                    request.deferred.errback(PieceRequestError(message, code))
            case _:
                raise wire.ProtocolViolation(f"unexpected {type(event).__name__}")

    def _expect(self, request_id: int) -> _Request:
        if self.remote is None:
            raise wire.ProtocolViolation("response before HELLO")
        request = self._requests.get(request_id)
        if request is None:
            raise wire.ProtocolViolation(f"response to unknown request {request_id}")
        return request

    def _after_response(self) -> None:
        self.setTimeout(self._stall_timeout if self._requests else self._idle_timeout)

    def timeoutConnection(self) -> None:
        if self.remote is None:
            reason = "handshake timed out"
        elif self._requests:
            reason = f"no data for {self._stall_timeout:g}s"
        else:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._fail_all(PieceRequestError(reason))
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _fail_all(self, error: Exception) -> None:
        requests, self._requests = self._requests, {}
        for request in requests.values():
            if not request.discard:
                request.deferred.errback(error)
        if not self.ready.called:
            self.ready.errback(error)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self.setTimeout(None)
        if self._resume_call is not None:
            self._resume_call.cancel()
            self._resume_call = None
        self._fail_all(
            PieceRequestError(f"connection lost: {reason.getErrorMessage()}")
        )
        if self._on_lost is not None:
            self._on_lost(self)


def _set_read_size(transport: object, size: int) -> None:
    """
    Make the TCP connection under C{transport} (directly, or under TLS) read
    up to C{size} bytes at a time.

    C{bufferSize} is the size of C{recv} in Twisted's TCP connections; other
    transports (in-memory ones in tests) have no such attribute and are left
    as they are.
    """
    for candidate in (transport, getattr(transport, "transport", None)):
        if isinstance(getattr(candidate, "bufferSize", None), int):
            candidate.bufferSize = size  # type: ignore[union-attr]
            return


class PieceClientPool:
    """
    Connections to the nodes this peer fetches from, one per address.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        identity: Identity,
        *,
        bind_ip: str = "",
        tls: TLSConfig | None = None,
        connect_timeout: float = 5.0,
        stall_timeout: float = 15.0,
    ) -> None:
        self._reactor = reactor
        self.identity = identity
        self._bind_ip = bind_ip
        self._tls = tls
        self._connect_timeout = connect_timeout
        self._stall_timeout = stall_timeout
        self._connected: dict[str, PieceClientProtocol] = {}
        self._waiting: dict[str, list[Deferred[PieceClientProtocol]]] = {}
        self.buffers = PieceBuffers()

    def fetch(
        self,
        address: str,
        task_id: str,
        piece: int,
        length: int,
        buckets: list[TokenBucket] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> "Deferred[ReceivedPiece]":
        """
        Fetch one piece from the node at C{address} (C{"ip:port"}); see
        L{PieceClientProtocol.request} for C{buckets} and C{on_bytes}.

        @return: a Deferred firing with the piece's bytes (and their sha256),
            or failing with
            L{PieceRequestError}; cancelling it withdraws the request.
        """
        return Deferred.fromCoroutine(
            self._fetch(address, task_id, piece, length, buckets or [], on_bytes)
        )

    async def _fetch(
        self,
        address: str,
        task_id: str,
        piece: int,
        length: int,
        buckets: list[TokenBucket],
        on_bytes: Callable[[int], None] | None,
    ) -> ReceivedPiece:
        connection = await self._connection(address)
        return await connection.request(task_id, piece, length, buckets, on_bytes)

    def _connection(self, address: str) -> "Deferred[PieceClientProtocol]":
        connection = self._connected.get(address)
        if connection is not None:
            return succeed(connection)
        waiter: Deferred[PieceClientProtocol] = Deferred()
        waiters = self._waiting.get(address)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._waiting[address] = [waiter]
        attempt = Deferred.fromCoroutine(self._connect(address))
        attempt.addBoth(self._connected_or_not, address)
        return waiter

    def _connected_or_not(
        self, result: "PieceClientProtocol | Failure", address: str
    ) -> None:
        waiters = self._waiting.pop(address, [])
        if isinstance(result, PieceClientProtocol):
            self._connected[address] = result
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(
                    PieceRequestError(
                        f"cannot connect to {address}: {result.getErrorMessage()}"
                    )
                )
            else:
                waiter.callback(result)

    async def _connect(self, address: str) -> PieceClientProtocol:
        host, _, port_text = address.rpartition(":")
        try:
            port = int(port_text)
        except ValueError:
            raise PieceRequestError(f"bad node address {address!r}") from None
        endpoint = endpoints.TCP4ClientEndpoint(
            self._reactor,
            host,
            port,
            timeout=self._connect_timeout,
            bindAddress=(self._bind_ip, 0) if self._bind_ip else None,
        )

        def forget(lost: PieceClientProtocol) -> None:
            if self._connected.get(address) is lost:
                del self._connected[address]

        protocol = PieceClientProtocol(
            self.identity,
            self._reactor,
            stall_timeout=self._stall_timeout,
            on_lost=forget,
            buffers=self.buffers,
        )
        factory: IProtocolFactory = _OneConnection(protocol)
        if self._tls is not None:
            factory = self._tls.wrap_client(host, factory, self._reactor)
        connecting = endpoint.connect(factory)
        connecting.addTimeout(self._connect_timeout, self._reactor)
        await connecting
        await protocol.ready
        return protocol

    def give_back(self, piece: ReceivedPiece) -> None:
        """
        Return a fetched piece's buffer, once it has been written and
        nothing holds it any more, to receive a later piece in.
        """
        self.buffers.give_back(piece)

    def close(self) -> None:
        """
        Close every connection.
        """
        for connection in list(self._connected.values()):
            connection.transport.loseConnection()  # type: ignore[union-attr]
        self._connected.clear()


class _OneConnection(Factory):
    """
    Builds the one, already made, protocol of an outbound connection.
    """

    noisy = False

    def __init__(self, protocol: PieceClientProtocol) -> None:
        self._protocol = protocol

    def buildProtocol(self, addr: IAddress | None) -> PieceClientProtocol:
        return self._protocol
