"""
HTTP clients (treq over Twisted's Agent) with the settings the daemons use.
"""

from typing import Any

from treq.client import HTTPClient
from treq.content import collect
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS

# Headers that concern one connection, never passed on (RFC 9110, 7.6.1);
# Host is the next hop's business too.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)


def end_to_end_headers(
    headers: Headers, drop: frozenset[bytes] = frozenset()
) -> Headers:
    """
    The headers to pass on: all but the hop-by-hop ones, those that
    C{Connection} names, and C{drop} (lower-case names).
    """
    listed = {
        token.strip().lower().encode("latin-1")
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.decode("latin-1").split(",")
    }
    kept = Headers()
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP and lowered not in listed and lowered not in drop:
            kept.setRawHeaders(name, list(values))
    return kept


def as_text(headers: Headers) -> dict[str, list[str]]:
    """
    Headers as the JSON-able mapping the supernode's API and the engine take.
    """
    return {
        name.decode("latin-1"): [v.decode("latin-1") for v in values]
        for name, values in headers.getAllRawHeaders()
    }


class _QuietClientFactory(_HTTP11ClientFactory):
    # Every pooled connection would otherwise log "Starting factory" twice.
    noisy = False


def raw_agent(reactor: Any, *, connect_timeout: float = 10.0) -> Agent:
    """
    An Agent that leaves responses as they are: no redirects followed, no
    content decoding (what a proxy needs).
    """
    pool = HTTPConnectionPool(reactor)
    pool._factory = _QuietClientFactory
    return Agent(reactor, connectTimeout=connect_timeout, pool=pool)


def http_client(
    reactor: Any,
    *,
    connect_timeout: float = 10.0,
    bind_ip: str = "",
    tls_policy: IPolicyForHTTPS | None = None,
) -> HTTPClient:
    """
    A treq client with a persistent connection pool.
    """
    pool = HTTPConnectionPool(reactor)
    pool._factory = _QuietClientFactory
    options: dict[str, Any] = {
        "connectTimeout": connect_timeout,
        "bindAddress": (bind_ip, 0) if bind_ip else None,
        "pool": pool,
    }
    if tls_policy is not None:
        options["contextFactory"] = tls_policy
    return HTTPClient(Agent(reactor, **options))


async def read_bounded(response: Any, limit: int) -> bytes:
    """
    A small response body, read whole.

    @raise ValueError: if it is longer than C{limit} bytes.
    """
    chunks: list[bytes] = []
    size = 0

    def keep(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)
        if size > limit:
            raise ValueError(f"response body over {limit} bytes")
        chunks.append(chunk)

    await collect(response, keep)
    return b"".join(chunks)
