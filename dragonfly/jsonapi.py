"""
A small base for the JSON HTTP APIs of the supernode and dfpeer.

Handlers are C{async def}s taking the request and the path segments after
the route's prefix and returning a JSON-able value; errors become JSON
bodies C{{"error": ..., "message": ...}} with a fitting status.  A client that
hangs up cancels its handler.
"""

import json
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.httpserver import MAX_BODY

Handler = Callable[[Request, list[str]], Awaitable[Any]]


class ApiError(Exception):
    """
    An error with an HTTP status and a machine-readable code.
    """

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def read_json(request: Request) -> dict[str, Any]:
    """
    The request's JSON object body.

    @raise ApiError: 413 when too large, 400 when not a JSON object.
    """
    length = request.getHeader("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
        raise ApiError(413, "too_large", f"request body over {MAX_BODY} bytes")
    assert request.content is not None
    raw = request.content.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise ApiError(413, "too_large", f"request body over {MAX_BODY} bytes")
    try:
        body = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "bad_json", f"body is not JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "body must be a JSON object")
    return body


def field(body: dict[str, Any], name: str, kind: type, default: Any = ...) -> Any:
    """
    A typed field of a JSON object.

    @raise ApiError: 400 naming the field when it is missing or mistyped.
    """
    if name not in body or body[name] is None:
        if default is ...:
            raise ApiError(400, "bad_request", f"missing field {name!r}")
        return default
    value = body[name]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(
            400, "bad_request", f"field {name!r} must be of type {kind.__name__}"
        )
    return value


def write_json(request: Request, status: int, value: Any) -> None:
    body = json.dumps(value).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader("content-type", "application/json")
    request.setHeader("content-length", str(len(body)))
    request.write(body)
    request.finish()


class JsonApi(Resource):
    """
    Routes C{(method, path prefix)} to handlers.

    A route's prefix is a tuple of path segments, where C{"*"} matches any one
    segment; the handler receives the matched wildcards.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._routes: list[tuple[bytes, tuple[str, ...], Handler]] = []

    def route(self, method: bytes, pattern: tuple[str, ...], handler: Handler) -> None:
        self._routes.append((method, pattern, handler))

    def _match(self, request: Request) -> tuple[Handler, list[str]] | None:
        path = [
            segment.decode("utf-8", "replace") for segment in request.postpath or []
        ]
        if path and path[-1] == "":
            path = path[:-1]
        method_mismatch = False
        for method, pattern, handler in self._routes:
            if len(pattern) != len(path):
                continue
            if not all(p in ("*", s) for p, s in zip(pattern, path, strict=True)):
                continue
            if method != request.method and not (
                method == b"GET" and request.method == b"HEAD"
            ):
                method_mismatch = True
                continue
            return handler, [s for p, s in zip(pattern, path, strict=True) if p == "*"]
        if method_mismatch:
            raise ApiError(405, "method_not_allowed", "method not allowed here")
        return None

    def render(self, request: Request) -> Any:
        try:
            found = self._match(request)
        except ApiError as e:
            write_json(request, e.status, {"error": e.code, "message": e.message})
            return NOT_DONE_YET
        if found is None:
            write_json(
                request, 404, {"error": "not_found", "message": "no such endpoint"}
            )
            return NOT_DONE_YET
        handler, params = found
        d = Deferred.fromCoroutine(self._run(handler, request, params))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _run(self, handler: Handler, request: Request, params: list[str]) -> None:
        try:
            result = await handler(request, params)
        except CancelledError:
            return
        except ApiError as e:
            self._reply(
                request, e.status, {"error": e.code, "message": e.message, **e.extra}
            )
            return
        except Exception:
            self._log.failure(
                "handling {method} {uri}",
                Failure(),
                method=request.method,
                uri=request.uri,
            )
            self._reply(
                request, 500, {"error": "internal", "message": "internal error"}
            )
            return
        if result is NOT_DONE_YET:
            return
        self._reply(request, 200, result)

    def _reply(self, request: Request, status: int, value: Any) -> None:
        if request.finished or request._disconnected:
            return
        write_json(request, status, value)
