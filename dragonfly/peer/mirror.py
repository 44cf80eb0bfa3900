"""
dfpeer's registry mirror: the pull side of the OCI distribution API, served
as a mirror of an upstream registry, with image layers going through the
swarm.

Design
======
  - Blobs (C{GET /v2/<name>/blobs/sha256:<hex>}) are P2P tasks named by
    their digest alone, so a layer is one task whatever repository, mirror
    or registry names it.  The body streams to the client in order as the
    pieces arrive (the client does not wait for the whole layer); the
    sha256 of what was sent is checked against the digest before the last
    chunk goes out, and on a mismatch the connection is aborted, so a client
    never receives a complete wrong body.
  - Everything else (C{/v2/}, manifests, tags, referrers, C{HEAD} of blobs)
    is forwarded to the upstream and streamed back under backpressure, with
    every header kept except the hop-by-hop ones.
  - Upstream authentication: the client's credentials go upstream as they
    are, for forwarded requests and for the supernode's fetch of a blob.  A
    client that sends none for a blob (the registry answers 401 with a
    Bearer challenge) gets an anonymous pull token fetched by dfpeer.
  - The upstream is C{--registry}, or one named by containerd's C{?ns=}
    parameter or an C{X-Dragonfly-Registry} header, if it is allowed.
"""

import json
import re
from typing import Any
from urllib.parse import urlencode, urlsplit

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from dragonfly.http import (
    HOP_BY_HOP,
    as_text,
    end_to_end_headers,
)
from dragonfly.httpserver import HTTP_TIMEOUT, DaemonSite, DeadlineChannel
from dragonfly.metrics import PeerMetrics
from dragonfly.peer.engine import DownloadError, DownloadRequest, PeerEngine
from dragonfly.registry_auth import (
    bearer_challenge,
    pull_scope,
    request_token,
)
from dragonfly.tasks import task_id_for

