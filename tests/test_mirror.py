"""
dfpeer's registry mirror (L{dragonfly.peer.mirror.RegistryMirror}) in
memory: no sockets at all.

The client and the upstream registry are both L{treq.testing} in-memory
HTTP connections: the test's client talks to the mirror through a
L{RequestTraversalAgent}, and the mirror's raw agent (and its treq client
for tokens) talk to an in-test L{Upstream} resource playing the registry
and its token realm.  The P2P engine is a L{FakeEngine} with the interface
the mirror uses (C{download}, C{progress_of}, C{reactor}), driven by the
test piece by piece; the real engine is exercised in
C{test_mirror_e2e.py}.
"""

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from treq.content import content as read_content
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from dragonfly.metrics import PeerMetrics
from dragonfly.peer.engine import DownloadError, DownloadRequest, DownloadResult
from dragonfly.peer.mirror import (
    PlainHTTPChannel,
    RegistryMirror,
    parse_range,
)
from dragonfly.registry_auth import parse_challenge
from dragonfly.tasks import task_id_for

UPSTREAM = "http://registry.test"
OTHER = "http://other.test:5000"
HUB = "https://registry-1.docker.io"
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"


# The upstream registry -----------------------------------------------------------


@dataclass
class Seen:
    """
    One request the upstream received.
    """

    method: bytes
    uri: bytes
    path: bytes
    headers: Headers
    host: bytes


@dataclass
class Canned:
    """
    What the upstream answers for one path: status, headers (a name may
    repeat), body; C{declare} overrides Content-Length and C{cut} closes the
    connection after the body (for truncated bodies).
    """

    status: int = 200
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    declare: int | None = None
    cut: bool = False


class Upstream(Resource):
    """
    The upstream registry and its token realm, answering from C{routes}
    (path -> L{Canned}); anything else is a registry 404.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.routes: dict[bytes, Canned] = {}

    def render(self, request: Request) -> Any:
        self.seen.append(
            Seen(
                request.method,
                request.uri,
                request.path,
                request.requestHeaders.copy(),
                request.getHeader(b"host") or b"",
            )
        )
        canned = self.routes.get(request.path)
        if canned is None:
            canned = Canned(
                404,
                [(b"Content-Type", b"application/json")],
                b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}',
            )
        request.setResponseCode(canned.status)
        for name, value in canned.headers:
            request.responseHeaders.addRawHeader(name, value)
        length = canned.declare if canned.declare is not None else len(canned.body)
        request.setHeader(b"content-length", str(length).encode())
        if request.method == b"HEAD":
            return b""
        request.write(canned.body)
        if canned.cut:
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        request.finish()
        return NOT_DONE_YET


# The P2P engine ------------------------------------------------------------------


class FakeTaskFile:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, offset: int, size: int) -> bytes:
        return self.data[offset : offset + size]


class FakeProgress:
    """
    A download under way, as the mirror follows it: its length, the task
    file and how much of it is contiguous and verified.
    """

    def __init__(self) -> None:
        self.length: int | None = None
        self.task_file: FakeTaskFile | None = None
        self.ended = False
        self.complete = False
        self.held = 0
        self._watchers: list[Deferred[None]] = []

    def changed(self) -> "Deferred[None]":
        if self.ended:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._watchers.append(d)
        return d

    def contiguous(self) -> int:
        return self.held

    def notify(self) -> None:
        watchers, self._watchers = self._watchers, []
        for d in watchers:
            d.callback(None)


class FakeEngine:
    """
    The part of L{dragonfly.peer.engine.PeerEngine} the mirror uses; each
    download is a Deferred the test fires.
    """

    def __init__(self) -> None:
        self.reactor = Clock()
        self.requests: list[DownloadRequest] = []
        self.results: list[Deferred[DownloadResult]] = []
        self.cancelled: list[DownloadRequest] = []
        self.asked: list[str] = []
        self.progress: FakeProgress | None = None
        self.in_use: list[str] = []

    def download(self, request: DownloadRequest) -> "Deferred[DownloadResult]":
        self.requests.append(request)
        d: Deferred[DownloadResult] = Deferred(lambda _: self.cancelled.append(request))
        self.results.append(d)
        return d

    def progress_of(self, task_id: str) -> FakeProgress | None:
        self.asked.append(task_id)
        return self.progress

    @contextmanager
    def using(self, task_id: str) -> Iterator[None]:
        self.in_use.append(task_id)
        try:
            yield
        finally:
            self.in_use.remove(task_id)


def result_for(data: bytes, digest: str) -> DownloadResult:
    return DownloadResult(
        task_id_for("", digest=digest),
        FakeTaskFile(data),  # type: ignore[arg-type]
        len(data),
        hashlib.sha256(data).hexdigest(),
        {"peers": len(data), "supernode": 0, "source": 0},
        {"peers": 1, "supernode": 0, "source": 0},
        0.1,
    )


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# The harness ---------------------------------------------------------------------


@implementer(IAgent)
class RefusingAgent:
    """
    An upstream that cannot be reached.
    """

    def __init__(self) -> None:
        self.calls = 0

    def request(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        self.calls += 1
        return fail(ConnectionRefusedError("connection refused"))


@implementer(IAgent)
class SilentAgent:
    """
    An upstream that accepts and never answers.
    """

    def __init__(self) -> None:
        self.pending: list[Deferred[Any]] = []

    def request(self, *args: Any, **kwargs: Any) -> "Deferred[Any]":
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d


class Harness:
    """
    A client -> mirror -> upstream chain in memory.
    """

    def __init__(
        self,
        allowed: list[str] | None = None,
        agent: Any = None,
        upstream_url: str = UPSTREAM,
    ) -> None:
        self.upstream = Upstream()
        self.raw = RequestTraversalAgent(self.upstream)
        self.http = StubTreq(self.upstream)
        self.engine = FakeEngine()
        self.metrics = PeerMetrics()
        self.mirror = RegistryMirror(
            self.engine,  # type: ignore[arg-type]
            upstream_url,
            agent if agent is not None else self.raw,
            self.http,
            allowed=allowed,
            timeout=5.0,
            metrics=self.metrics,
        )
        self.client = RequestTraversalAgent(self.mirror)

    def pump(self, rounds: int = 30) -> None:
        for _ in range(rounds):
            self.raw.flush()
            self.http.flush()
            self.client.flush()

    def wait(self, d: "Deferred[Any]") -> Any:
        """
        Pump until C{d} fires (bounded), and return its result.
        """
        box: list[Any] = []
        d.addBoth(box.append)
        for _ in range(200):
            if box:
                break
            self.pump(1)
        assert box, "no answer"
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    def get(
        self,
        path: str,
        headers: dict[bytes, list[bytes]] | None = None,
        method: bytes = b"GET",
    ) -> tuple[Any, bytes]:
        response = self.wait(
            self.client.request(
                method, b"http://dfpeer.test" + path.encode(), Headers(headers or {})
            )
        )
        body = self.wait(read_content(response))
        return response, body


def error_code(body: bytes) -> str:
    errors = json.loads(body)["errors"]
    assert len(errors) == 1 and errors[0]["message"], errors
    return str(errors[0]["code"])


@pytest.fixture
def harness() -> Harness:
    return Harness()


# Forwarding ----------------------------------------------------------------------


def test_v2_status_and_headers_pass_back(harness: Harness) -> None:
    """
    C{GET /v2/} is forwarded: the upstream's 401, its WWW-Authenticate
    challenge (repeated: two lines stay two lines), its own headers and its
    body come back unchanged.
    """
    challenge = b'Bearer realm="http://registry.test/token",service="registry.test"'
    harness.upstream.routes[b"/v2/"] = Canned(
        401,
        [
            (b"WWW-Authenticate", challenge),
            (b"WWW-Authenticate", b'Basic realm="registry"'),
            (b"Docker-Distribution-Api-Version", b"registry/2.0"),
            (b"Content-Type", b"application/json"),
        ],
        b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
    )
    response, body = harness.get("/v2/")
    assert response.code == 401
    assert response.headers.getRawHeaders(b"www-authenticate") == [
        challenge,
        b'Basic realm="registry"',
    ]
    assert response.headers.getRawHeaders(b"docker-distribution-api-version") == [
        b"registry/2.0"
    ]
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert error_code(body) == "UNAUTHORIZED"
    assert [(s.method, s.uri) for s in harness.upstream.seen] == [(b"GET", b"/v2/")]


def test_manifest_headers_and_length_pass_back(harness: Harness) -> None:
    """
    A manifest GET comes back with the upstream's Docker-Content-Digest,
    Content-Type and Content-Length, and the exact bytes.
    """
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE}).encode()
    harness.upstream.routes[b"/v2/library/alpine/manifests/3.19"] = Canned(
        200,
        [
            (b"Content-Type", MANIFEST_TYPE.encode()),
            (b"Docker-Content-Digest", digest_of(manifest).encode()),
            (b"Etag", b'"' + digest_of(manifest).encode() + b'"'),
        ],
        manifest,
    )
    response, body = harness.get("/v2/library/alpine/manifests/3.19")
    assert response.code == 200
    assert body == manifest
    assert response.length == len(manifest)
    assert response.headers.getRawHeaders(b"content-type") == [MANIFEST_TYPE.encode()]
    assert response.headers.getRawHeaders(b"docker-content-digest") == [
        digest_of(manifest).encode()
    ]
    assert response.headers.getRawHeaders(b"etag") == [
        b'"' + digest_of(manifest).encode() + b'"'
    ]


def test_request_headers_forwarded_hop_by_hop_dropped(harness: Harness) -> None:
    """
    The client's headers go upstream as they are (repeated Accept lines
    stay separate lines, in order; Authorization and User-Agent kept);
    hop-by-hop ones, Host and X-Dragonfly-Registry are not forwarded; the
    upstream sees its own host.
    """
    harness.upstream.routes[b"/v2/library/alpine/manifests/latest"] = Canned(
        200, [(b"Content-Type", MANIFEST_TYPE.encode())], b"{}"
    )
    accepts = [
        MANIFEST_TYPE.encode(),
        b"application/vnd.oci.image.index.v1+json",
        b"application/vnd.oci.image.manifest.v1+json",
    ]
    response, _ = harness.get(
        "/v2/library/alpine/manifests/latest",
        {
            b"Accept": accepts,
            b"Authorization": [b"Bearer abc"],
            b"User-Agent": [b"docker/24.0.7"],
            b"Connection": [b"keep-alive"],
            b"Keep-Alive": [b"timeout=5"],
            b"Proxy-Authorization": [b"Basic secret"],
            b"TE": [b"trailers"],
            b"Upgrade": [b"h2c"],
            b"X-Dragonfly-Registry": [UPSTREAM.encode()],
        },
    )
    assert response.code == 200
    [seen] = harness.upstream.seen
    assert seen.headers.getRawHeaders(b"accept") == accepts
    assert seen.headers.getRawHeaders(b"authorization") == [b"Bearer abc"]
    assert seen.headers.getRawHeaders(b"user-agent") == [b"docker/24.0.7"]
    for name in (
        b"keep-alive",
        b"proxy-authorization",
        b"te",
        b"upgrade",
        b"x-dragonfly-registry",
    ):
        assert not seen.headers.hasHeader(name), name
    assert seen.host == b"registry.test"


def test_connection_listed_headers_dropped(harness: Harness) -> None:
    """
    A header the client names in C{Connection} is hop-by-hop too and is not
    forwarded.
    """
    harness.upstream.routes[b"/v2/"] = Canned(200, [], b"{}")
    harness.get(
        "/v2/", {b"Connection": [b"close, X-Hop"], b"X-Hop": [b"for the mirror only"]}
    )
    [seen] = harness.upstream.seen
    assert not seen.headers.hasHeader(b"x-hop")


def test_query_forwarded_without_ns(harness: Harness) -> None:
    """
    The query goes upstream (C{tags/list?n=&last=}), without containerd's
    C{ns}.
    """
    harness.upstream.routes[b"/v2/library/alpine/tags/list"] = Canned(
        200, [(b"Content-Type", b"application/json")], b'{"tags":["a"]}'
    )
    response, body = harness.get(
        "/v2/library/alpine/tags/list?n=10&last=a&ns=registry.test"
    )
    assert (response.code, body) == (200, b'{"tags":["a"]}')
    [seen] = harness.upstream.seen
    path, _, query = seen.uri.partition(b"?")
    assert path == b"/v2/library/alpine/tags/list"
    assert sorted(query.split(b"&")) == [b"last=a", b"n=10"]


def test_head_forwarded(harness: Harness) -> None:
    """
    HEAD of a manifest and of a blob goes upstream as HEAD (a blob HEAD is
    not a P2P download): status, Content-Length and digest come back, no
    body.
    """
    blob = b"x" * 1234
    digest = digest_of(blob)
    harness.upstream.routes[f"/v2/library/alpine/blobs/{digest}".encode()] = Canned(
        200, [(b"Docker-Content-Digest", digest.encode())], blob
    )
    harness.upstream.routes[b"/v2/library/alpine/manifests/latest"] = Canned(
        200, [(b"Content-Type", MANIFEST_TYPE.encode())], b"{" + b" " * 99 + b"}"
    )
    response, body = harness.get(f"/v2/library/alpine/blobs/{digest}", method=b"HEAD")
    assert (response.code, body) == (200, b"")
    assert response.headers.getRawHeaders(b"content-length") == [b"1234"]
    assert response.headers.getRawHeaders(b"docker-content-digest") == [digest.encode()]
    response, body = harness.get("/v2/library/alpine/manifests/latest", method=b"HEAD")
    assert (response.code, body) == (200, b"")
    assert response.headers.getRawHeaders(b"content-length") == [b"101"]
    assert [s.method for s in harness.upstream.seen] == [b"HEAD", b"HEAD"]
    assert harness.engine.requests == []


def test_404_stays_404_with_upstream_body(harness: Harness) -> None:
    """
    An upstream 404 reaches the client as it was, body included.
    """
    response, body = harness.get("/v2/library/nothing/manifests/latest")
    assert response.code == 404
    assert body == b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"unknown"}]}'


def test_upstream_unreachable_is_502_registry_json() -> None:
    """
    An upstream that refuses connections: 502 with a registry-style
    C{UNAVAILABLE} error body.
    """
    agent = RefusingAgent()
    harness = Harness(agent=agent)
    response, body = harness.get("/v2/library/alpine/manifests/latest")
    assert response.code == 502
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert error_code(body) == "UNAVAILABLE"
    assert agent.calls == 1


def test_upstream_silent_is_504_after_timeout() -> None:
    """
    An upstream that never answers: after the mirror's timeout the client
    gets 504 C{UNAVAILABLE} (and not before).
    """
    agent = SilentAgent()
    harness = Harness(agent=agent)
    d = harness.client.request(b"GET", b"http://dfpeer.test/v2/", Headers())
    box: list[Any] = []
    d.addBoth(box.append)
    harness.pump()
    harness.engine.reactor.advance(4.9)
    harness.pump()
    assert box == []
    harness.engine.reactor.advance(0.2)
    harness.pump()
    assert len(box) == 1
    response = box[0]
    body = harness.wait(read_content(response))
    assert response.code == 504
    assert error_code(body) == "UNAVAILABLE"


def test_truncated_upstream_body_aborts_client(harness: Harness) -> None:
    """
    When the upstream's connection drops mid-body, the client does not
    get a response that looks complete: its body read fails.
    """
    harness.upstream.routes[b"/v2/library/alpine/manifests/latest"] = Canned(
        200, [], b"x" * 10, declare=100, cut=True
    )
    response = harness.wait(
        harness.client.request(
            b"GET", b"http://dfpeer.test/v2/library/alpine/manifests/latest"
        )
    )
    assert response.code == 200
    box: list[Any] = []
    read_content(response).addBoth(box.append)
    harness.pump(100)
    assert box and isinstance(box[0], Failure), box


@pytest.mark.parametrize("method", [b"PUT", b"POST", b"DELETE", b"PATCH"])
def test_writes_are_405_unsupported(harness: Harness, method: bytes) -> None:
    """
    The mirror only serves pulls: anything but GET/HEAD is 405
    C{UNSUPPORTED}, and nothing goes upstream.
    """
    response, body = harness.get("/v2/library/alpine/manifests/latest", method=method)
    assert response.code == 405
    assert error_code(body) == "UNSUPPORTED"
    assert harness.upstream.seen == []


def plain_site(harness: Harness) -> Site:
    """
    A site serving the mirror alone over dfpeer's L{PlainHTTPChannel}.
    """
    site = Site(harness.mirror)
    site.protocol = PlainHTTPChannel  # type: ignore[assignment]
    return site


def raw_request(harness: Harness, request_line: bytes) -> bytes:
    """
    Send one raw request line to the mirror over its HTTP channel, and
    return what it wrote back.
    """
    channel = plain_site(harness).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(request_line + b"\r\nHost: dfpeer.test\r\n\r\n")
    harness.pump()
    channel.connectionLost(Failure(ConnectionRefusedError("done")))
    return transport.value()


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/../etc/passwd",
        b"/v2/library/../../x/manifests/latest",
        b"/v2/%2e%2e/%2e%2e/x/manifests/latest",
        b"/v2/library/%2E%2E/manifests/latest",
        b"/v2/library/alpine/manifests/%2e%2e%2f%2e%2e%2fsecret",
        b"http://evil.test/v2/library/alpine/manifests/latest",
        b"//evil.test/v2/",
        b"/v2/Library/Alpine/manifests/latest",
        b"/v3/",
        b"/v2/library/alpine/secrets/x",
    ],
)
def test_invalid_paths_are_404_name_invalid(harness: Harness, target: bytes) -> None:
    """
    Dot segments (plain or %-encoded), absolute-form targets and anything
    that is not a registry path: 404 C{NAME_INVALID}, nothing forwarded.
    """
    written = raw_request(harness, b"GET " + target + b" HTTP/1.1")
    assert written.startswith(b"HTTP/1.1 404 "), written
    assert b'"NAME_INVALID"' in written
    assert harness.upstream.seen == []
    assert harness.engine.requests == []


@pytest.mark.parametrize(
    "target",
    [
        b"/v2/library/alpine/manifests/..",
        b"/v2/library/alpine/tags/..",
        b"/v2/library/alpine/blobs/.",
    ],
)
def test_dot_references_are_404(harness: Harness, target: bytes) -> None:
    """
    A dot segment in the reference position is no tag or digest (a tag
    starts with a word character): 404 C{NAME_INVALID}, nothing forwarded.
    """
    written = raw_request(harness, b"GET " + target + b" HTTP/1.1")
    assert harness.upstream.seen == []
    assert written.startswith(b"HTTP/1.1 404 "), written
    assert b'"NAME_INVALID"' in written


def test_valid_names_are_forwarded(harness: Harness) -> None:
    """
    The counterpart of the above: multi-component names with the allowed
    separators, digests and tags with dots go through.
    """
    for path in (
        "/v2/a/b/c/manifests/v1.2.3",
        "/v2/my-org/my__repo.x/manifests/sha256:" + "a" * 64,
        "/v2/library/alpine/tags/list",
        "/v2/library/alpine/referrers/sha256:" + "b" * 64,
    ):
        response, _ = harness.get(path)
        assert response.code == 404  # the upstream's answer
    assert [s.path for s in harness.upstream.seen] == [
        b"/v2/a/b/c/manifests/v1.2.3",
        b"/v2/my-org/my__repo.x/manifests/sha256:" + b"a" * 64,
        b"/v2/library/alpine/tags/list",
        b"/v2/library/alpine/referrers/sha256:" + b"b" * 64,
    ]


# Choosing the upstream -----------------------------------------------------------


def test_ns_selects_an_allowed_upstream() -> None:
    """
    containerd's C{?ns=HOST} picks the allowed upstream with that host;
    C{ns=docker.io} picks Docker Hub's registry host; the C{ns} itself is
    not forwarded.  Without C{ns} the default upstream is used.
    """
    harness = Harness(allowed=[OTHER, HUB])
    harness.get("/v2/library/alpine/manifests/latest?ns=other.test:5000")
    harness.get("/v2/library/alpine/manifests/latest?ns=docker.io")
    harness.get("/v2/library/alpine/manifests/latest?ns=registry.test")
    harness.get("/v2/library/alpine/manifests/latest")
    assert [(s.host, s.uri) for s in harness.upstream.seen] == [
        (b"other.test:5000", b"/v2/library/alpine/manifests/latest"),
        (b"registry-1.docker.io", b"/v2/library/alpine/manifests/latest"),
        (b"registry.test", b"/v2/library/alpine/manifests/latest"),
        (b"registry.test", b"/v2/library/alpine/manifests/latest"),
    ]


def test_header_selects_an_allowed_upstream() -> None:
    """
    C{X-Dragonfly-Registry: URL} picks that upstream when it is allowed
    (a trailing slash does not matter).
    """
    harness = Harness(allowed=[OTHER])
    response, _ = harness.get(
        "/v2/library/alpine/manifests/latest",
        {b"X-Dragonfly-Registry": [OTHER.encode() + b"/"]},
    )
    assert response.code == 404
    [seen] = harness.upstream.seen
    assert seen.host == b"other.test:5000"


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("?ns=evil.test", {}),
        ("?ns=docker.io", {}),
        ("?ns=registry.test.evil.test", {}),
        ("", {b"X-Dragonfly-Registry": [b"http://evil.test"]}),
        ("", {b"X-Dragonfly-Registry": [b"http://registry.test.evil.test"]}),
    ],
)
def test_unknown_upstream_is_403_denied(
    query: str, headers: dict[bytes, list[bytes]]
) -> None:
    """
    An C{ns} or C{X-Dragonfly-Registry} naming a registry that is not
    allowed (Docker Hub included, when it is not configured): 403
    C{DENIED}, nothing forwarded or downloaded, for manifests and blobs.
    """
    harness = Harness(allowed=[OTHER])
    for path in (
        "/v2/library/alpine/manifests/latest",
        "/v2/library/alpine/blobs/sha256:" + "c" * 64,
    ):
        response, body = harness.get(path + query, headers)
        assert response.code == 403
        assert error_code(body) == "DENIED"
    assert harness.upstream.seen == []
    assert harness.engine.requests == []


# Blobs through the swarm ---------------------------------------------------------


def blob_request(harness: Harness, path: str, headers: dict[bytes, list[bytes]]) -> Any:
    """
    Start a GET of C{path}; the response Deferred, pumped once.
    """
    d = harness.client.request(
        b"GET", b"http://dfpeer.test" + path.encode(), Headers(headers)
    )
    harness.pump()
    return d


class Collect:
    """
    A body receiver keeping what arrived and how it ended.
    """

    def __init__(self) -> None:
        from twisted.internet.protocol import Protocol

        self.data = bytearray()
        self.ended: list[Failure] = []
        collect = self

        class _P(Protocol):
            def dataReceived(self, data: bytes) -> None:
                collect.data += data

            def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
                collect.ended.append(reason)

        self.protocol = _P()


def test_blob_streams_in_order_as_pieces_arrive(harness: Harness) -> None:
    """
    A blob GET is a P2P download of the blob's URL upstream with its digest
    (task named by the digest) and the client's Authorization; the body
    streams as the contiguous prefix grows, before the download is done,
    and ends with the whole blob, with the registry headers.
    """
    data = bytes(range(256)) * 4096 * 3  # 3 MiB
    digest = digest_of(data)
    progress = FakeProgress()
    harness.engine.progress = progress
    d = blob_request(
        harness,
        f"/v2/library/alpine/blobs/{digest}",
        {b"Authorization": [b"Bearer client-token"]},
    )
    [request] = harness.engine.requests
    assert request.url == f"{UPSTREAM}/v2/library/alpine/blobs/{digest}"
    assert request.digest == digest
    assert request.headers == {"Authorization": ["Bearer client-token"]}
    assert harness.engine.asked == [task_id_for(request.url, digest=digest)]
    assert harness.upstream.seen == []  # no token fetch: the client had one

    progress.length = len(data)
    progress.task_file = FakeTaskFile(data)
    progress.notify()
    harness.pump()
    # (The status line goes out with the first bytes of the body.)
    progress.held = 1 << 20
    progress.notify()
    response = harness.wait(d)
    assert response.code == 200
    assert response.length == len(data)
    assert response.headers.getRawHeaders(b"docker-content-digest") == [digest.encode()]
    assert response.headers.getRawHeaders(b"content-type") == [
        b"application/octet-stream"
    ]
    body = Collect()
    response.deliverBody(body.protocol)
    harness.pump()
    assert bytes(body.data) == data[: 1 << 20]
    harness.pump()
    assert bytes(body.data) == data[: 1 << 20]
    progress.held = 2 << 20
    progress.notify()
    harness.pump()
    assert bytes(body.data) == data[: 2 << 20]
    assert not body.ended
    # As the engine does: the end is notified, then the result is given.
    progress.held = len(data)
    progress.complete = progress.ended = True
    progress.notify()
    if not harness.engine.results[0].called:
        harness.engine.results[0].callback(result_for(data, digest))
    harness.pump()
    assert bytes(body.data) == data
    assert body.ended


def test_blob_already_done(harness: Harness) -> None:
    """
    A download that is already complete (no progress to follow) is sent
    whole.
    """
    data = b"layer" * 1000
    digest = digest_of(data)
    d = blob_request(
        harness, f"/v2/library/alpine/blobs/{digest}", {b"Authorization": [b"x"]}
    )
    harness.engine.results[0].callback(result_for(data, digest))
    response = harness.wait(d)
    assert response.code == 200
    assert harness.wait(read_content(response)) == data


def test_requests_counted_by_kind_and_code(harness: Harness) -> None:
    """
    Every answered request is counted in the peer's metrics by kind (blob,
    manifest, other) and the status code the client got; a blob streamed
    to a client is marked in use for the garbage collector while it is sent.
    """
    data = b"layer" * 1000
    digest = digest_of(data)
    d = blob_request(
        harness, f"/v2/library/alpine/blobs/{digest}", {b"Authorization": [b"x"]}
    )
    task_id = task_id_for(harness.engine.requests[0].url, digest=digest)
    assert harness.engine.in_use == [task_id]
    harness.engine.results[0].callback(result_for(data, digest))
    assert harness.wait(read_content(harness.wait(d))) == data
    assert harness.engine.in_use == []
    harness.upstream.routes[b"/v2/library/alpine/manifests/3.19"] = Canned(200)
    harness.get("/v2/library/alpine/manifests/3.19")
    harness.get("/v2/library/alpine/manifests/missing")
    harness.get("/v2/")
    harness.get("/v2/", method=b"PUT")
    counter = harness.metrics.mirror_requests
    counts = {
        (s.labels["kind"], s.labels["code"]): s.value
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    }
    assert counts == {
        ("blob", "200"): 1,
        ("manifest", "200"): 1,
        ("manifest", "404"): 1,
        ("other", "404"): 1,
        ("other", "405"): 1,
    }


def test_blob_end_waits_for_the_verified_download(harness: Harness) -> None:
    """
    Every byte but the last chunk streams as it is verified piece by piece;
    the last chunk waits until the download succeeded (which means the whole
    blob matched its digest).  A download that fails at that point (the
    engine found the digest wrong) drops the connection: the client never
    gets a complete body.
    """
    data = bytes(range(256)) * 4096 * 2  # 2 MiB, 8 chunks
    digest = digest_of(data)
    for fails in (False, True):
        progress = FakeProgress()
        progress.length = len(data)
        progress.task_file = FakeTaskFile(data)
        progress.held = len(data)
        harness.engine.progress = progress
        d = blob_request(
            harness, f"/v2/library/alpine/blobs/{digest}", {b"Authorization": [b"x"]}
        )
        response = harness.wait(d)
        body = Collect()
        response.deliverBody(body.protocol)
        harness.pump(100)
        assert len(body.data) == len(data) - 256 * 1024
        assert not body.ended
        progress.ended = True
        progress.complete = not fails
        progress.notify()
        result = harness.engine.results[-1]
        if fails:
            result.errback(DownloadError("digest", "content has the wrong sha256"))
        else:
            result.callback(result_for(data, digest))
        harness.pump(100)
        if fails:
            assert len(body.data) < len(data)
            assert body.ended and not body.ended[0].check(ResponseDone)
        else:
            assert bytes(body.data) == data
            assert body.ended and body.ended[0].check(ResponseDone)


def test_blob_range(harness: Harness) -> None:
    """
    A single range is a 206 with Content-Range and those bytes; a range
    past the end is 416 C{RANGE_INVALID} with C{bytes */LENGTH}.
    """
    data = bytes(range(256)) * 40
    digest = digest_of(data)
    for _ in range(2):
        harness.engine.progress = None
    d = blob_request(
        harness,
        f"/v2/library/alpine/blobs/{digest}",
        {b"Authorization": [b"x"], b"Range": [b"bytes=100-199"]},
    )
    harness.engine.results[0].callback(result_for(data, digest))
    response = harness.wait(d)
    assert response.code == 206
    assert response.headers.getRawHeaders(b"content-range") == [
        f"bytes 100-199/{len(data)}".encode()
    ]
    assert harness.wait(read_content(response)) == data[100:200]
    d = blob_request(
        harness,
        f"/v2/library/alpine/blobs/{digest}",
        {b"Authorization": [b"x"], b"Range": [f"bytes={len(data)}-".encode()]},
    )
    harness.engine.results[1].callback(result_for(data, digest))
    response = harness.wait(d)
    assert response.code == 416
    assert response.headers.getRawHeaders(b"content-range") == [
        f"bytes */{len(data)}".encode()
    ]
    assert error_code(harness.wait(read_content(response))) == "RANGE_INVALID"


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (DownloadError("source", "404 from source", 404), 404, "BLOB_UNKNOWN"),
        (DownloadError("source", "401 from source", 401), 401, "UNAUTHORIZED"),
        (DownloadError("source", "403 from source", 403), 403, "DENIED"),
        (DownloadError("source", "500 from source", 500), 502, "UNAVAILABLE"),
        (DownloadError("timeout", "too slow"), 504, "UNAVAILABLE"),
        (DownloadError("supernode", "no supernode"), 502, "UNAVAILABLE"),
        (RuntimeError("boom"), 502, "UNAVAILABLE"),
    ],
)
def test_blob_download_errors(
    harness: Harness, error: Exception, status: int, code: str
) -> None:
    """
    A download that fails before any byte: the source's 401/403/404 keep
    their status with the registry's code; anything else is 502/504
    C{UNAVAILABLE}.
    """
    digest = digest_of(b"missing")
    d = blob_request(
        harness, f"/v2/library/alpine/blobs/{digest}", {b"Authorization": [b"x"]}
    )
    harness.engine.results[0].errback(Failure(error))
    response = harness.wait(d)
    assert response.code == status
    assert error_code(harness.wait(read_content(response))) == code


def test_blob_anonymous_token() -> None:
    """
    A client without credentials: the mirror HEADs the blob, follows the
    Bearer challenge to the realm with the service and a pull scope for the
    repository, and downloads with that token; a second blob of the same
    repository reuses it (no second token request).
    """
    harness = Harness()
    challenge = (
        b'Bearer realm="http://registry.test/token",service="registry.test",'
        b'scope="repository:library/alpine:pull"'
    )
    harness.upstream.routes[b"/token"] = Canned(
        200, [(b"Content-Type", b"application/json")], b'{"token":"anon-1"}'
    )
    first, second = digest_of(b"one"), digest_of(b"two")
    for digest in (first, second):
        harness.upstream.routes[f"/v2/library/alpine/blobs/{digest}".encode()] = Canned(
            401, [(b"WWW-Authenticate", challenge)], b""
        )
    d1 = blob_request(harness, f"/v2/library/alpine/blobs/{first}", {})
    harness.pump()
    assert [r.headers for r in harness.engine.requests] == [
        {"Authorization": ["Bearer anon-1"]}
    ]
    seen = [(s.method, s.uri) for s in harness.upstream.seen]
    assert seen[0] == (b"HEAD", f"/v2/library/alpine/blobs/{first}".encode())
    path, _, query = seen[1][1].partition(b"?")
    assert (seen[1][0], path) == (b"GET", b"/token")
    assert sorted(query.split(b"&")) == [
        b"scope=repository%3Alibrary%2Falpine%3Apull",
        b"service=registry.test",
    ]
    d2 = blob_request(harness, f"/v2/library/alpine/blobs/{second}", {})
    harness.pump()
    assert len(harness.upstream.seen) == 2
    assert harness.engine.requests[1].headers == {"Authorization": ["Bearer anon-1"]}
    harness.engine.results[0].callback(result_for(b"one", first))
    harness.engine.results[1].callback(result_for(b"two", second))
    assert harness.wait(read_content(harness.wait(d1))) == b"one"
    assert harness.wait(read_content(harness.wait(d2))) == b"two"


def test_blob_token_renewed_before_it_expires() -> None:
    """
    A token is reused for half of its C{expires_in} (60 s when the realm
    does not say): after that the next blob asks the realm again, so the
    supernode's fetch never gets a token about to expire.
    """
    harness = Harness()
    challenge = b'Bearer realm="http://registry.test/token",service="registry.test"'

    def realm_gives(body: bytes) -> None:
        harness.upstream.routes[b"/token"] = Canned(
            200, [(b"Content-Type", b"application/json")], body
        )

    def pull(n: int) -> list[str]:
        digest = digest_of(bytes([n]))
        harness.upstream.routes[f"/v2/library/alpine/blobs/{digest}".encode()] = Canned(
            401, [(b"WWW-Authenticate", challenge)], b""
        )
        blob_request(harness, f"/v2/library/alpine/blobs/{digest}", {})
        harness.pump()
        return harness.engine.requests[-1].headers["Authorization"]

    def token_requests() -> int:
        return sum(s.path == b"/token" for s in harness.upstream.seen)

    clock = harness.engine.reactor
    realm_gives(b'{"token":"t-1","expires_in":300}')
    assert pull(0) == ["Bearer t-1"]
    realm_gives(b'{"token":"t-2"}')
    clock.advance(149)
    assert pull(1) == ["Bearer t-1"]
    clock.advance(2)
    assert pull(2) == ["Bearer t-2"]
    clock.advance(29)
    assert pull(3) == ["Bearer t-2"]
    assert token_requests() == 2
    clock.advance(2)
    assert pull(4) == ["Bearer t-2"]
    assert token_requests() == 3
    _end_downloads(harness)


def test_blob_no_token_needed() -> None:
    """
    An open upstream (the HEAD is not a 401): the download carries no
    Authorization.
    """
    harness = Harness()
    digest = digest_of(b"open")
    harness.upstream.routes[f"/v2/library/alpine/blobs/{digest}".encode()] = Canned(
        200, [], b"open"
    )
    blob_request(harness, f"/v2/library/alpine/blobs/{digest}", {})
    harness.pump()
    assert [r.headers for r in harness.engine.requests] == [{}]
    # Believed for a minute: the next blobs of the image go straight on.
    blob_request(harness, f"/v2/library/alpine/blobs/{digest}", {})
    harness.pump()
    assert [s.method for s in harness.upstream.seen] == [b"HEAD"]
    harness.engine.reactor.advance(61)
    blob_request(harness, f"/v2/library/alpine/blobs/{digest}", {})
    harness.pump()
    assert [s.method for s in harness.upstream.seen] == [b"HEAD", b"HEAD"]
    assert [r.headers for r in harness.engine.requests] == [{}, {}, {}]
    _end_downloads(harness)


def _end_downloads(harness: Harness) -> None:
    """
    End the downloads a test left running, so that no blob response is left
    waiting when the test's objects go away.
    """
    for result in harness.engine.results:
        if not result.called:
            result.cancel()
    harness.pump()


def test_blob_token_failure_is_502() -> None:
    """
    An upstream that cannot be asked for a token: 502 C{UNAVAILABLE}, no
    download.
    """
    harness = Harness()
    harness.mirror._http = StubTreq(_Broken())
    digest = digest_of(b"x")
    response = harness.wait(
        blob_request(harness, f"/v2/library/alpine/blobs/{digest}", {})
    )
    assert response.code == 502
    assert error_code(harness.wait(read_content(response))) == "UNAVAILABLE"
    assert harness.engine.requests == []


class _Broken(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(401)
        request.setHeader(
            b"www-authenticate", b'Bearer realm="http://registry.test/token"'
        )
        if request.path == b"/token":
            request.setResponseCode(200)
            return b"not json"
        return b""


def test_client_leaving_withdraws_the_download(harness: Harness) -> None:
    """
    A client that disconnects while its blob streams: the mirror cancels
    its interest in the download.
    """
    data = b"z" * (1 << 20)
    digest = digest_of(data)
    progress = FakeProgress()
    progress.length = len(data)
    progress.task_file = FakeTaskFile(data)
    progress.held = 1 << 18
    harness.engine.progress = progress
    d = blob_request(
        harness, f"/v2/library/alpine/blobs/{digest}", {b"Authorization": [b"x"]}
    )
    response = harness.wait(d)
    assert response.code == 200
    assert harness.engine.cancelled == []
    for pump in list(harness.client._pumps):
        pump.clientIO.loseConnection()
    harness.pump()
    assert [r.digest for r in harness.engine.cancelled] == [digest]


# Parsers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "length", "expected"),
    [
        ("", 100, None),
        ("bytes=0-99", 100, (0, 100)),
        ("bytes=0-0", 100, (0, 1)),
        ("bytes=10-19", 100, (10, 20)),
        ("bytes=10-", 100, (10, 100)),
        ("bytes=99-", 100, (99, 100)),
        ("bytes=0-999", 100, (0, 100)),
        ("bytes=-10", 100, (90, 100)),
        ("bytes=-1000", 100, (0, 100)),
        ("bytes= 5-9", 100, (5, 10)),
        ("bytes=0-9,20-29", 100, None),
        ("items=0-9", 100, None),
        ("bytes=a-9", 100, None),
        ("bytes=0-b", 100, None),
    ],
)
def test_parse_range(header: str, length: int, expected: Any) -> None:
    """
    A single byte range as C{[start, end)} (clamped to the length);
    no header, another unit, several ranges or garbage: the whole body.
    """
    assert parse_range(header, length) == expected


@pytest.mark.parametrize(
    ("header", "length"),
    [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100), ("bytes=0-", 0)],
)
def test_parse_range_unsatisfiable(header: str, length: int) -> None:
    """
    A range starting at or past the end, or an empty suffix: ValueError
    (the mirror answers 416).
    """
    with pytest.raises(ValueError):
        parse_range(header, length)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            {
                "realm": "https://auth.docker.io/token",
                "service": "registry.docker.io",
                "scope": "repository:library/alpine:pull",
            },
        ),
        (
            'bearer Realm="http://r/token", Service="r"',
            {"realm": "http://r/token", "service": "r"},
        ),
        (
            'Bearer realm="http://r/token",scope="repository:a/b:pull,push"',
            {"realm": "http://r/token", "scope": "repository:a/b:pull,push"},
        ),
        ('Bearer realm=""', {"realm": ""}),
        ("Bearer", {}),
        ('Basic realm="registry"', {}),
        ("", {}),
    ],
)
def test_parse_challenge(header: str, expected: dict[str, str]) -> None:
    """
    The parameters of a Bearer challenge (names lower-cased, commas inside
    quotes kept); any other scheme gives nothing.
    """
    assert parse_challenge(header) == expected


# The plain HTTP port -------------------------------------------------------------


def test_tls_client_hello_gets_400_and_close(harness: Harness) -> None:
    """
    A TLS ClientHello (first byte 0x16) on the plain port is answered at
    once with a 400 and the connection is closed, so a client trying HTTPS
    first falls back without waiting for its handshake timeout.
    """
    channel = plain_site(harness).buildProtocol(None)
    assert isinstance(channel, PlainHTTPChannel)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 32)
    assert transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert transport.disconnecting
    assert harness.upstream.seen == []


def test_plain_http_still_served(harness: Harness) -> None:
    """
    A plain request on that channel is served as usual (and a later 0x16
    byte in the stream is just data).
    """
    harness.upstream.routes[b"/v2/"] = Canned(200, [], b"{}")
    written = raw_request(harness, b"GET /v2/ HTTP/1.1")
    assert written.startswith(b"HTTP/1.1 200 "), written
    assert written.endswith(b"{}")
    assert len(harness.upstream.seen) == 1
