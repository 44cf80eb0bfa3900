"""
dfpeer's local HTTP API: downloads through the swarm for programs on the
host, and the peer's state.

  - C{GET /api/v1/files?url=...[&digest=sha256:...]}: download through the
    swarm and stream the file back (headers of the request other than
    hop-by-hop ones are passed to the source).  The body starts once the
    file is complete and verified; C{X-Dragonfly-Sha256} and
    C{X-Dragonfly-From} tell its digest and where its bytes came from.
  - C{GET /api/v1/tasks}: the tasks this peer holds.
  - C{GET /_ping}: C{OK}.
  - C{GET /metrics}: the peer's metrics for Prometheus (see
    C{docs/metrics.md}).
"""

import json
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.http import as_text, end_to_end_headers
from dragonfly.jsonapi import ApiError, JsonApi
from dragonfly.metrics import MetricsResource
from dragonfly.peer.engine import DownloadError, DownloadRequest, PeerEngine
from dragonfly.resources import FileBody, PlainText, Root
from dragonfly.tasks import InvalidRequest, check_digest, check_url

_STATUS_OF = {
    "source": 502,
    "digest": 502,
    "timeout": 504,
    "supernode": 503,
    "swarm": 503,
    "io": 507,
}


class PeerApi(JsonApi):
    def __init__(self, engine: PeerEngine) -> None:
        super().__init__()
        self.engine = engine
        self.route(b"GET", ("v1", "files"), self.file)
        self.route(b"GET", ("v1", "tasks"), self.tasks)

    async def file(self, request: Request, params: list[str]) -> Any:
        args = request.args or {}
        url = (args.get(b"url") or [b""])[0].decode("utf-8", "replace")
        digest = (args.get(b"digest") or [b""])[0].decode("ascii", "replace")
        try:
            check_url(url)
            if digest:
                check_digest(digest)
        except InvalidRequest as e:
            raise ApiError(400, "bad_request", str(e)) from e
        headers = as_text(
            end_to_end_headers(request.requestHeaders, frozenset({b"content-length"}))
        )
        try:
            result = await self.engine.download(
                DownloadRequest(url=url, headers=headers, digest=digest)
            )
        except DownloadError as e:
            raise ApiError(
                _STATUS_OF.get(e.kind, 500), e.kind, e.message, source_status=e.status
            ) from e
        request.setResponseCode(200)
        request.setHeader("content-type", "application/octet-stream")
        request.setHeader("content-length", str(result.length))
        request.setHeader("x-dragonfly-sha256", result.sha256)
        request.setHeader("x-dragonfly-from", json.dumps(result.bytes_by_tier))
        if request.method == b"HEAD":
            request.finish()
            return NOT_DONE_YET
        stream = open(result.task_file.path, "rb")  # noqa: SIM115 - closed by the producer
        FileBody(request, stream).start()
        return NOT_DONE_YET

    async def tasks(self, request: Request, params: list[str]) -> Any:
        return {
            "peer_id": self.engine.peer_id,
            "address": self.engine.address,
            "tasks": [
                {
                    "task_id": task_id,
                    "length": task_file.length,
                    "pieces_held": len(task_file.held),
                    "url": self.engine.registrations.get(task_id, {}).get("url", ""),
                }
                for task_id, task_file in self.engine.store.tasks.items()
            ],
        }


def root(engine: PeerEngine, mirror: Resource | None = None) -> Resource:
    """
    dfpeer's HTTP tree: C{/_ping}, C{/api/v1/...} and the registry mirror
    at C{/v2/}; a JSON 404 elsewhere.
    """
    top = Root()
    top.putChild(b"_ping", PlainText(b"OK"))
    top.putChild(b"api", PeerApi(engine))
    top.putChild(b"metrics", MetricsResource(engine.metrics.registry))
    if mirror is not None:
        top.putChild(b"v2", mirror)
    return top