_NAME = (
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_BLOB = re.compile(rf"^/v2/(?P<name>{_NAME})/blobs/(?P<digest>sha256:[0-9a-f]{{64}})$")
_PATH = re.compile(
    rf"^/v2/(?:(?P<name>{_NAME})/(?:manifests|blobs|tags|referrers)/[A-Za-z0-9_][A-Za-z0-9_.:+-]*"
    rf"|(?P<name2>{_NAME})/tags/list)?/?$"
)
_CHUNK = 256 * 1024
# How long "this repository needs no token" is believed.
ANONYMOUS_RECHECK = 60.0
# containerd names Docker Hub "docker.io"; the registry answers at these.
_HUB_HOSTS = {"registry-1.docker.io", "index.docker.io"}


def registry_error(request: Request, status: int, code: str, message: str) -> None:
    """
    Answer with the distribution spec's error body.
    """
    body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def _header(headers: Headers, name: bytes) -> str:
    values = headers.getRawHeaders(name)
    return values[0].decode("latin-1") if values else ""


def parse_range(header: str, length: int) -> tuple[int, int] | None:
    """
    The C{[start, end)} of a single-range C{Range} header, C{None} when the
    header asks for the whole body.

    @raise ValueError: if the range cannot be satisfied.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip() != "bytes" or "," in spec:
        return None
    first, _, last = spec.strip().partition("-")
    if not first:
        if not last.isdigit() or int(last) == 0:
            raise ValueError(header)
        return max(0, length - int(last)), length
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last) + 1, length) if last else length
    if start >= length or end <= start:
        raise ValueError(header)
    return start, end


@implementer(IPushProducer)
class _Flow:
    """
    Tracks whether the client is reading, for a body written from a loop.
    """

    def __init__(self) -> None:
        self._resumed: Deferred[None] | None = None
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            resumed.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    def writable(self) -> "Deferred[None]":
        if not self.paused:
            return succeed(None)
        self._resumed = Deferred()
        return self._resumed


def client_headers(request: Request) -> Headers:
    """
    The request's headers to send upstream.
    """
    return end_to_end_headers(
        request.requestHeaders, frozenset({b"x-dragonfly-registry"})
    )


async def forward(
    agent: IAgent,
    reactor: Any,
    request: Request,
    url: str,
    timeout: float,
    headers: Headers,
) -> None:
    """
    Send C{request} to C{url} and stream the answer back as it is (status,
    headers but the hop-by-hop ones, body under backpressure).
    """
    asking = agent.request(request.method, url.encode("ascii"), headers, None)
    asking.addTimeout(timeout, reactor)
    try:
        response: IResponse = await asking
    except CancelledError:
        raise
    except DeferredTimeout:
        registry_error(request, 504, "UNAVAILABLE", "upstream timed out")
        return
    except Exception as e:
        _log.warn("upstream {url} failed: {error}", url=url, error=e)
        registry_error(request, 502, "UNAVAILABLE", f"upstream: {e}")
        return
    request.setResponseCode(response.code)
    for name, values in response.headers.getAllRawHeaders():
        if name.lower() not in HOP_BY_HOP:
            request.responseHeaders.setRawHeaders(name, list(values))
    if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD":
        # Twisted's client takes Content-Length out of the headers (a
        # HEAD's stays in them).
        request.setHeader(b"content-length", str(response.length).encode())
    done: Deferred[None] = Deferred()
    response.deliverBody(_Relay(request, done))
    await done
    if not request.finished:
        request.finish()


_log = Logger()


def _kind_of(path: str) -> str:
    if _BLOB.match(path):
        return "blob"
    if "/manifests/" in path:
        return "manifest"
    return "other"


def count_requests(metrics: PeerMetrics, request: Request, kind: str) -> None:
    """
    Count C{request} by kind and status code once it has been answered (or
    the client left: the code is then the one it was about to get).
    """

    def count(_: object) -> None:
        metrics.mirror_requests.labels(kind=kind, code=str(request.code)).inc()

    request.notifyFinish().addBoth(count)


class _Relay(Protocol):
    """
    Copies an upstream body into the client's response; the upstream
    connection is the response's streaming producer, so a slow client slows
    the upstream.
    """

    def __init__(self, request: Request, done: "Deferred[None]") -> None:
        self._request = request
        self._done = done

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._request.unregisterProducer()
        self._done.callback(None)


class RegistryMirror(Resource):
    """
    The C{/v2/} tree of dfpeer's HTTP port.
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        engine: PeerEngine,
        upstream: str,
        agent: IAgent,
        http: Any,
        allowed: list[str] | None = None,
        timeout: float = 30.0,
        metrics: PeerMetrics | None = None,
    ) -> None:
        """
        @param agent: forwards requests untouched (no redirects followed, no
            decoding), see L{dragonfly.http.raw_agent}.
        @param http: a treq client, for anonymous tokens.
        @param metrics: where requests are counted (the peer's).
        """
        super().__init__()
        self._metrics = metrics if metrics is not None else PeerMetrics()
        self._engine = engine
        self._agent = agent
        self._timeout = timeout
        self._upstream = upstream.rstrip("/")
        self._http = http
        self._allowed = {u.rstrip("/") for u in (allowed or [])} | {self._upstream}
        # "upstream name" -> (Authorization values, when to ask again).
        self._tokens: dict[str, tuple[list[str], float]] = {}

    def _upstream_for(self, request: Request) -> str:
        """
        Which registry this request is for.

        @raise ValueError: when it names one that is not allowed.
        """
        chosen = _header(request.requestHeaders, b"x-dragonfly-registry").rstrip("/")
        if chosen:
            if chosen not in self._allowed:
                raise ValueError(chosen)
            return chosen
        ns = (request.args or {}).get(b"ns", [b""])[0].decode("ascii", "replace")
        if not ns:
            return self._upstream
        hub = ns == "docker.io"
        for candidate in sorted(self._allowed):
            host = urlsplit(candidate).netloc
            if host == ns or (hub and host in _HUB_HOSTS):
                return candidate
        raise ValueError(ns)

    def render(self, request: Request) -> Any:
        path = request.path.decode("latin-1")
        count_requests(self._metrics, request, _kind_of(path))
        if request.method not in (b"GET", b"HEAD"):
            registry_error(request, 405, "UNSUPPORTED", "this mirror only serves pulls")
            return NOT_DONE_YET
        if not _PATH.match(path):
            registry_error(request, 404, "NAME_INVALID", f"not a registry path: {path}")
            return NOT_DONE_YET
        try:
            upstream = self._upstream_for(request)
        except ValueError as e:
            registry_error(request, 403, "DENIED", f"registry {e} is not mirrored here")
            return NOT_DONE_YET
        blob = _BLOB.match(path)
        if blob and request.method == b"GET":
            work = self._blob(request, upstream, blob["name"], blob["digest"])
        else:
            work = self._forward(request, upstream, path)
        d = Deferred.fromCoroutine(work)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _failed(self, failure: Failure, request: Request) -> None:
        if failure.check(CancelledError):
            return
        self._log.failure("mirror request {uri} failed", failure, uri=request.uri)
        if request.startedWriting:
            request.transport.abortConnection()  # type: ignore[union-attr]
        elif not request.finished:
            registry_error(request, 502, "UNAVAILABLE", "mirror error")

    # Forwarding -----------------------------------------------------------

    def _upstream_url(self, upstream: str, request: Request, path: str) -> str:
        query = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, values in (request.args or {}).items()
            if k != b"ns"
            for v in values
        ]
        return upstream + path + ("?" + urlencode(query) if query else "")

    async def _forward(self, request: Request, upstream: str, path: str) -> None:
        url = self._upstream_url(upstream, request, path)
        await forward(
            self._agent,
            self._engine.reactor,
            request,
            url,
            self._timeout,
            client_headers(request),
        )

    # Blobs through the swarm ----------------------------------------------

    async def _authorization(self, upstream: str, name: str, url: str) -> list[str]:
        """
        An anonymous pull token for C{name}, when the upstream asks for one.

        The answer is kept per upstream and repository: a token until shortly
        before it expires (a stale one would make the supernode's fetch fail
        with 401), and "none needed" for L{ANONYMOUS_RECHECK} seconds, which
        spares a C{HEAD} to the registry before every blob of an image.
        """
        key = f"{upstream} {name}"
        now = self._engine.reactor.seconds()
        cached = self._tokens.get(key)
        if cached is not None and now < cached[1]:
            return cached[0]
        response: IResponse = await self._http.head(url, timeout=self._timeout)
        challenge = bearer_challenge(response.headers) if response.code == 401 else {}
        if not challenge:
            self._tokens[key] = ([], now + ANONYMOUS_RECHECK)
            return []
        token = await request_token(
            self._http, challenge, pull_scope(name), timeout=self._timeout
        )
        # Asked again at half its life, so that a fetch given it has the other
        # half to start (and to resume with it after a dropped connection).
        keep = token.expires_in / 2
        authorization = [f"Bearer {token.value}"]
        if keep > 0:
            self._tokens[key] = (authorization, now + keep)
        else:
            self._tokens.pop(key, None)
        return authorization

    async def _blob(
        self, request: Request, upstream: str, name: str, digest: str
    ) -> None:
        url = f"{upstream}/v2/{name}/blobs/{digest}"
        headers: dict[str, list[str]] = {}
        authorization = request.requestHeaders.getRawHeaders(b"authorization")
        if authorization:
            headers["Authorization"] = [a.decode("latin-1") for a in authorization]
        else:
            try:
                token = await self._authorization(upstream, name, url)
            except CancelledError:
                raise
            except Exception as e:
                registry_error(request, 502, "UNAVAILABLE", f"upstream registry: {e}")
                return
            if token:
                headers["Authorization"] = token
        task_id = task_id_for(url, digest=digest)
        result = self._engine.download(
            DownloadRequest(url=url, headers=headers, digest=digest)
        )
        progress = self._engine.progress_of(task_id)
        try:
            with self._engine.using(task_id):
                await _BlobStream(
                    request, digest, f"blob {digest} of {name}", result, progress
                ).run()
        except BaseException:
            # A client that left (or a failed stream) withdraws its interest:
            # the download stops unless another request still wants it.
            result.cancel()
            raise


