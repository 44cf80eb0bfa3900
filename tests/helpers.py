"""
Shared helpers for the in-memory unit tests.

Nothing here fakes Dragonfly code: these are in-memory stand-ins for the
environment (a piece store, certificates, a clock-driven cooperator) and small
conveniences for reading Deferreds and frames synchronously.
"""

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from certs import Authority
from hypothesis import settings
from twisted.internet import ssl as twisted_ssl
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from dragonfly import wire
from dragonfly.piece_protocol import (
    Identity,
    PieceServerFactory,
    PieceServerProtocol,
    PieceUnavailable,
)
from dragonfly.tls import TLSConfig

# Hypothesis runs derandomized: the same examples on every run and machine.
DETERMINISTIC = settings(derandomize=True, deadline=None, database=None)

TASK = "ab" * 32
OTHER_TASK = "cd" * 32
SERVER_IDENTITY = Identity("server-peer", "127.0.0.1:65001")
CLIENT_IDENTITY = Identity("client-peer", "127.0.0.1:65002")


def piece_bytes(piece: int, size: int) -> bytes:
    """
    Recognisable, position-dependent content for a piece: a shifted or
    truncated copy never equals the original.
    """
    pattern = bytes((piece * 31 + i * 7) & 0xFF for i in range(251))
    reps = size // len(pattern) + 1
    return (pattern * reps)[:size]


# A piece source in memory ---------------------------------------------------


class MemoryPiece:
    """
    A held piece: the L{dragonfly.piece_protocol.PieceReader} shape.
    """

    def __init__(self, source: "MemoryPieceSource", data: bytes) -> None:
        self._source = source
        self._data = data
        self.length = len(data)
        self.closed = False
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        # A source can shrink under a reader (eviction); model it.
        limit = self._source.truncate_to
        data = self._data if limit is None else self._data[:limit]
        return data[offset : offset + size]

    def close(self) -> None:
        assert not self.closed, "a piece reader was closed twice"
        self.closed = True
        self._source.open_readers -= 1


class MemoryPieceSource:
    """
    The pieces a node holds, in a dict: the L{PieceSource} shape.
    """

    def __init__(self) -> None:
        self.tasks: dict[str, dict[int, bytes]] = {}
        self.readers: list[MemoryPiece] = []
        self.open_readers = 0
        self.requests: list[tuple[str, int]] = []
        self.truncate_to: int | None = None

    def add(self, task_id: str, piece: int, data: bytes) -> bytes:
        self.tasks.setdefault(task_id, {})[piece] = data
        return data

    def open_piece(self, task_id: str, piece: int) -> MemoryPiece:
        self.requests.append((task_id, piece))
        pieces = self.tasks.get(task_id)
        if pieces is None:
            raise PieceUnavailable(wire.ErrorCode.UNKNOWN_TASK, "unknown task")
        if piece not in pieces:
            raise PieceUnavailable(
                wire.ErrorCode.PIECE_NOT_HELD, f"piece {piece} not held"
            )
        reader = MemoryPiece(self, pieces[piece])
        self.readers.append(reader)
        self.open_readers += 1
        return reader


# Deferreds, synchronously ---------------------------------------------------


def result_of(d: "Deferred[Any]") -> Any:
    """
    The result of a Deferred that has already fired successfully.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def failure_of(d: "Deferred[Any]", *expected: type[BaseException]) -> Failure:
    """
    The (now handled) failure of a Deferred that has already failed.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the Deferred has not fired"
    assert isinstance(box[0], Failure), f"expected a failure, got {box[0]!r}"
    if expected:
        assert box[0].check(*expected), f"unexpected failure {box[0]!r}"
    return box[0]


def collect(d: "Deferred[Any]") -> list[Any]:
    """
    A list that receives C{d}'s result or failure when it fires; handles it.
    """
    box: list[Any] = []
    d.addBoth(box.append)
    return box


# Frames -------------------------------------------------------------------


def frames(*messages: wire.Message) -> bytes:
    return b"".join(wire.encode(m) for m in messages)


def coalesce(events: list[wire.Event]) -> list[wire.Event]:
    """
    Merge consecutive payload chunks of one request, so that event lists
    from different splits of one stream can be compared.
    """
    out: list[wire.Event] = []
    for event in events:
        if (
            isinstance(event, wire.PayloadChunk)
            and out
            and isinstance(out[-1], wire.PayloadChunk)
            and out[-1].request_id == event.request_id
        ):
            out[-1] = wire.PayloadChunk(event.request_id, out[-1].data + event.data)
        else:
            out.append(event)
    return out


