"""
HTTP clients (treq over Twisted's Agent) with the settings the daemons use.
"""

from typing import Any

from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.iweb import IPolicyForHTTPS


class _QuietClientFactory(_HTTP11ClientFactory):
    # Every pooled connection would otherwise log "Starting factory" twice.
    noisy = False


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
