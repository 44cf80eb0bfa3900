"""
The daemons' HTTP servers: a site whose connections get a deadline for
each request's headers, not only an idle timeout.

Twisted's idle timeout restarts with every byte received, so a client
trickling a request line a byte at a time (slow loris) would hold its
connection for hours.  Here the clock for a request's headers starts when
the connection opens or the previous response ends, and runs out after the
same C{timeout}, however the bytes trickle in.  Request bodies stay under
the idle timeout only: a large upload through the forward proxy may take
longer than any fixed deadline.

The sites write no access log and never parse request bodies as HTML
forms.  Both cost every request time on the reactor thread (a formatted
line through the log observers; a MIME parse of the content type), and at
the rate of a large swarm's scheduling calls that was a tenth of the
supernode's CPU; the daemons' bodies are JSON or bytes passed through, and
their logs record what happens to tasks and pieces, not each request.
"""

import inspect
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

# Idle connections, and requests whose headers have not all arrived, are
# closed after this many seconds.
HTTP_TIMEOUT = 60.0

# Twisted < 25.5 always parses POSTed forms: nothing to turn off there.
_FORMS_OPTIONAL = "parsePOSTFormSubmission" in inspect.signature(Site).parameters


class DeadlineChannel(HTTPChannel):
    """
    An HTTP channel closed when a request's headers take longer than its
    C{timeOut} to arrive.
    """

    _header_deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def allHeadersReceived(self) -> None:
        self._stop_deadline()
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        # Started before the next pipelined request is parsed, which stops
        # it again when its headers are all there.
        self._start_deadline()
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_deadline()
        super().connectionLost(reason)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        if self.timeOut:
            self._header_deadline = self.callLater(self.timeOut, self._too_slow)

    def _stop_deadline(self) -> None:
        if self._header_deadline is not None and self._header_deadline.active():
            self._header_deadline.cancel()
        self._header_deadline = None

    def _too_slow(self) -> None:
        self._header_deadline = None
        self.timeoutConnection()


class DaemonSite(Site):
    """
    A site of L{DeadlineChannel}s closing idle or too slow connections after
    C{timeout} seconds.
    """

    protocol = DeadlineChannel  # type: ignore[assignment]

    def __init__(self, resource: Resource, timeout: float = HTTP_TIMEOUT) -> None:
        options: dict[str, Any] = {"timeout": timeout}
        if _FORMS_OPTIONAL:
            options["parsePOSTFormSubmission"] = False
        super().__init__(resource, **options)

    def log(self, request: Any) -> None:
        """
        Write no access line (see the module's docstring).
        """