class _BlobStream:
    """
    One blob response, written as its bytes become available.
    """

    _log = Logger()

    def __init__(
        self,
        request: Request,
        digest: str,
        name: str,
        result: Deferred[Any],
        progress: Any,
    ) -> None:
        self._request = request
        self._digest = digest
        self._name = name
        self._result = result
        self._progress = progress
        self._outcome: Any = None
        result.addBoth(self._keep)

    def _keep(self, outcome: Any) -> None:
        self._outcome = outcome

    async def _length(self) -> int | None:
        while True:
            progress = self._progress
            if progress is not None and progress.length is not None:
                return int(progress.length)
            if self._outcome is not None:
                if isinstance(self._outcome, Failure):
                    return None
                return int(self._outcome.length)
            await self._next_event()

    def _next_event(self) -> "Deferred[None]":
        """
        Fires at the download's next progress or, once it has ended, when its
        outcome is known (an ended download makes no more progress: waiting
        on it would spin).
        """
        progress = self._progress
        if progress is not None and not progress.ended:
            changed: Deferred[None] = progress.changed()
            return changed
        if self._outcome is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._result.addBoth(lambda _: d.callback(None) if not d.called else None)
        return d

    async def run(self) -> None:
        request = self._request
        length = await self._length()
        if length is None:
            self._refuse(self._outcome)
            return
        try:
            window = parse_range(_header(request.requestHeaders, b"range"), length)
        except ValueError:
            request.setHeader(b"content-range", f"bytes */{length}".encode())
            registry_error(request, 416, "RANGE_INVALID", "range not satisfiable")
            return
        start, end = window if window else (0, length)
        request.setResponseCode(206 if window else 200)
        if window:
            request.setHeader(
                b"content-range", f"bytes {start}-{end - 1}/{length}".encode()
            )
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(end - start).encode())
        if self._digest:
            request.setHeader(b"docker-content-digest", self._digest.encode())
        request.setHeader(b"accept-ranges", b"bytes")
        request.setHeader(b"x-dragonfly-route", b"p2p")
        flow = _Flow()
        request.registerProducer(flow, True)
        try:
            await self._send(flow, start, end, whole=window is None)
        finally:
            if request.channel is not None:  # None once the client left
                request.unregisterProducer()
        if not flow.stopped and not request.finished:
            request.finish()
        outcome = self._outcome
        if outcome is not None and not isinstance(outcome, Failure):
            tiers = outcome.bytes_by_tier
            self._log.info(
                "{name}: {length} bytes, {peers} from peers, "
                "{supernode} from the supernode, {source} from the source",
                name=self._name,
                length=length,
                **tiers,
            )

    async def _send(self, flow: _Flow, start: int, end: int, whole: bool) -> None:
        # The engine checks a blob against its digest before a download
        # succeeds (each piece against the supernode's sha256, the whole
        # against the digest), so the last bytes of a whole body are held
        # until then: a client never sees a complete wrong body, and the
        # mirror does not hash every byte a second time on the reactor.
        hold_the_end = whole and bool(self._digest)
        offset = start
        while offset < end and not flow.stopped:
            progress = self._progress
            available = progress.contiguous() if progress is not None else 0
            if self._succeeded():
                available = end
                task_file = self._outcome.task_file
            elif progress is not None and progress.task_file is not None:
                task_file = progress.task_file
            else:
                task_file = None
            if isinstance(self._outcome, Failure) or (
                progress is not None
                and progress.ended
                and not progress.complete
                and available <= offset
            ):
                raise _Aborted(f"download of {self._digest} failed")
            if task_file is None or available <= offset:
                await self._next_event()
                continue
            size = min(_CHUNK, available - offset, end - offset)
            if hold_the_end and offset + size == end and not self._verified():
                await self._next_event()
                continue
            data = task_file.read(offset, size)
            if len(data) != size:
                raise _Aborted(f"{self._digest} shrank on disk")
            offset += size
            self._request.write(data)
            await flow.writable()

    def _succeeded(self) -> bool:
        return self._outcome is not None and not isinstance(self._outcome, Failure)

    def _verified(self) -> bool:
        """
        Whether the download succeeded, and so matched its digest.
        """
        progress = self._progress
        return self._succeeded() or (progress is not None and progress.complete)

    def _refuse(self, failure: Failure) -> None:
        error = failure.value
        request = self._request
        if isinstance(error, DownloadError):
            if error.kind == "source" and error.status in (401, 403, 404):
                code = {401: "UNAUTHORIZED", 403: "DENIED", 404: "BLOB_UNKNOWN"}[
                    error.status
                ]
                registry_error(request, error.status, code, error.message)
                return
            status = 504 if error.kind == "timeout" else 502
            registry_error(request, status, "UNAVAILABLE", error.message)
            return
        registry_error(request, 502, "UNAVAILABLE", failure.getErrorMessage())


