"""
The daemons' HTTP site: no access log line per request, no form parsing of
request bodies, request bodies bounded before they are stored.
"""

import json
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request

from dragonfly import httpserver
from dragonfly.httpserver import MAX_BODY, DaemonSite
from dragonfly.peer.mirror import MirrorSite


class _Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[bytes, list[bytes]], bytes]] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.seen.append((dict(request.args or {}), request.content.read()))
        return b"ok"


def _post(site: DaemonSite, path: bytes, body: bytes, content_type: bytes) -> bytes:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    channel.connectionLost(None)  # type: ignore[arg-type]
    return transport.value()


def test_no_access_log_line() -> None:
    """
    A request served by a started site leaves no line naming it in the log.
    """
    events: list[LogEvent] = []

    def observe(event: Any) -> None:
        events.append(event)

    site = DaemonSite(_Echo(), 5.0)
    site.doStart()
    globalLogPublisher.addObserver(observe)
    try:
        reply = _post(site, b"/some/path", b"{}", b"application/json")
    finally:
        globalLogPublisher.removeObserver(observe)
        site.doStop()
    assert reply.startswith(b"HTTP/1.1 200")
    assert not [e for e in events if "/some/path" in (formatEvent(e) or "")]


def test_form_bodies_are_not_parsed() -> None:
    """
    A form-encoded POST body reaches the resource as bytes: it does not
    become request arguments (only the query string does).
    """
    echo = _Echo()
    site = DaemonSite(echo, 5.0)
    reply = _post(site, b"/x?q=1", b"a=1&b=2", b"application/x-www-form-urlencoded")
    assert reply.startswith(b"HTTP/1.1 200")
    ((args, content),) = echo.seen
    assert content == b"a=1&b=2"
    # Twisted before 25.5 cannot turn form parsing off.
    expected = {b"q": [b"1"]}
    if not httpserver._FORMS_OPTIONAL:
        expected.update({b"a": [b"1"], b"b": [b"2"]})
    assert args == expected


class _Sizes(Resource):
    """
    Records the size of every body that reached it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def render_POST(self, request: Request) -> bytes:
        assert request.content is not None
        self.sizes.append(len(request.content.read()))
        return b"ok"


def _connect(
    site: DaemonSite, clock: Clock | None = None
) -> tuple[Any, StringTransport]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    assert channel is not None
    if clock is not None:
        channel.callLater = clock.callLater
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def _reply_body(reply: bytes) -> Any:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def _post_headers(length: int) -> bytes:
    return (
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % length
    )


def test_declared_body_over_the_limit_is_413_before_any_is_read() -> None:
    """
    A Content-Length over the limit is refused as soon as the headers are
    in, without C{100 Continue}.  The body sent anyway is read and dropped,
    never stored nor handed to the resource, and the connection is closed
    once it is all in, so that the client, done sending, reads the answer.
    """
    sizes = _Sizes()
    channel, transport = _connect(DaemonSite(sizes, 5.0), Clock())
    channel.dataReceived(_post_headers(2 * MAX_BODY))
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply
    assert b"Connection: close" in reply
    assert _reply_body(reply)["error"] == "too_large"
    request = channel.requests[-1]
    channel.dataReceived(b"x" * (2 * MAX_BODY - 1))
    assert request.content.tell() == 0
    assert not transport.disconnecting
    channel.dataReceived(b"x")
    assert transport.disconnecting
    channel.connectionLost(None)
    assert sizes.sizes == []


def test_a_refused_body_is_read_for_a_bounded_time_and_size() -> None:
    """
    The rest of a refused body is thrown away for at most LINGER_SECONDS
    and LINGER_BYTES, then the connection is closed anyway.
    """
    clock = Clock()
    site = DaemonSite(_Sizes(), 60.0)
    channel, transport = _connect(site, clock)
    channel.dataReceived(_post_headers(100 * MAX_BODY))
    clock.advance(httpserver.LINGER_SECONDS - 0.1)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    channel.connectionLost(None)
    assert not clock.getDelayedCalls()

    channel, transport = _connect(site, clock)
    channel.dataReceived(_post_headers(100 * MAX_BODY))
    channel.dataReceived(b"x" * httpserver.LINGER_BYTES)
    assert not transport.disconnecting
    channel.dataReceived(b"x")
    assert transport.disconnecting
    channel.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_chunked_body_is_cut_at_the_chunk_that_crosses_the_limit() -> None:
    """
    A chunked body, whose size nobody declared, is refused at the chunk that
    takes it over the limit; what came before is not handed on, and the
    connection is closed at the last chunk.
    """
    sizes = _Sizes()
    channel, transport = _connect(DaemonSite(sizes, 5.0), Clock())
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"y" * (256 * 1024)
    for _ in range(4):
        channel.dataReceived(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    assert transport.value() == b""
    channel.dataReceived(b"1\r\nz\r\n")
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert not transport.disconnecting
    channel.dataReceived(b"%x\r\n%s\r\n0\r\n\r\n" % (len(chunk), chunk))
    assert transport.disconnecting
    channel.connectionLost(None)
    assert sizes.sizes == []


def test_body_at_the_limit_is_taken() -> None:
    """
    A body of exactly the limit, declared or chunked, reaches the resource.
    """
    sizes = _Sizes()
    site = DaemonSite(sizes, 5.0)
    channel, transport = _connect(site)
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % MAX_BODY
        + b"a" * MAX_BODY
    )
    assert transport.value().startswith(b"HTTP/1.1 200")
    channel, transport = _connect(site)
    half = b"b" * (MAX_BODY // 2)
    channel.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n" % (len(half), half) * 2
        + b"0\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 200")
    assert sizes.sizes == [MAX_BODY, MAX_BODY]


def test_mirror_refuses_large_bodies_in_the_registry_error_form() -> None:
    """
    dfpeer's port answers with the distribution spec's error body, which
    registry clients read.
    """
    channel, transport = _connect(MirrorSite(_Sizes(), timeout=5.0), Clock())
    channel.dataReceived(
        b"PUT /v2/x/blobs/uploads/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
    )
    reply = transport.value()
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert _reply_body(reply)["errors"][0]["code"] == "SIZE_INVALID"
    channel.connectionLost(None)


def test_a_trickled_body_is_cut_off_at_the_request_deadline() -> None:
    """
    The deadline covers the body too: a body sent a byte a second, each
    byte restarting Twisted's idle timeout, is cut off when the request
    as a whole has taken the site's timeout; a body that arrives in time
    is served, and the next request on the connection gets a deadline of
    its own.
    """
    clock = Clock()
    sizes = _Sizes()
    site = DaemonSite(sizes, 5.0)

    def trickle(length: int) -> tuple[Any, StringTransport]:
        # Headers declaring C{length} bytes, then a byte a second, 4 times.
        channel, transport = _connect(site, clock)
        channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
            % length
        )
        for _ in range(4):
            clock.advance(1.0)
            channel.dataReceived(b"t")
        return channel, transport

    channel, transport = trickle(100)
    assert not transport.disconnecting
    clock.advance(1.0)
    assert transport.disconnecting
    channel.connectionLost(None)
    assert sizes.sizes == []

    channel, transport = trickle(4)
    assert transport.value().startswith(b"HTTP/1.1 200")
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
    channel.connectionLost(None)
    assert sizes.sizes == [4]
