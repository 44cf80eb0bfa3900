"""
The supernode's JSON control API (see C{docs/architecture.md} for the
endpoints and their bodies).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.jsonapi import ApiError, JsonApi, field, read_json, write_json
from dragonfly.metrics import MetricsResource
from dragonfly.resources import PlainText, Root
from dragonfly.supernode.cdn import ContentMismatch, SourceError
from dragonfly.supernode.preheat import PreheatBusy, Preheater
from dragonfly.supernode.preheat import parse_request as parse_preheat
from dragonfly.supernode.service import (
    FailedPiece,
    Registration,
    Supernode,
    UnknownTask,
)
from dragonfly.supernode.state import PeerInfo
from dragonfly.supernode.status import StatusPage, snapshot
from dragonfly.tasks import InvalidRequest


def _headers(value: Any) -> dict[str, list[str]]:
    """
    Accept headers as C{{"Name": "v"}}, C{{"Name": ["v", ...]}} or
    C{["Name: v", ...]}.
    """
    headers: dict[str, list[str]] = {}
    if isinstance(value, list):
        for line in value:
            if not isinstance(line, str) or ":" not in line:
                raise ApiError(400, "bad_request", f"bad header line {line!r}")
            name, _, text = line.partition(":")
            headers.setdefault(name.strip(), []).append(text.strip())
        return headers
    if isinstance(value, dict):
        for name, text in value.items():
            values = text if isinstance(text, list) else [text]
            if not all(isinstance(v, str) for v in values):
                raise ApiError(400, "bad_request", f"bad value for header {name!r}")
            headers[name] = list(values)
        return headers
    raise ApiError(400, "bad_request", "headers must be an object or a list")


def _check_peer_id(peer_id: str, in_path: bool = False) -> str:
    """
    A peer id is 1 to 255 bytes of UTF-8, wherever it is given.

    @param in_path: the id came from the URL path, whose invalid UTF-8 the
        router decoded to U+FFFD.
    @raise ApiError: 400 otherwise.
    """
    try:
        size = len(peer_id.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate escaped in JSON
        size = 0
    if not 0 < size <= 255 or (in_path and "\ufffd" in peer_id):
        raise ApiError(400, "bad_request", "peer_id must be 1 to 255 bytes (UTF-8)")
    return peer_id


def _peer(body: dict[str, Any]) -> PeerInfo:
    peer = field(body, "peer", dict)
    peer_id = _check_peer_id(field(peer, "peer_id", str))
    address = field(peer, "address", str)
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ApiError(
            400, "bad_request", f"peer address must be ip:port, not {address!r}"
        )
    return PeerInfo(peer_id, address, field(peer, "hostname", str, ""))


class SupernodeApi(JsonApi):
    def __init__(self, supernode: Supernode) -> None:
        super().__init__()
        self.supernode = supernode
        self.route(b"POST", ("v1", "tasks"), self.register)
        self.route(b"GET", ("v1", "tasks"), self.list_tasks)
        self.route(b"GET", ("v1", "tasks", "*"), self.task_info)
        self.route(b"POST", ("v1", "tasks", "*", "schedule"), self.schedule)
        self.route(b"DELETE", ("v1", "tasks", "*", "peers", "*"), self.leave)
        self.route(b"POST", ("v1", "peers", "*", "heartbeat"), self.heartbeat)
        self.route(b"GET", ("v1", "status"), self.status)
        self.preheats = Preheater(supernode)
        self.route(b"POST", ("v1", "preheats"), self.start_preheat)
        self.route(b"GET", ("v1", "preheats"), self.list_preheats)
        self.route(b"GET", ("v1", "preheats", "*"), self.preheat_info)

    async def register(self, request: Request, params: list[str]) -> Any:
        body = read_json(request)
        registration = Registration(
            url=field(body, "url", str),
            peer=_peer(body),
            headers=_headers(body.get("headers") or {}),
            digest=field(body, "digest", str, ""),
            identifier=field(body, "identifier", str, ""),
            filters=[str(f) for f in field(body, "filters", list, [])],
        )
        with _errors():
            return await self.supernode.register(registration)

    async def schedule(self, request: Request, params: list[str]) -> Any:
        body = read_json(request)
        finished = field(body, "finished", list, [])
        if not all(isinstance(p, int) and not isinstance(p, bool) for p in finished):
            raise ApiError(
                400, "bad_request", "finished must be a list of piece numbers"
            )
        failed = []
        for item in field(body, "failed", list, []):
            if not isinstance(item, dict):
                raise ApiError(400, "bad_request", "failed must be a list of objects")
            failed.append(
                FailedPiece(
                    field(item, "piece", int),
                    field(item, "peer_id", str),
                    field(item, "reason", str, "error"),
                )
            )
        with _errors():
            return await self.supernode.schedule(
                params[0],
                field(body, "peer_id", str),
                finished,
                failed,
                field(body, "want", int, 0),
                field(body, "wait", float, 0.0),
            )

    async def leave(self, request: Request, params: list[str]) -> Any:
        peer_id = _check_peer_id(params[1], in_path=True)
        with _errors():
            await self.supernode.leave(params[0], peer_id)
        return {}

    async def heartbeat(self, request: Request, params: list[str]) -> Any:
        peer_id = _check_peer_id(params[0], in_path=True)
        body = read_json(request)
        task_ids = field(body, "tasks", list, [])
        if not all(isinstance(t, str) for t in task_ids):
            raise ApiError(400, "bad_request", "tasks must be a list of task ids")
        return {"unknown": await self.supernode.heartbeat(peer_id, task_ids)}

    async def list_tasks(self, request: Request, params: list[str]) -> Any:
        return {"tasks": await self.supernode.list_tasks()}

    async def task_info(self, request: Request, params: list[str]) -> Any:
        with _errors():
            return await self.supernode.task_info(params[0])

    async def status(self, request: Request, params: list[str]) -> Any:
        return await snapshot(self.supernode)

    async def start_preheat(self, request: Request, params: list[str]) -> Any:
        body = read_json(request)
        headers = _headers(body.get("headers") or {})
        with _errors():
            preheat_request = parse_preheat(body, headers)
        try:
            preheat = self.preheats.start(preheat_request)
        except PreheatBusy as e:
            raise ApiError(429, "busy", str(e)) from e
        request.setHeader("location", f"/api/v1/preheats/{preheat.id}")
        write_json(request, 202, preheat.to_json())
        return NOT_DONE_YET

    async def list_preheats(self, request: Request, params: list[str]) -> Any:
        preheats = self.preheats.recent()
        for preheat in preheats:
            await self.preheats.refresh(preheat)
        return {"preheats": [preheat.summary() for preheat in preheats]}

    async def preheat_info(self, request: Request, params: list[str]) -> Any:
        preheat = self.preheats.get(params[0])
        if preheat is None:
            raise ApiError(404, "unknown", f"unknown preheat {params[0]}")
        await self.preheats.refresh(preheat)
        return preheat.to_json()


@contextmanager
def _errors() -> Iterator[None]:
    """
    Map the core's exceptions to API errors.
    """
    try:
        yield
    except InvalidRequest as e:
        raise ApiError(400, "bad_request", str(e)) from e
    except UnknownTask as e:
        raise ApiError(404, "unknown", str(e)) from e
    except ContentMismatch as e:
        raise ApiError(502, "digest", str(e)) from e
    except SourceError as e:
        raise ApiError(
            504 if e.status == 504 else 502, "source", str(e), source_status=e.status
        ) from e


class _PreheatsAlias(Resource):
    """
    C{/preheats}, where Dragonfly 1.x's preheat API is (and so its users'
    scripts), answered by the same handlers as C{/api/v1/preheats}.
    """

    isLeaf = True

    def __init__(self, api: SupernodeApi) -> None:
        super().__init__()
        self._api = api

    def render(self, request: Request) -> Any:
        request.postpath = [b"v1", b"preheats", *(request.postpath or [])]
        return self._api.render(request)


def root(supernode: Supernode) -> Resource:
    """
    The API's resource tree: the status page C{/}, C{/_ping},
    C{/api/v1/...}, C{/preheats} and C{/metrics}; a JSON 404 elsewhere.
    """
    top = Root()
    api = SupernodeApi(supernode)
    top.putChild(b"", StatusPage(supernode))
    top.putChild(b"_ping", PlainText(b"OK"))
    top.putChild(b"api", api)
    top.putChild(b"preheats", _PreheatsAlias(api))
    top.putChild(b"metrics", MetricsResource(supernode.metrics.registry))
    return top