class ForwardProxy(Resource):
    """
    dfpeer as a plain HTTP proxy (C{HTTP_PROXY=http://127.0.0.1:65001}):
    C{GET}s of URLs matching one of the rules (regular expressions, searched
    in the whole URL, first match wins) go through the swarm, everything else
    is forwarded as it is.  HTTPS (C{CONNECT}) is not proxied.
    """

    isLeaf = True

    def __init__(
        self,
        engine: PeerEngine,
        agent: IAgent,
        rules: list[str],
        timeout: float = 30.0,
        metrics: PeerMetrics | None = None,
    ) -> None:
        super().__init__()
        self._metrics = metrics if metrics is not None else PeerMetrics()
        self._engine = engine
        self._agent = agent
        self._rules = [re.compile(rule) for rule in rules]
        self._timeout = timeout

    def render(self, request: Request) -> Any:
        url = request.uri.decode("latin-1")
        count_requests(self._metrics, request, "proxy")
        if request.method not in (b"GET", b"HEAD"):
            registry_error(request, 405, "UNSUPPORTED", "only GET and HEAD are proxied")
            return NOT_DONE_YET
        headers = client_headers(request)
        for name in list(dict(headers.getAllRawHeaders())):
            if name.lower().startswith(b"proxy-"):
                headers.removeHeader(name)
        if request.method == b"GET" and any(rule.search(url) for rule in self._rules):
            work = self._through_swarm(request, url, headers)
        else:
            work = forward(
                self._agent, self._engine.reactor, request, url, self._timeout, headers
            )
        d = Deferred.fromCoroutine(work)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _through_swarm(
        self, request: Request, url: str, headers: Headers
    ) -> None:
        sent = as_text(
            end_to_end_headers(headers, frozenset({b"range", b"accept-encoding"}))
        )
        result = self._engine.download(DownloadRequest(url=url, headers=sent))
        task_id = task_id_for(url)
        progress = self._engine.progress_of(task_id)
        try:
            with self._engine.using(task_id):
                await _BlobStream(request, "", url, result, progress).run()
        except BaseException:
            result.cancel()
            raise


