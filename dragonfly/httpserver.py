"""
The daemons' HTTP servers: a site whose connections get a deadline for
each whole request, not only an idle timeout.

Twisted's idle timeout restarts with every byte received, so a client
trickling a request a byte at a time (slow loris) would hold its
connection for hours.  Here the clock for a request starts when the
connection opens or the previous response ends, and runs out after the
same C{timeout} unless the request's headers and body are all in, however
the bytes trickle.  Bodies are small (below), so one deadline fits both:
1 MiB in 60 s is 17 KiB/s.

Request bodies are bounded before they are stored (L{MAX_BODY}): Twisted
would otherwise keep any body a client sends, in memory or in a temporary
file, before a handler could look at its size.  A declared length over the
limit is refused as soon as the headers are in, with no C{100 Continue}; a
chunked body at the chunk that crosses it.  The refusal is a C{413} with a
JSON body; no route of these daemons takes a body larger than a JSON
request.  The connection is then closed, but not at once: a client still
sending its body would get a reset instead of the answer (closing a socket
with unread data resets it, which also drops what the client had not read
yet).  So the rest of the body is read and thrown away, for at most
L{LINGER_SECONDS} and L{LINGER_BYTES}, and the connection is closed when
the body is all in (the client then reads the answer) or either bound is
reached.

The sites write no access log and never parse request bodies as HTML
forms.  Both cost every request time on the reactor thread (a formatted
line through the log observers; a MIME parse of the content type), and at
the rate of a large swarm's scheduling calls that was a tenth of the
supernode's CPU; the daemons' bodies are JSON or bytes passed through, and
their logs record what happens to tasks and pieces, not each request.
"""

import inspect
import json
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

# Idle connections, and requests that have not all arrived, are
# closed after this many seconds.
HTTP_TIMEOUT = 60.0

# The largest request body the daemons take (the JSON API's requests).
MAX_BODY = 1 << 20

# After refusing a body: how long, and how much more of it, to read and
# throw away before the connection is closed anyway.
LINGER_SECONDS = 5.0
LINGER_BYTES = 4 * MAX_BODY

# Twisted < 25.5 always parses POSTed forms: nothing to turn off there.
_FORMS_OPTIONAL = "parsePOSTFormSubmission" in inspect.signature(Site).parameters


class BoundedRequest(Request):
    """
    A request that stops taking in its body once the body is over
    L{MAX_BODY}: it answers C{413}, throws the rest of the body away and
    closes the connection (see the module's docstring).
    """

    _body_bytes = 0
    _refused = False
    _linger: IDelayedCall | None = None

    def refuse_body(self) -> None:
        """
        Answer C{413} straight on the transport, and close the connection
        once the body is in or the linger bounds are reached.

        Twisted parses no request of a connection while one is being
        answered, so nothing else is being written on it now.
        """
        self._refused = True
        self._body_bytes = 0
        self.content = BytesIO()
        channel: Any = self.channel
        body = channel.site.body_refusal(f"request body over {MAX_BODY} bytes")
        channel.transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
        )
        self._linger = channel.callLater(LINGER_SECONDS, self._close)

    def _close(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            # Sends what was written (the 413) first.
            transport.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._refused:
            if self._body_bytes > LINGER_BYTES:
                self._close()
            return
        if self._body_bytes > MAX_BODY:
            self.refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # The whole body is in: the client now reads the answer.
            self._close()
            return
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        super().connectionLost(reason)


class DeadlineChannel(HTTPChannel):
    """
    An HTTP channel closed when a request (headers and body) takes longer
    than its C{timeOut} to arrive.
    """

    _request_deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def allHeadersReceived(self) -> None:
        request = self.requests[-1]
        if (
            isinstance(request, BoundedRequest)
            and self.length is not None
            and self.length > MAX_BODY
        ):
            request.refuse_body()
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        self._stop_deadline()
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Started before the next pipelined request is parsed, which stops
        # it again when it has all arrived.
        self._start_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        if self.timeOut:
            self._request_deadline = self.callLater(self.timeOut, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._request_deadline is not None and self._request_deadline.active():
            self._request_deadline.cancel()
        self._request_deadline = None

    def _too_slow(self) -> None:
        self._request_deadline = None
        self.timeoutConnection()


class DaemonSite(Site):
    """
    A site of L{DeadlineChannel}s closing idle or too slow connections after
    C{timeout} seconds.
    """

    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, timeout: float = HTTP_TIMEOUT) -> None:
        options: dict[str, Any] = {"timeout": timeout, "requestFactory": BoundedRequest}
        if _FORMS_OPTIONAL:
            options["parsePOSTFormSubmission"] = False
        super().__init__(resource, **options)

    def body_refusal(self, message: str) -> bytes:
        """
        The JSON body of the C{413} for a request body over L{MAX_BODY}, in
        the form of the site's other errors.
        """
        return json.dumps({"error": "too_large", "message": message}).encode()

    def log(self, request: Any) -> None:
        """
        Write no access line (see the module's docstring).
        """
