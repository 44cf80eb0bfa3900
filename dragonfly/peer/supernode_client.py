"""
The peer's side of the supernode's control API, with fail-over.

A peer may know several supernodes (C{--node}).  Registration tries them in
order and sticks to the first that answers; when that one stops answering
mid-download the caller registers again, and the next node takes over.
"""

import json
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from dragonfly.http import http_client, read_bounded
from dragonfly.tls import TLSConfig

MAX_REPLY = 4 << 20


class SupernodeUnavailable(Exception):
    """
    No supernode could be reached (or all answered with server errors).
    """


class SupernodeRefused(Exception):
    """
    A supernode answered with an error about the request itself.

    @ivar status: the HTTP status; C{body} the decoded JSON error.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message") or f"supernode answered HTTP {status}")
        self.status = status
        self.body = body


@implementer(IPolicyForHTTPS)
class _PeerTLSPolicy:
    def __init__(self, tls: TLSConfig) -> None:
        self._tls = tls

    def creatorForNetloc(
        self, hostname: bytes, port: int
    ) -> IOpenSSLClientConnectionCreator:
        return self._tls.client_options(hostname.decode("ascii"))


@dataclass
class Node:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_nodes(values: list[str]) -> list[Node]:
    """
    Parse C{host[:port]} items, comma-separated or repeated; port 8002 by
    default.

    @raise ValueError: on a malformed item.
    """
    nodes = []
    for value in values:
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                continue
            host, sep, port = item.partition(":")
            if not host or (sep and not port.isdigit()):
                raise ValueError(f"bad supernode address {item!r} (want host:port)")
            number = int(port) if sep else 8002
            if not 0 < number < 65536:
                raise ValueError(f"bad port in supernode address {item!r}")
            nodes.append(Node(host, number))
    if not nodes:
        raise ValueError("no supernode given")
    return nodes


class SupernodeClient:
    """
    JSON calls to the supernode currently in use.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        nodes: list[Node],
        tls: TLSConfig | None = None,
        bind_ip: str = "",
    ) -> None:
        self._reactor = reactor
        self.nodes = nodes
        self._current = 0
        self._scheme = "https" if tls else "http"
        self._http = http_client(
            reactor,
            connect_timeout=5,
            bind_ip=bind_ip,
            tls_policy=_PeerTLSPolicy(tls) if tls else None,
        )

    @property
    def node(self) -> Node:
        return self.nodes[self._current]

    async def register(self, body: dict[str, Any], timeout: float) -> dict[str, Any]:
        """
        Register with the first supernode that answers, starting with the one
        in use and moving on in order.

        @raise SupernodeUnavailable: if none answers usefully.
        @raise SupernodeRefused: if one refuses the request itself (a bad URL,
            or the source's error).
        """
        return await self.post_first("/api/v1/tasks", body, timeout)

    async def post_first(
        self, path: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """
        POST C{body} to C{path} on the first supernode that answers, as
        L{register} does, and stick to that one.
        """
        errors = []
        for step in range(len(self.nodes)):
            index = (self._current + step) % len(self.nodes)
            node = self.nodes[index]
            try:
                reply = await self._call(node, "POST", path, body, timeout)
            except SupernodeUnavailable as e:
                errors.append(f"{node}: {e}")
                continue
            self._current = index
            return reply
        raise SupernodeUnavailable("; ".join(errors))

    def next_node(self) -> None:
        """
        Move on from a supernode that stopped answering.
        """
        self._current = (self._current + 1) % len(self.nodes)

    async def get(self, path: str, timeout: float) -> dict[str, Any]:
        """
        GET C{path} from the supernode in use.
        """
        return await self._call(self.node, "GET", path, None, timeout)

    async def schedule(
        self, task_id: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        return await self._call(
            self.node, "POST", f"/api/v1/tasks/{task_id}/schedule", body, timeout
        )

    async def heartbeat(self, peer_id: str, task_ids: list[str]) -> dict[str, Any]:
        return await self._call(
            self.node,
            "POST",
            f"/api/v1/peers/{peer_id}/heartbeat",
            {"tasks": task_ids},
            10.0,
        )

    async def leave(self, task_id: str, peer_id: str) -> None:
        await self._call(
            self.node, "DELETE", f"/api/v1/tasks/{task_id}/peers/{peer_id}", None, 5.0
        )

    async def _call(
        self, node: Node, method: str, path: str, body: Any, timeout: float
    ) -> dict[str, Any]:
        url = f"{self._scheme}://{node}{path}"
        data = json.dumps(body).encode() if body is not None else None
        try:
            response = await self._http.request(
                method,
                url,
                data=data,
                headers=Headers({"Content-Type": ["application/json"]}),
                timeout=timeout,
            )
            raw = await read_bounded(response, MAX_REPLY)
        except CancelledError:
            raise
        except ResponseNeverReceived as e:
            if any(reason.check(CancelledError) for reason in e.reasons):
                # Our own cancellation, not the supernode's failure.
                raise CancelledError() from e
            raise SupernodeUnavailable(f"{type(e).__name__}: {e}") from e
        except Exception as e:
            raise SupernodeUnavailable(f"{type(e).__name__}: {e}") from e
        try:
            reply = json.loads(raw) if raw else {}
        except ValueError:
            reply = {"message": raw[:200].decode("utf-8", "replace")}
        if response.code >= 500 and response.code not in (502, 504):
            raise SupernodeUnavailable(
                f"HTTP {response.code}: {reply.get('message', '')}"
            )
        if response.code >= 400:
            raise SupernodeRefused(response.code, reply)
        if not isinstance(reply, dict):
            raise SupernodeUnavailable("reply is not a JSON object")
        return reply
