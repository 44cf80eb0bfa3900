"""
The supernode's JSON HTTP API (L{dragonfly.supernode.api.root}) served by a
real C{twisted.web} site on 127.0.0.1 and driven with treq, over a real
supernode whose source is another site on 127.0.0.1 in this process.
"""

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from api_rig import PIECE, TIMEOUT, live_supernode
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request

from dragonfly.jsonapi import MAX_BODY
from dragonfly.supernode.service import Supernode
from dragonfly.supernode.state import TaskStatus
from dragonfly.tasks import task_id_for


class Files(Resource):
    """
    A source serving fixed bodies with Content-Length and recording the
    headers of every request; 404 for anything else.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []

    def render_GET(self, request: Request) -> bytes:
        path = request.path.decode()
        self.seen.append(
            (
                path,
                {
                    k.decode().lower(): v[0].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
            )
        )
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"not here"
        request.setHeader("etag", '"e1"')
        return body


@dataclass
class Api:
    supernode: Supernode
    files: Files
    api_port: int
    source_port: int
    client: Any

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api_port}{path}"

    def source_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.source_port}/{name}"

    async def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """
        One API request: its status and its decoded JSON body (or text).
        """
        data = (
            raw
            if raw is not None
            else (None if body is None else json.dumps(body).encode())
        )
        d = self.client.request(
            method,
            self.url(path),
            data=data,
            headers={"Content-Type": ["application/json"]}
            if data is not None
            else None,
        )
        d.addTimeout(TIMEOUT, reactor)
        response = await d
        content = response.content()
        content.addTimeout(TIMEOUT, reactor)
        payload = await content
        if response.headers.getRawHeaders("content-type", [""])[0].startswith(
            "application/json"
        ):
            return response.code, json.loads(payload)
        return response.code, payload.decode()


@pytest_twisted.async_yield_fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    files = Files()
    async with live_supernode(tmp_path, files) as live:
        yield Api(live.supernode, files, live.api_port, live.source_port, live.client)


def peer(n: int = 1) -> dict[str, str]:
    return {"peer_id": f"peer-{n}", "address": f"127.0.0.1:{9000 + n}"}


def registration(api: Api, name: str = "file.bin", **extra: Any) -> dict[str, Any]:
    return {"url": api.source_url(name), "peer": peer(), **extra}


@pytest_twisted.ensureDeferred
async def test_ping(api: Api) -> None:
    """
    GET /_ping answers 200 with the text OK.
    """
    status, body = await api.call("GET", "/_ping")
    assert (status, body) == (200, "OK")


@pytest_twisted.ensureDeferred
async def test_malformed_json_is_400(api: Api) -> None:
    """
    A registration body that is not JSON, or not a JSON object, is refused
    with 400 and a message saying so.
    """
    status, body = await api.call("POST", "/api/v1/tasks", raw=b"{not json")
    assert status == 400
    assert body["error"] == "bad_json"
    assert "not JSON" in body["message"]
    status, body = await api.call("POST", "/api/v1/tasks", raw=b"[1, 2]")
    assert status == 400
    assert "JSON object" in body["message"]
    status, body = await api.call("POST", "/api/v1/tasks", raw=b"\xff\xfe")
    assert status == 400
    assert body["error"] == "bad_json"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "'url'"),
        ({"url": "http://127.0.0.1:1/x"}, "'peer'"),
        (
            {"url": "http://127.0.0.1:1/x", "peer": {"address": "127.0.0.1:1"}},
            "'peer_id'",
        ),
        ({"url": "http://127.0.0.1:1/x", "peer": {"peer_id": "p"}}, "'address'"),
        ({"url": 5, "peer": peer()}, "'url'"),
        ({"url": "http://127.0.0.1:1/x", "peer": "p"}, "'peer'"),
        ({"url": "http://127.0.0.1:1/x", "peer": peer(), "digest": 7}, "'digest'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_missing_or_mistyped_field_is_400_naming_it(
    api: Api, body: dict[str, Any], named: str
) -> None:
    """
    A registration missing a required field, or with one of the wrong type,
    is refused with 400 and a message naming the field.
    """
    status, reply = await api.call("POST", "/api/v1/tasks", body)
    assert status == 400
    assert reply["error"] == "bad_request"
    assert named in reply["message"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({"url": "ftp://127.0.0.1/file"}, "http"),
        ({"url": "http:///nohost"}, "host"),
        ({"url": "http://127.0.0.1:99999/x"}, "port"),
        ({"digest": "md5:abc"}, "digest"),
        ({"digest": "sha256:" + "A" * 64}, "digest"),
        ({"peer": {"peer_id": "p", "address": "nowhere"}}, "address"),
        ({"peer": {"peer_id": "", "address": "127.0.0.1:1"}}, "peer_id"),
        ({"peer": {"peer_id": "p" * 256, "address": "127.0.0.1:1"}}, "peer_id"),
        ({"peer": {"peer_id": "\ud800", "address": "127.0.0.1:1"}}, "peer_id"),
        ({"headers": ["no colon here"]}, "header"),
        ({"headers": {"X-A": 5}}, "header"),
        ({"headers": 5}, "headers"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_registration_values_are_400(
    api: Api, extra: dict[str, Any], says: str
) -> None:
    """
    A bad URL (scheme, host, port), a malformed digest, a bad peer or bad
    headers is refused with 400 and a message saying what is wrong; the
    source is never asked.
    """
    status, reply = await api.call("POST", "/api/v1/tasks", registration(api, **extra))
    assert status == 400
    assert says in reply["message"]
    assert api.files.seen == []


@pytest.mark.parametrize(
    "peer_id",
    ["p" * 256, "%C3%A9" * 128, "%FF", "peer%FE1"],
    ids=["256-bytes", "256-bytes-utf8", "invalid-utf8", "invalid-inside"],
)
@pytest_twisted.ensureDeferred
async def test_bad_peer_id_in_heartbeat_and_leave_is_400(
    api: Api, peer_id: str
) -> None:
    """
    Heartbeat and leave check the peer id in their path as registration
    checks it in its body: 1 to 255 bytes of valid UTF-8, or 400 saying so.
    """
    status, reply = await api.call(
        "POST", f"/api/v1/peers/{peer_id}/heartbeat", {"tasks": []}
    )
    assert (status, reply["error"]) == (400, "bad_request")
    assert "peer_id must be 1 to 255 bytes" in reply["message"]
    status, reply = await api.call(
        "DELETE", f"/api/v1/tasks/{'b' * 64}/peers/{peer_id}"
    )
    assert (status, reply["error"]) == (400, "bad_request")
    assert "peer_id must be 1 to 255 bytes" in reply["message"]


@pytest_twisted.ensureDeferred
async def test_longest_peer_id_is_accepted_everywhere(api: Api) -> None:
    """
    A peer id of exactly 255 bytes of UTF-8 registers, beats and leaves.
    """
    peer_id = "\u20ac" * 85  # 3 bytes each
    api.files.files["/file.bin"] = b"x" * 100
    body = registration(api)
    body["peer"]["peer_id"] = peer_id
    status, reply = await api.call("POST", "/api/v1/tasks", body)
    assert status == 200
    task_id = reply["task_id"]
    quoted = quote(peer_id)
    status, beat = await api.call(
        "POST", f"/api/v1/peers/{quoted}/heartbeat", {"tasks": [task_id]}
    )
    assert (status, beat) == (200, {"unknown": []})
    status, left = await api.call("DELETE", f"/api/v1/tasks/{task_id}/peers/{quoted}")
    assert (status, left) == (200, {})
    status, info = await api.call("GET", f"/api/v1/tasks/{task_id}")
    assert info["peers"] == {}


@pytest_twisted.ensureDeferred
async def test_source_404_is_502_with_source_status(api: Api) -> None:
    """
    A registration whose source answers 404 gets 502 with error "source"
    and source_status 404; the task is then listed as failed.
    """
    status, reply = await api.call(
        "POST", "/api/v1/tasks", registration(api, "missing")
    )
    assert status == 502
    assert reply["error"] == "source"
    assert reply["source_status"] == 404
    assert "404" in reply["message"]
    task_id = task_id_for(api.source_url("missing"))
    status, info = await api.call("GET", f"/api/v1/tasks/{task_id}")
    assert status == 200
    assert info["status"] == "failed"


@pytest_twisted.ensureDeferred
async def test_unknown_and_malformed_task_ids(api: Api) -> None:
    """
    An unknown (well-formed) task id is 404, a non-hex one 400, for task
    info and for scheduling.
    """
    status, reply = await api.call("GET", "/api/v1/tasks/" + "a" * 64)
    assert (status, reply["error"]) == (404, "unknown")
    status, reply = await api.call("GET", "/api/v1/tasks/not-hex")
    assert (status, reply["error"]) == (400, "bad_request")
    status, reply = await api.call(
        "POST", f"/api/v1/tasks/{'b' * 64}/schedule", {"peer_id": "p"}
    )
    assert (status, reply["error"]) == (404, "unknown")
    status, reply = await api.call(
        "POST", "/api/v1/tasks/zz/schedule", {"peer_id": "p"}
    )
    assert (status, reply["error"]) == (400, "bad_request")


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_413(api: Api) -> None:
    """
    A request body over MAX_BODY bytes is refused with 413.
    """
    big = b'{"url": "' + b"x" * MAX_BODY + b'"}'
    status, reply = await api.call("POST", "/api/v1/tasks", raw=big)
    assert status == 413
    assert reply["error"] == "too_large"
    assert api.files.seen == []


@pytest_twisted.ensureDeferred
async def test_wrong_method_is_405_and_unknown_path_404(api: Api) -> None:
    """
    A known path with a method it does not take is 405; an unknown path 404.
    """
    status, reply = await api.call("PUT", "/api/v1/tasks", {})
    assert (status, reply["error"]) == (405, "method_not_allowed")
    status, reply = await api.call("GET", f"/api/v1/tasks/{'c' * 64}/schedule")
    assert status == 405
    status, reply = await api.call("DELETE", "/api/v1/tasks")
    assert status == 405
    status, reply = await api.call("GET", "/api/v1/nothing")
    assert (status, reply["error"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({}, "peer_id"),
        ({"peer_id": "peer-1", "finished": ["x"]}, "finished"),
        ({"peer_id": "peer-1", "finished": [True]}, "finished"),
        ({"peer_id": "peer-1", "failed": [3]}, "failed"),
        ({"peer_id": "peer-1", "failed": [{"peer_id": "x"}]}, "'piece'"),
        ({"peer_id": "peer-1", "want": "2"}, "'want'"),
        ({"peer_id": "peer-1", "want": 65}, "want"),
        ({"peer_id": "peer-1", "wait": "soon"}, "'wait'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_schedule_bodies_are_400(
    api: Api, body: dict[str, Any], named: str
) -> None:
    """
    A schedule call with a missing peer id, or malformed finished / failed /
    want / wait, is refused with 400 naming what is wrong.
    """
    api.files.files["/file.bin"] = b"z" * PIECE
    status, reply = await api.call("POST", "/api/v1/tasks", registration(api))
    assert status == 200
    status, reply = await api.call(
        "POST", f"/api/v1/tasks/{reply['task_id']}/schedule", body
    )
    assert status == 400
    assert named in reply["message"]


@pytest_twisted.ensureDeferred
async def test_register_schedule_heartbeat_and_leave(api: Api) -> None:
    """
    The full exchange over HTTP: registration (headers given as "Name:
    value" lines reach the source) answers the geometry; a schedule long poll
    hands out pieces with their sha256; a report of all of them makes the
    peer "done"; task info and the task list show it; a heartbeat names the
    unknown task; DELETE removes the peer.
    """
    body = bytes(range(256)) * (PIECE * 3 // 256) + b"tail"
    api.files.files["/file.bin"] = body
    status, reply = await api.call(
        "POST",
        "/api/v1/tasks",
        registration(api, headers=["Authorization: Bearer t0ken", "X-Id: 7"]),
    )
    assert status == 200, reply
    task_id = reply["task_id"]
    assert task_id == task_id_for(api.source_url("file.bin"))
    assert reply["length"] == len(body)
    assert reply["piece_size"] == PIECE
    assert reply["piece_count"] == 4
    assert reply["supernode"]["peer_id"] == f"cdnnode:127.0.0.1~{task_id}"
    ((_, headers),) = api.files.seen
    assert headers["authorization"] == "Bearer t0ken"
    assert headers["x-id"] == "7"

    pieces: dict[int, dict[str, Any]] = {}
    while len(pieces) < 4:
        status, answer = await api.call(
            "POST",
            f"/api/v1/tasks/{task_id}/schedule",
            {"peer_id": "peer-1", "want": 4, "wait": 5},
        )
        assert status == 200, answer
        assert answer["pieces"], answer
        pieces.update({p["piece"]: p for p in answer["pieces"]})
    for n, p in pieces.items():
        assert (
            p["sha256"] == hashlib.sha256(body[n * PIECE : (n + 1) * PIECE]).hexdigest()
        )
        assert p["address"] == "127.0.0.1:8001"
    swarm = await api.supernode.state.get(task_id)
    assert swarm is not None
    for _ in range(500):
        if swarm.task.status is TaskStatus.DONE:
            break
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    status, answer = await api.call(
        "POST",
        f"/api/v1/tasks/{task_id}/schedule",
        {"peer_id": "peer-1", "finished": [0, 1, 2, 3]},
    )
    assert status == 200
    assert answer["status"] == "done"
    assert answer["file_sha256"] == hashlib.sha256(body).hexdigest()

    status, info = await api.call("GET", f"/api/v1/tasks/{task_id}")
    assert status == 200
    assert info["status"] == "done"
    assert info["peers"]["peer-1"]["finished"] is True
    status, listing = await api.call("GET", "/api/v1/tasks")
    assert [t["task_id"] for t in listing["tasks"]] == [task_id]

    status, beat = await api.call(
        "POST", "/api/v1/peers/peer-1/heartbeat", {"tasks": [task_id, "d" * 64]}
    )
    assert (status, beat) == (200, {"unknown": ["d" * 64]})
    status, beat = await api.call(
        "POST", "/api/v1/peers/peer-1/heartbeat", {"tasks": [1]}
    )
    assert status == 400

    status, left = await api.call("DELETE", f"/api/v1/tasks/{task_id}/peers/peer-1")
    assert (status, left) == (200, {})
    status, info = await api.call("GET", f"/api/v1/tasks/{task_id}")
    assert info["peers"] == {}
