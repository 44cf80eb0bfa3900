"""
The daemons' HTTP site: no access log line per request, no form parsing of
request bodies.
"""

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request

from dragonfly import httpserver
from dragonfly.httpserver import DaemonSite


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