class PlainHTTPChannel(DeadlineChannel):
    """
    An HTTP channel that answers a TLS ClientHello at once.

    Clients told a mirror is "insecure" (podman, skopeo) first try HTTPS on
    the plain port; a silent server makes each of their pulls wait for their
    TLS handshake timeout (10 s) before they fall back to HTTP.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data:
            self._first = False
            if data[0] == 0x16:  # TLS handshake record
                self.transport.write(  # type: ignore[union-attr]
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
        super().dataReceived(data)


class MirrorSite(DaemonSite):
    """
    dfpeer's HTTP port: the local API and the registry mirror by path, and
    requests in proxy form (an absolute URI) to the forward proxy.
    """

    protocol = PlainHTTPChannel

    def __init__(
        self,
        resource: Resource,
        proxy: Resource | None = None,
        timeout: float = HTTP_TIMEOUT,
    ) -> None:
        super().__init__(resource, timeout)
        self._proxy = proxy

    def body_refusal(self, message: str) -> bytes:
        """
        The distribution spec's error body: registry clients read this form.
        """
        return json.dumps(
            {"errors": [{"code": "SIZE_INVALID", "message": message}]}
        ).encode()

    def getResourceFor(self, request: Request) -> Any:
        if request.uri.startswith((b"http://", b"https://")):
            request.site = self
            if self._proxy is None:
                return _NoProxy()
            return self._proxy
        return super().getResourceFor(request)


class _NoProxy(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        registry_error(request, 405, "UNSUPPORTED", "this dfpeer is not a proxy")
        return NOT_DONE_YET  # type: ignore[return-value]


class _Aborted(Exception):
    """
    The body cannot be completed correctly: the connection must be dropped.
    """