class WireReader:
    """
    Decodes what a protocol wrote to a L{StringTransport}, incrementally.
    """

    def __init__(self, transport: StringTransport) -> None:
        self.transport = transport
        self.decoder = wire.Decoder()

    def events(self) -> list[wire.Event]:
        data = self.transport.value()
        self.transport.clear()
        return coalesce(self.decoder.feed(data))


# A piece server on a StringTransport -----------------------------------------


@dataclass
class ServerRig:
    factory: PieceServerFactory
    protocol: PieceServerProtocol
    transport: StringTransport
    clock: Clock
    source: MemoryPieceSource
    out: WireReader

    def send(self, *messages: wire.Message) -> None:
        self.protocol.dataReceived(frames(*messages))

    def greet(self) -> list[wire.Event]:
        self.send(wire.Hello(wire.PROTOCOL_VERSION, "client", "127.0.0.1:1"))
        return self.out.events()

    def pull(self) -> None:
        """
        Be the transport asking its pull producer for more.
        """
        assert self.transport.producer is not None, "no producer registered"
        self.transport.producer.resumeProducing()

    def lose(self) -> None:
        """
        Report the end of the connection, as the reactor would.
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))


def server_rig(
    source: MemoryPieceSource | None = None,
    clock: Clock | None = None,
    factory: PieceServerFactory | None = None,
    **options: Any,
) -> ServerRig:
    """
    A piece server protocol connected to a L{StringTransport}.
    """
    source = source if source is not None else MemoryPieceSource()
    clock = clock if clock is not None else Clock()
    if factory is None:
        factory = PieceServerFactory(source, SERVER_IDENTITY, clock, **options)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 65002))
    transport = StringTransport()
    protocol.makeConnection(transport)
    assert isinstance(factory.clock, Clock)
    assert isinstance(factory.source, MemoryPieceSource)
    return ServerRig(
        factory,
        protocol,
        transport,
        factory.clock,
        factory.source,
        WireReader(transport),
    )


# TLS ------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsPki:
    """
    TLS configurations for in-memory mutual-TLS tests.
    """

    server: TLSConfig  # leaf for 127.0.0.1 from the trusted CA, trusting it
    client: TLSConfig  # another leaf from the trusted CA, trusting it
    rogue_client: TLSConfig  # leaf from another CA (but trusting ours)
    anonymous_ca: twisted_ssl.Certificate  # the trusted CA, for cert-less clients


def _config(authority: Authority, ip: str, trust: Authority) -> TLSConfig:
    cert, key = authority.issue([ip])
    return TLSConfig(
        twisted_ssl.PrivateCertificate.loadPEM(cert + b"\n" + key),
        twisted_ssl.Certificate.loadPEM(trust.cert_pem),
    )


@functools.cache
def tls_pki() -> TlsPki:
    ca = Authority.create("unit-test CA")
    rogue = Authority.create("unit-test rogue CA")
    return TlsPki(
        server=_config(ca, "127.0.0.1", ca),
        client=_config(ca, "127.0.0.1", ca),
        rogue_client=_config(rogue, "127.0.0.1", ca),
        anonymous_ca=twisted_ssl.Certificate.loadPEM(ca.cert_pem),
    )


def clock_cooperator(clock: Clock) -> Callable[[Iterator[Any]], Any]:
    """
    A C{cooperate} whose ticks are calls on C{clock}, one work unit each.

    L{twisted.protocols.tls} turns a pull producer into a push one with the
    global cooperator, which runs on the global reactor; tests patch this in
    so that the in-memory TLS connection streams on the test's clock.
    """
    cooperator = Cooperator(
        terminationPredicateFactory=lambda: lambda: True,
        scheduler=lambda f: clock.callLater(0, f),
    )
    return cooperator.cooperate


__all__ = [
    "CLIENT_IDENTITY",
    "DETERMINISTIC",
    "OTHER_TASK",
    "SERVER_IDENTITY",
    "TASK",
    "MemoryPiece",
    "MemoryPieceSource",
    "ServerRig",
    "TlsPki",
    "WireReader",
    "clock_cooperator",
    "coalesce",
    "collect",
    "failure_of",
    "frames",
    "piece_bytes",
    "result_of",
    "server_rig",
    "tls_pki",
]


class GivenProtocol(Factory):
    """
    A factory whose one connection is served by a protocol made beforehand.
    """

    def __init__(self, protocol: Protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance
