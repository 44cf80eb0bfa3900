"""
Preheat (L{dragonfly.supernode.preheat}, C{POST /api/v1/preheats}, C{dfget
preheat}).

Most tests run a real supernode and its API in this process on 127.0.0.1,
with real HTTP servers as the sources: a file server counting what it
sends, and a small registry serving an image layout built by
L{dragonfly.devtools.oci} behind Bearer token auth (the distribution
spec's flow, with its own realm).  One test runs the C{twistd} supernode
and the C{dfget} processes; the C{registry} ones preheat from a real
C{docker-registry} an index of two platforms pushed with skopeo.
"""

import hashlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from api_rig import PIECE, TIMEOUT, QuietSite, live_supernode
from loopback import Dfget, Processes, SourceServer, run_dfget_args, start_supernode
from registry_env import push, start_registry
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.devtools.oci import ImageIndex, ImageLayout
from dragonfly.http import http_client
from dragonfly.supernode.preheat import (
    PreheatBusy,
    Preheater,
    PreheatRequest,
    image_from_reference,
)
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import InMemorySwarmState
from dragonfly.tasks import InvalidRequest, task_id_for


class Files(Resource):
    """
    A file source: fixed bodies with Content-Length and an ETag, counting
    requests and body bytes per path; C{/stall} never answers.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.gets: dict[str, int] = {}
        self.sent: dict[str, int] = {}
        self.stalled: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        path = request.path.decode()
        if path == "/stall":
            self.stalled.append(request)
            return NOT_DONE_YET
        self.gets[path] = self.gets.get(path, 0) + 1
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"not here"
        self.sent[path] = self.sent.get(path, 0) + len(body)
        request.setHeader("etag", '"e1"')
        return body


@dataclass
class StubRegistry(Resource):
    """
    A registry's pull API over an L{ImageLayout}: manifests by tag or
    digest (with their media type and C{Docker-Content-Digest}), blobs by
    digest.  With C{token} set, every C{/v2/} request needs C{Authorization:
    Bearer TOKEN}, and a 401 carries the challenge naming C{/token} on this
    server, which hands out TOKEN for a pull scope.
    """

    layout: ImageLayout
    tags: dict[str, str] = field(default_factory=dict)
    token: str = ""
    realm: str = ""
    seen: list[tuple[str, str]] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)
    isLeaf = True

    def __post_init__(self) -> None:
        Resource.__init__(self)

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode()
        authorization = (request.getHeader("authorization") or "").strip()
        self.seen.append((path, authorization))
        if path == "/token":
            scope = request.args.get(b"scope", [b""])[0].decode()
            self.scopes.append(scope)
            request.setHeader("content-type", "application/json")
            return json.dumps({"token": self.token}).encode()
        if self.token and authorization != f"Bearer {self.token}":
            request.setResponseCode(401)
            request.setHeader(
                "www-authenticate",
                f'Bearer realm="{self.realm}",service="stub-registry"',
            )
            return b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if match is None:
            request.setResponseCode(404)
            return b'{"errors":[{"code":"NAME_UNKNOWN"}]}'
        name, kind, reference = match.groups()
        digest = self.tags.get(f"{name}:{reference}", reference)
        blob = self.layout.blob_path(digest) if digest.startswith("sha256:") else None
        if blob is None or not blob.exists():
            request.setResponseCode(404)
            code = "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN"
            return json.dumps({"errors": [{"code": code}]}).encode()
        data = blob.read_bytes()
        if kind == "manifests":
            request.setHeader("content-type", json.loads(data)["mediaType"])
        request.setHeader("docker-content-digest", digest)
        return data


@dataclass
class Harness:
    supernode: Supernode
    files: Files
    api_port: int
    source_port: int
    client: Any
    preheater: Preheater

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api_port}{path}"

    def source_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.source_port}/{name}"

    async def call(
        self, method: str, path: str, body: Any = None
    ) -> tuple[int, Any, Any]:
        """
        One API request: status, decoded JSON body, headers.
        """
        d = self.client.request(
            method,
            self.url(path),
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": ["application/json"]},
        )
        d.addTimeout(TIMEOUT, reactor)
        response = await d
        content = response.content()
        content.addTimeout(TIMEOUT, reactor)
        return response.code, json.loads(await content), response.headers

    async def preheat(self, body: dict[str, Any], timeout: float = 30.0) -> Any:
        """
        Start a preheat and poll it until it ends.
        """
        status, started, headers = await self.call("POST", "/api/v1/preheats", body)
        assert status == 202, started
        location = headers.getRawHeaders("location")[0]
        assert location == f"/api/v1/preheats/{started['id']}"
        assert started["error"] is None or started["state"] == "failed"
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            status, preheat, _ = await self.call("GET", location)
            assert status == 200, preheat
            if preheat["state"] not in ("pending", "running"):
                return preheat
            await deferLater(reactor, 0.05)
        raise AssertionError(f"preheat did not end within {timeout}s: {preheat}")


@pytest_twisted.async_yield_fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    files = Files()
    async with live_supernode(tmp_path, files) as live:
        yield Harness(
            live.supernode,
            files,
            live.api_port,
            live.source_port,
            live.client,
            live.top.children[b"api"].preheats,
        )
        for request in files.stalled:
            request.transport.abortConnection()


def cached_sha256(supernode: Supernode, task_id: str) -> str:
    """
    The sha256 of a task's bytes in the supernode's cache, read from disk.
    """
    return hashlib.sha256(supernode.store.path_for(task_id).read_bytes()).hexdigest()


# Files -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_file_preheat_fills_the_cache_for_later_peers(harness: Harness) -> None:
    """
    A file preheat fetches the URL once into the cache, and reports its
    task, bytes and size; a peer registering for that URL afterwards joins
    the finished task and is handed every piece from the supernode, and
    the source is not asked again.  Preheating it a second time costs the
    source nothing either.
    """
    data = bytes(range(256)) * 1000  # 256000 bytes: 4 pieces
    harness.files.files["/app.bin"] = data
    url = harness.source_url("app.bin")
    preheat = await harness.preheat({"type": "file", "url": url})
    task_id = task_id_for(url)
    assert preheat["state"] == "success", preheat
    assert preheat["error"] is None
    assert preheat["finished"] >= preheat["created"]
    [task] = preheat["tasks"]
    assert task["task_id"] == task_id
    assert (task["state"], task["bytes"], task["size"]) == (
        "success",
        len(data),
        len(data),
    )
    assert cached_sha256(harness.supernode, task_id) == hashlib.sha256(data).hexdigest()

    status, reply, _ = await harness.call(
        "POST",
        "/api/v1/tasks",
        {"url": url, "peer": {"peer_id": "p1", "address": "127.0.0.1:9001"}},
    )
    assert status == 200, reply
    assert (reply["task_id"], reply["status"]) == (task_id, "done")
    status, reply, _ = await harness.call(
        "POST",
        f"/api/v1/tasks/{task_id}/schedule",
        {"peer_id": "p1", "want": 8},
    )
    assert status == 200, reply
    assert sorted(p["piece"] for p in reply["pieces"]) == [0, 1, 2, 3]
    assert {p["peer_id"] for p in reply["pieces"]} == {
        harness.supernode.supernode_peer_id(task_id)
    }

    again = await harness.preheat({"type": "file", "url": url})
    assert again["state"] == "success"
    assert harness.files.gets["/app.bin"] == 1
    assert harness.files.sent["/app.bin"] == len(data)


@pytest_twisted.ensureDeferred
async def test_file_preheat_with_digest_names_the_task_by_it(harness: Harness) -> None:
    """
    With a digest the task is the content's (as dfget --digest names it);
    a wrong digest fails the preheat with the mismatch in the task's error.
    """
    data = b"x" * 1000
    harness.files.files["/d.bin"] = data
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    preheat = await harness.preheat(
        {"type": "file", "url": harness.source_url("d.bin"), "digest": digest}
    )
    assert preheat["state"] == "success", preheat
    assert preheat["tasks"][0]["task_id"] == task_id_for("", digest=digest)

    wrong = "sha256:" + "0" * 64
    harness.files.files["/e.bin"] = data
    preheat = await harness.preheat(
        {"type": "file", "url": harness.source_url("e.bin"), "digest": wrong}
    )
    assert preheat["state"] == "failed"
    assert preheat["error"]["code"] == "source"
    assert "expected " + wrong in preheat["tasks"][0]["error"]


@pytest_twisted.ensureDeferred
async def test_unreachable_source_fails_with_the_source_error(
    harness: Harness,
) -> None:
    """
    A URL nobody answers at: the preheat fails (code C{source}) and its
    task says what went wrong; a 404 source is reported with its status.
    """
    port = reactor.listenTCP(0, QuietSite(Resource()), interface="127.0.0.1")
    closed = port.getHost().port
    await port.stopListening()
    preheat = await harness.preheat(
        {"type": "file", "url": f"http://127.0.0.1:{closed}/gone.bin"}
    )
    assert preheat["state"] == "failed"
    assert preheat["error"]["code"] == "source"
    [task] = preheat["tasks"]
    assert task["state"] == "failed"
    assert "refused" in task["error"].lower(), task

    preheat = await harness.preheat(
        {"type": "file", "url": harness.source_url("missing.bin")}
    )
    assert preheat["state"] == "failed"
    assert preheat["tasks"][0]["source_status"] == 404
    assert "HTTP 404" in preheat["error"]["message"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"url": "http://127.0.0.1:1/x"}, "type must be"),
        ({"type": "disk", "url": "http://127.0.0.1:1/x"}, "type must be"),
        ({"type": "file"}, "missing field 'url'"),
        ({"type": "file", "url": 5}, "'url' must be of type str"),
        ({"type": "file", "url": "ftp://127.0.0.1/x"}, "http:// or https://"),
        ({"type": "file", "url": "http://127.0.0.1:1/x", "digest": "md5:1"}, "digest"),
        ({"type": "file", "url": "http://127.0.0.1:1/x", "headers": 3}, "headers"),
        ({"type": "image"}, "missing field 'url' (or 'image')"),
        ({"type": "image", "image": "Bad Name!"}, "malformed image reference"),
        ({"type": "image", "image": "127.0.0.1:5000/a@sha256:12"}, "digest must be"),
        ({"type": "image", "image": "a", "registry_scheme": "ftp"}, "registry_scheme"),
        (
            {"type": "image", "url": "http://127.0.0.1:5000/v2/a/blobs/x"},
            "/v2/NAME/manifests/",
        ),
        (
            {
                "type": "image",
                "url": "http://127.0.0.1:1/v2/a/manifests/t",
                "image": "a",
            },
            "not both",
        ),
        ({"type": "image", "image": "a", "platforms": ["amd64"]}, "OS/ARCH"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_request_is_400_saying_why(
    harness: Harness, body: dict[str, Any], says: str
) -> None:
    """
    A preheat request that cannot be carried out is refused with 400 and a
    message saying what is wrong; nothing is recorded.
    """
    status, reply, _ = await harness.call("POST", "/api/v1/preheats", body)
    assert status == 400, reply
    assert reply["error"] == "bad_request"
    assert says in reply["message"]
    status, listing, _ = await harness.call("GET", "/api/v1/preheats")
    assert (status, listing) == (200, {"preheats": []})


@pytest_twisted.ensureDeferred
async def test_unknown_preheat_is_404(harness: Harness) -> None:
    """
    GET of a preheat id the supernode does not know: 404.
    """
    status, reply, _ = await harness.call("GET", "/api/v1/preheats/nope")
    assert (status, reply["error"]) == (404, "unknown")


@pytest_twisted.ensureDeferred
async def test_preheats_at_dragonfly_1x_path(harness: Harness) -> None:
    """
    C{/preheats}, where Dragonfly 1.x has the API, starts, lists and shows
    the same preheats as C{/api/v1/preheats}.
    """
    harness.files.files["/old.bin"] = b"o" * 5000
    status, started, _ = await harness.call(
        "POST", "/preheats", {"type": "file", "url": harness.source_url("old.bin")}
    )
    assert status == 202, started
    status, listed, _ = await harness.call("GET", "/preheats")
    assert status == 200
    assert [p["id"] for p in listed["preheats"]] == [started["id"]]
    status, shown, _ = await harness.call("GET", f"/api/v1/preheats/{started['id']}")
    assert (status, shown["id"]) == (200, started["id"])
    status, shown, _ = await harness.call("GET", f"/preheats/{started['id']}")
    assert (status, shown["id"]) == (200, started["id"])
    status, reply, _ = await harness.call("GET", "/preheats/nope")
    assert (status, reply["error"]) == (404, "unknown")


@pytest_twisted.ensureDeferred
async def test_history_and_concurrency_are_bounded(tmp_path: Path) -> None:
    """
    At most C{max_active} preheats run at once (the next is refused with
    L{PreheatBusy}); the history keeps the newest finished ones up to its
    size, newest first, and stopping the supernode ends a running preheat
    as C{stopped}.
    """
    files = Files()
    port = reactor.listenTCP(0, QuietSite(files), interface="127.0.0.1")
    http = http_client(reactor)
    supernode = Supernode(
        reactor,
        tmp_path / "home",
        InMemorySwarmState(),
        http,
        Settings(piece_size=PIECE, header_timeout=5.0),
    )
    preheater = Preheater(supernode, max_active=1, max_history=2)
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        ids = []
        for n in range(3):
            files.files[f"/{n}"] = b"%d" % n
            preheat = preheater.start(PreheatRequest("file", f"{base}/{n}"))
            ids.append(preheat.id)
            with pytest.raises(PreheatBusy):
                preheater.start(PreheatRequest("file", f"{base}/other"))
            for _ in range(200):
                if not preheat.active:
                    break
                await deferLater(reactor, 0.02)
            assert preheat.state == "success"
        assert [p.id for p in preheater.recent()] == [ids[2], ids[1]]
        assert preheater.get(ids[0]) is None

        stalled = preheater.start(PreheatRequest("file", f"{base}/stall"))
        for _ in range(200):
            if files.stalled:
                break
            await deferLater(reactor, 0.02)
        supernode.stop()
        assert stalled.state == "failed"
        assert stalled.error == {"code": "stopped", "message": "the supernode stopped"}
    finally:
        supernode.stop()
        for request in files.stalled:
            request.transport.abortConnection()
        await http._agent._pool.closeCachedConnections()
        await port.stopListening()


# Images ----------------------------------------------------------------------


@dataclass
class ImageSite:
    registry: StubRegistry
    index: ImageIndex
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest_twisted.async_yield_fixture
async def image_site(tmp_path: Path) -> AsyncIterator[ImageSite]:
    """
    A token-auth registry serving C{dfly/multi:v1}, an OCI index of a
    linux/amd64 and a linux/arm64 image sharing their first layer.
    """
    layout = ImageLayout(tmp_path / "layout")
    shared = layout.make_layer(70_000, seed="shared")
    amd64 = layout.make_image(
        [150_000, 1_000], format="oci", layers=[shared], seeds=["a1", "a2"]
    )
    arm64 = layout.make_image(
        [90_000],
        format="oci",
        architecture="arm64",
        layers=[shared],
        seeds=["r1"],
    )
    index = layout.make_index([amd64, arm64], format="oci")
    registry = StubRegistry(layout, {"dfly/multi:v1": index.digest}, token="t0k3n")
    port = reactor.listenTCP(0, QuietSite(registry), interface="127.0.0.1")
    registry.realm = f"http://127.0.0.1:{port.getHost().port}/token"
    yield ImageSite(registry, index, port.getHost().port)
    await port.stopListening()


def blob_digests(index: ImageIndex, platforms: tuple[str, ...]) -> set[str]:
    return {
        blob.digest
        for image in index.images
        if image.architecture in platforms
        for blob in (image.config, *image.layers)
    }


@pytest_twisted.ensureDeferred
async def test_image_preheat_caches_every_blob_of_every_platform(
    harness: Harness, image_site: ImageSite
) -> None:
    """
    An image preheat of a multi-platform index with token auth: the
    registry's 401 challenge is answered with a pull token from its realm
    (asked once, for this repository), both platform manifests are read,
    and every distinct blob (configs and layers, the shared layer once)
    ends up in the cache as the task a mirror pull of that digest joins,
    with the right sha256.
    """
    site = image_site
    preheat = await harness.preheat(
        {
            "type": "image",
            "image": f"{site.address}/dfly/multi:v1",
            "registry_scheme": "http",
        }
    )
    assert preheat["state"] == "success", preheat
    assert {m["platform"] for m in preheat["manifests"]} == {
        "linux/amd64",
        "linux/arm64",
    }
    wanted = blob_digests(site.index, ("amd64", "arm64"))
    assert len(wanted) == 6  # two configs, the shared layer, three others
    assert {task["digest"] for task in preheat["tasks"]} == wanted
    assert len(preheat["tasks"]) == len(wanted)
    for digest in wanted:
        mirror_url = f"http://127.0.0.1:1/v2/dfly/multi/blobs/{digest}"
        task_id = task_id_for(mirror_url, digest=digest)
        assert cached_sha256(harness.supernode, task_id) == digest[len("sha256:") :]
        info = await harness.supernode.task_info(task_id)
        assert info["status"] == "done"
    assert site.registry.scopes == ["repository:dfly/multi:pull"]
    blob_requests = [s for s in site.registry.seen if "/blobs/" in s[0]]
    assert len(blob_requests) == len(wanted)
    assert {auth for _, auth in blob_requests} == {"Bearer t0k3n"}


@pytest_twisted.ensureDeferred
async def test_image_preheat_of_one_platform(
    harness: Harness, image_site: ImageSite
) -> None:
    """
    With C{platforms}, only those images of the index are preheated (by a
    manifest URL here); a platform the index lacks fails as
    C{no_platform}.
    """
    site = image_site
    preheat = await harness.preheat(
        {
            "type": "image",
            "url": f"http://{site.address}/v2/dfly/multi/manifests/v1",
            "platforms": ["linux/arm64"],
        }
    )
    assert preheat["state"] == "success", preheat
    assert {task["digest"] for task in preheat["tasks"]} == blob_digests(
        site.index, ("arm64",)
    )
    assert [m["platform"] for m in preheat["manifests"]] == ["linux/arm64"]
    arm64 = site.index.for_platform("arm64")
    assert [m["digest"] for m in preheat["manifests"]] == [arm64.digest]

    preheat = await harness.preheat(
        {
            "type": "image",
            "url": f"http://{site.address}/v2/dfly/multi/manifests/v1",
            "platforms": ["linux/s390x"],
        }
    )
    assert preheat["state"] == "failed"
    assert preheat["error"]["code"] == "no_platform"
    assert preheat["tasks"] == []


@pytest_twisted.ensureDeferred
async def test_image_errors_are_reported_in_the_preheat(
    harness: Harness, image_site: ImageSite
) -> None:
    """
    A tag the registry does not have fails as C{not_found}; a registry
    whose realm gives a token it then refuses fails as C{unauthorized};
    neither starts a fetch.
    """
    site = image_site
    base = f"http://{site.address}/v2/dfly/multi/manifests"
    preheat = await harness.preheat({"type": "image", "url": f"{base}/nope"})
    assert preheat["state"] == "failed"
    assert preheat["error"]["code"] == "not_found"
    assert "dfly/multi:nope" in preheat["error"]["message"]

    original = site.registry.render_GET

    def refuse_all(request: Request) -> bytes:
        if request.path != b"/token":
            request.requestHeaders.removeHeader(b"authorization")
        return original(request)

    site.registry.render_GET = refuse_all  # type: ignore[method-assign]
    preheat = await harness.preheat({"type": "image", "url": f"{base}/v1"})
    assert preheat["state"] == "failed"
    assert preheat["error"]["code"] == "unauthorized"
    assert "with a pull token" in preheat["error"]["message"]
    assert preheat["tasks"] == []
    assert harness.supernode.bytes_from_source == 0


@pytest.mark.parametrize(
    ("text", "base", "name", "reference"),
    [
        (
            "127.0.0.1:5000/library/demo:latest",
            "https://127.0.0.1:5000",
            "library/demo",
            "latest",
        ),
        ("localhost/app", "https://localhost", "app", "latest"),
        ("alpine:3.19", "https://registry-1.docker.io", "library/alpine", "3.19"),
        ("org/app", "https://registry-1.docker.io", "org/app", "latest"),
        (
            "registry.example/a/b@sha256:" + "a" * 64,
            "https://registry.example",
            "a/b",
            "sha256:" + "a" * 64,
        ),
    ],
)
def test_image_references(text: str, base: str, name: str, reference: str) -> None:
    """
    Image references name their registry as Docker does: a first part with
    a dot, a port or C{localhost} is the host, otherwise Docker Hub.
    """
    image = image_from_reference(text)
    assert (image.base, image.name, image.reference) == (base, name, reference)


@pytest.mark.parametrize(
    "text", ["", "UPPER/case", "a:b:c", "a@sha512:00", "host:99999/a", "a//b"]
)
def test_bad_image_references(text: str) -> None:
    """
    A malformed reference is refused with L{InvalidRequest}.
    """
    with pytest.raises(InvalidRequest):
        image_from_reference(text)


# Real processes --------------------------------------------------------------


@pytest.mark.loopback
def test_dfget_preheat_then_dfget_is_served_from_the_cache(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    C{dfget preheat URL} against a C{twistd} supernode waits for the
    preheat and exits 0; a C{dfget} of that URL afterwards gets every byte
    from the supernode, and the source sent the file exactly once.  A
    preheat that fails exits 3 with the error.
    """
    size = 3 * (1 << 20) + 123
    file = source.add_file("big.bin", size)
    supernode = start_supernode(processes, work / "sn")
    result = run_dfget_args(
        [
            "preheat",
            source.url("big.bin"),
            "--node",
            supernode.node,
            "--timeout",
            "60s",
        ],
        work,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    assert "preheat SUCCESS" in result.stdout
    assert f"bytes:{size}" in result.stdout
    assert source.bytes_sent("big.bin") == size

    got = dfget.run(source.url("big.bin"), node=supernode.node)
    assert got.code == 0, got.stderr
    assert hashlib.sha256(got.output.read_bytes()).hexdigest() == file.sha256
    assert "source 0 B" in got.stdout
    assert source.bytes_sent("big.bin") == size
    assert len(source.requests("big.bin")) == 1

    failed = run_dfget_args(
        ["preheat", source.url("absent.bin"), "--node", supernode.node],
        work,
        timeout=60,
    )
    assert failed.returncode == 3, failed.stderr
    assert "preheat FAIL(3)" in failed.stderr
    assert "HTTP 404" in failed.stderr


# A real registry --------------------------------------------------------------


@pytest.mark.registry
@pytest_twisted.ensureDeferred
async def test_image_preheat_from_a_real_registry(
    harness: Harness, processes: Processes, work: Path
) -> None:
    """
    A real C{docker-registry} serving a Docker manifest list of linux/amd64
    and linux/arm64 (pushed by skopeo): preheating it by reference caches
    every blob of both platforms with its sha256, each fetched from the
    registry exactly once; a second image, an OCI index, preheated by URL
    for linux/arm64 only fetches that platform's blobs.
    """
    registry = start_registry(processes, work / "registry")
    layout = ImageLayout(work / "layout")
    images = [
        layout.make_image([200_000, 3_000], architecture=arch)
        for arch in ("amd64", "arm64")
    ]
    index = layout.make_index(images)
    push(layout, "v1", registry, "dfly/multi", index)
    mark = registry.mark()

    preheat = await harness.preheat(
        {
            "type": "image",
            "image": f"{registry.address}/dfly/multi:v1",
            "registry_scheme": "http",
        },
        timeout=60,
    )
    assert preheat["state"] == "success", preheat
    wanted = blob_digests(index, ("amd64", "arm64"))
    assert {task["digest"] for task in preheat["tasks"]} == wanted
    for digest in wanted:
        task_id = task_id_for("", digest=digest)
        assert cached_sha256(harness.supernode, task_id) == digest[len("sha256:") :]
    registry.settle()
    assert registry.blob_gets(mark) == {digest: 1 for digest in wanted}

    other = ImageLayout(work / "layout2")
    second = other.make_index(
        [
            other.make_image([50_000], architecture=a, format="oci")
            for a in ("amd64", "arm64")
        ],
        format="oci",
    )
    push(other, "v2", registry, "dfly/multi", second)
    mark = registry.mark()
    preheat = await harness.preheat(
        {
            "type": "image",
            "url": f"{registry.url}/v2/dfly/multi/manifests/v2",
            "platforms": ["linux/arm64"],
        },
        timeout=60,
    )
    assert preheat["state"] == "success", preheat
    arm64 = blob_digests(second, ("arm64",))
    assert {task["digest"] for task in preheat["tasks"]} == arm64
    registry.settle()
    assert registry.blob_gets(mark) == {digest: 1 for digest in arm64}
