"""
Small server-side resources shared by the daemons' HTTP trees.

They exist so that C{twisted.web.static} is never imported: importing it
builds Twisted's deprecated unescaped error pages (a DeprecationWarning in
every process that serves), and a plain L{Resource} answers unknown paths
with one of them.  Here unknown paths get the JSON 404 the APIs use.
"""

import json
from typing import IO

from twisted.internet.interfaces import IPullProducer
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer


def _error(request: IRequest, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": code, "message": message}).encode("utf-8")


class NotFound(Resource):
    """
    A JSON 404 for any path and method, as the APIs' own.
    """

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        return _error(request, 404, "not_found", "no such endpoint")


class ReadOnly(Resource):
    """
    A base for resources served to C{GET} and C{HEAD} only: other methods
    get a JSON 405, where a plain L{Resource} would build Twisted's
    deprecated unescaped error page.
    """

    def render(self, request: IRequest) -> bytes | int:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _error(request, 405, "method_not_allowed", "method not allowed here")
        return super().render(request)  # type: ignore[no-any-return]


class Root(Resource):
    """
    The top of a daemon's tree: its children, and L{NotFound} elsewhere.
    """

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        return NotFound()


class PlainText(ReadOnly):
    """
    A fixed C{text/plain} body for C{GET} and C{HEAD}.
    """

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self._body = body

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self._body


@implementer(IPullProducer)
class FileBody:
    """
    Streams an open file as a response body, a chunk each time the
    connection takes one, and finishes the request at its end.  The file is
    closed at the end or when the client goes away.
    """

    CHUNK = 1 << 16

    def __init__(self, request: Request, stream: IO[bytes]) -> None:
        self._request = request
        self._stream = stream

    def start(self) -> None:
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self._stream.closed:
            return
        data = self._stream.read(self.CHUNK)
        if data:
            self._request.write(data)
            return
        self._stream.close()
        self._request.unregisterProducer()
        self._request.finish()

    def stopProducing(self) -> None:
        self._stream.close()
