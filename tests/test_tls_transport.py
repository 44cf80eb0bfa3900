"""
L{dragonfly.tls}: the TLS contexts it builds, and L{BulkTLSTransport},
mutual TLS in memory through iosim: a
large write reaches TCP as one write and the other side's protocol as one
call (Twisted's own transport makes both 16 KiB at a time), batches stay
bounded, and the order of data, close and abort is Twisted's.

The transport overrides private methods of Twisted's TLS protocol; these
tests are what fails if a Twisted upgrade renames them or stops calling them.
"""

import warnings

from helpers import GivenProtocol, piece_bytes, tls_pki
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from dragonfly.tls import RECEIVE_BATCH, SEND_BATCH, BulkTLSTransport, TLSConfig

MIB = 1024 * 1024
RECORD = 2**14


class Recorder(Protocol):
    """
    Keeps every C{dataReceived} call and how the connection ended.
    """

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.chunks: list[bytes] = []
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        if self.greeting:
            self.transport.write(self.greeting)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)


class Aborter(Recorder):
    """
    Aborts the connection on the first bytes it receives.
    """

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.abortConnection()  # type: ignore[union-attr]


def connect(
    server: Recorder, client: Recorder
) -> tuple[TLSMemoryBIOProtocol, IOPump, Clock]:
    """
    Mutual TLS between C{server} and C{client} as the daemons set it up
    (L{dragonfly.tls.TLSConfig.wrap_server} and C{wrap_client}), handshake
    done; return the server's TLS transport and the pump.
    """
    clock = Clock()
    pki = tls_pki()
    server_factory = pki.server.wrap_server(GivenProtocol(server), clock)
    client_factory = pki.client.wrap_client("127.0.0.1", GivenProtocol(client), clock)
    _, tls_server, pump = connectedServerAndClient(
        lambda: server_factory.buildProtocol(None),
        lambda: client_factory.buildProtocol(None),
        clock=clock,
    )
    assert isinstance(tls_server, BulkTLSTransport)
    assert server.transport is tls_server
    return tls_server, pump, clock


def test_contexts_are_built_without_deprecated_pyopenssl_objects() -> None:
    """
    Server and client contexts, with a CA and without, give this side's key
    and certificate to pyOpenSSL as C{cryptography} objects: building them
    raises no deprecation warning (pyOpenSSL warns for its own types).
    """
    pki = tls_pki()
    unverified = TLSConfig(pki.server.identity, None)
    clock = Clock()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for config in (pki.server, unverified):
            for factory in (
                config.wrap_server(Factory.forProtocol(Protocol), clock),
                config.wrap_client("127.0.0.1", Factory.forProtocol(Protocol), clock),
            ):
                tls = factory.buildProtocol(None)
                assert tls is not None
                transport = StringTransport()
                tls.makeConnection(transport)
                tls.abortConnection()
                assert transport.disconnecting


def test_daemons_wrap_connections_in_the_bulk_transport() -> None:
    """
    Both helpers build L{BulkTLSTransport}s, which override the methods of
    Twisted's TLS protocol that they replace (still defined there).
    """
    pki = tls_pki()
    clock = Clock()
    for factory in (
        pki.server.wrap_server(Factory(), clock),
        pki.client.wrap_client("127.0.0.1", Factory(), clock),
    ):
        assert isinstance(factory, TLSMemoryBIOFactory)
        assert factory.protocol is BulkTLSTransport
    for name in ("_flushReceiveBIO", "_flushSendBIO", "_write"):
        assert callable(vars(TLSMemoryBIOProtocol).get(name)), name
        assert name in vars(BulkTLSTransport), name
    for name in ("_lostTLSConnection", "_aborted"):
        assert vars(TLSMemoryBIOProtocol).get(name) is False, name


def test_a_large_write_is_one_tcp_write_and_one_delivery() -> None:
    """
    960 KiB written at once (their ciphertext under L{SEND_BATCH}) leave as
    one write to TCP, not 60 of 16 KiB, and reach the other protocol in one
    call, byte for byte.
    """
    server, client = Recorder(), Recorder()
    tls_server, pump, _ = connect(server, client)
    data = piece_bytes(1, 960 * 1024)
    tls_server.write(data)
    assert len(pump.serverIO.stream) == 1
    pump.flush()
    assert client.chunks == [data]


def test_batches_are_bounded() -> None:
    """
    Writes of several MiB reach TCP in writes of at most L{SEND_BATCH} and
    the protocol in calls of at most L{RECEIVE_BATCH} plus one record,
    complete and in order.
    """
    server, client = Recorder(), Recorder()
    tls_server, pump, _ = connect(server, client)
    data = piece_bytes(2, 3 * MIB + 5)
    tls_server.write(data)
    writes = pump.serverIO.stream
    assert 3 <= len(writes) <= 5
    assert max(len(w) for w in writes) <= SEND_BATCH
    pump.flush()
    assert client.received == data
    assert len(client.chunks) >= 3
    assert max(len(c) for c in client.chunks) < RECEIVE_BATCH + RECORD


def test_data_sent_before_a_close_arrives_before_the_close() -> None:
    """
    Bytes written just before a clean TLS close are all delivered, in one
    call, and only then is the connection reported closed, cleanly.
    """
    server, client = Recorder(), Recorder()
    tls_server, pump, _ = connect(server, client)
    data = piece_bytes(3, 100_000)
    tls_server.write(data)
    tls_server.loseConnection()
    pump.flush()
    assert client.chunks == [data]
    assert client.lost is not None
    assert client.lost.check(ConnectionDone)


def test_writes_before_the_handshake_are_sent_after_it() -> None:
    """
    What a protocol writes when it is connected, before TLS is set up,
    is kept and arrives whole once the handshake is done.
    """
    greeting = piece_bytes(4, 200_000)
    server, client = Recorder(), Recorder(greeting)
    connect(server, client)
    assert server.received == greeting


def test_nothing_is_delivered_after_an_abort() -> None:
    """
    A protocol that aborts on its first bytes gets no second call, though
    more had arrived in the same read.
    """
    server, client = Recorder(), Aborter()
    tls_server, pump, _ = connect(server, client)
    tls_server.write(piece_bytes(5, 3 * MIB))
    pump.flush()
    assert len(client.chunks) == 1
    assert len(client.chunks[0]) >= RECEIVE_BATCH
    assert client.lost is not None
