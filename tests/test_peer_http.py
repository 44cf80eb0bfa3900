"""
dfpeer's HTTP port beyond the registry mirror, with real daemons on
loopback: plain HTTP proxying with proxy rules, and HTTPS with --cert/--key.
"""

import hashlib
import http.client
import ssl
from pathlib import Path

import pytest
from certs import PKI
from loopback import (
    Processes,
    SourceServer,
    piece_lines,
    start_dfpeer,
    start_supernode,
)

MIB = 1 << 20

pytestmark = pytest.mark.loopback


def _proxy_get(peer_ip: str, port: int, url: str) -> tuple[int, dict[str, str], bytes]:
    """
    GET C{url} through the HTTP proxy at C{peer_ip:port} (absolute-form
    request line, as HTTP_PROXY clients send it).
    """
    connection = http.client.HTTPConnection(peer_ip, port, timeout=60)
    try:
        connection.request("GET", url)
        response = connection.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, body
    finally:
        connection.close()


def test_proxy_rules_send_matching_urls_through_the_swarm(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    With C{--proxy-rule '\\.iso$'}, a proxied GET of an .iso URL is
    downloaded through the swarm (piece lines in the dfpeer's client log,
    the source read once by the supernode) and comes back whole and right;
    a proxied GET of another URL is forwarded as it is (no pieces, the
    source read directly by the dfpeer).
    """
    iso = source.add_file("disk.iso", 9 * MIB + 3)
    other = source.add_file("notes.bin", 2 * MIB)
    supernode = start_supernode(processes, work / "supernode")
    peer = start_dfpeer(
        processes,
        work / "dfpeer",
        supernode.node,
        ip="127.0.0.2",
        extra=["--proxy-rule", r"\.iso$"],
    )

    status, headers, body = _proxy_get(peer.ip, peer.port, source.url("disk.iso"))
    assert status == 200, body[:300]
    assert hashlib.sha256(body).hexdigest() == iso.sha256
    assert headers["x-dragonfly-route"] == "p2p"
    pieces = piece_lines(peer.home)
    assert pieces and all(p["result"] == 503 for p in pieces), pieces
    assert source.bytes_sent("disk.iso") <= 1.05 * iso.size

    status, headers, body = _proxy_get(peer.ip, peer.port, source.url("notes.bin"))
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == other.sha256
    assert "x-dragonfly-route" not in headers
    assert len(piece_lines(peer.home)) == len(pieces)
    assert len(source.requests("notes.bin")) == 1
    urls = [t["url"] for t in supernode.get_json("/api/v1/tasks")["tasks"]]
    assert urls == [source.url("disk.iso")], urls


def test_proxy_refuses_other_methods(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    The proxy only relays GET and HEAD: a proxied POST gets 405 and never
    reaches the source.
    """
    source.add_file("x.bin", 1024)
    supernode = start_supernode(processes, work / "supernode")
    peer = start_dfpeer(processes, work / "dfpeer", supernode.node, ip="127.0.0.2")
    connection = http.client.HTTPConnection(peer.ip, peer.port, timeout=20)
    try:
        connection.request("POST", source.url("x.bin"), body=b"data")
        response = connection.getresponse()
        response.read()
    finally:
        connection.close()
    assert response.status == 405
    assert source.requests("x.bin") == []


def test_dfpeer_serves_its_http_port_over_https(
    processes: Processes, work: Path, pki: PKI
) -> None:
    """
    With C{--cert} and C{--key} the HTTP port speaks HTTPS with that
    certificate: a client trusting the CA gets C{/_ping} and C{/v2/}
    answers over TLS, and a plain-HTTP request gets no HTTP answer.
    """
    supernode = start_supernode(processes, work / "supernode")
    leaf = pki.leaf("127.0.0.2")
    directory = work / "dfpeer"
    context = ssl.create_default_context(cafile=str(pki.ca))
    peer = start_dfpeer(
        processes,
        directory,
        supernode.node,
        ip="127.0.0.2",
        extra=["--cert", str(leaf.cert), "--key", str(leaf.key)],
        https_context=context,
    )
    connection = http.client.HTTPSConnection(
        peer.ip, peer.port, timeout=20, context=context
    )
    try:
        connection.request("GET", "/_ping")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, b"OK")
    finally:
        connection.close()
    plain = http.client.HTTPConnection(peer.ip, peer.port, timeout=10)
    try:
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/_ping")
            plain.getresponse().read()
    finally:
        plain.close()
