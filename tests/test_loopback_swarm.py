"""
Real processes on loopback: a counting HTTP source, a supernode under
C{twistd -n}, C{dfget} processes and a C{dfpeer} daemon, over plain TCP and
mutual TLS.

Each peer binds its own address (127.0.0.1, .2, .3), so the source's log
and the piece logs tell who fetched what from whom.
"""

import hashlib
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from certs import PKI
from loopback import (
    MIB,
    Dfget,
    DfgetResult,
    Processes,
    SourceServer,
    free_port,
    http_get,
    piece_lines,
    sha256_of,
    start_dfpeer,
    start_supernode,
)

from dragonfly import wire

pytestmark = pytest.mark.loopback

PEER_IPS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
SUCCESS = 503  # Dragonfly 1.x's "piece done" result code in dfclient.log
BIG = 48 * MIB - 12345  # 12 pieces, the last one short
PIECE = 4 * MIB


def _pieces(size: int) -> int:
    return -(-size // PIECE)


def _succeeded(result: DfgetResult, expected_sha256: str) -> None:
    assert result.code == 0, f"dfget exited {result.code}:\n{result.stderr}"
    assert "download SUCCESS" in result.stdout, result.stdout
    assert result.output.is_file()
    assert sha256_of(result.output) == expected_sha256


def _failed_without_output(result: DfgetResult, code: int) -> None:
    assert result.code == code, (
        f"dfget exited {result.code}, want {code}:\n{result.stdout}\n{result.stderr}"
    )
    assert "download FAIL" in result.stderr, result.stderr
    assert not result.output.exists()
    leftovers = [p.name for p in result.output.parent.glob(f".{result.output.name}*")]
    assert not leftovers, leftovers


def _fetched_through_swarm(result: DfgetResult, pieces: int) -> list[dict]:
    """
    Every piece has a successful C{downloading piece} line: the file came
    through the piece protocol, not back to source.
    """
    lines = result.pieces()
    done = {p["pieceNum"] for p in lines if p["result"] == SUCCESS}
    assert done == set(range(pieces)), (sorted(done), result.stdout)
    assert "back to source" not in result.stdout, result.stdout
    return lines


def _swarm_of_three(
    processes: Processes,
    work: Path,
    source: SourceServer,
    dfget: Dfget,
    pki: PKI | None,
) -> None:
    big = source.add_file("big.bin", BIG)
    supernode = start_supernode(processes, work / "supernode", pki=pki)
    url = source.url("big.bin")
    runs = [
        dfget.start(
            url, node=supernode.node, ip=ip, pki=pki, extra=["--keep-serving", "30s"]
        )
        for ip in PEER_IPS
    ]
    results = [run.finish(timeout=120) for run in runs]

    lines = []
    for result in results:
        _succeeded(result, big.sha256)
        lines += _fetched_through_swarm(result, _pieces(BIG))
    from_peers = [
        p
        for p in lines
        if p["result"] == SUCCESS and not p["dstCid"].startswith("cdnnode:")
    ]
    assert from_peers, "no piece was fetched from another peer"
    peer_addresses = {p["dstAddr"].rpartition(":")[0] for p in from_peers}
    assert peer_addresses <= set(PEER_IPS)

    # The source was read about once, by the supernode only.
    requests = source.requests("big.bin")
    assert {r["client"] for r in requests} == {supernode.ip}
    assert source.bytes_sent("big.bin") <= 1.05 * BIG, requests

    # The supernode's API agrees: the task is done and peers served pieces.
    tasks = supernode.get_json("/api/v1/tasks")["tasks"]
    (task,) = [t for t in tasks if t["url"] == url]
    assert task["status"] == "done"
    assert task["length"] == BIG
    assert task["file_sha256"] == big.sha256
    info = supernode.get_json(f"/api/v1/tasks/{task['task_id']}")
    served_by_peers = {
        k: v for k, v in info["pieces_served"].items() if not k.startswith("cdnnode:")
    }
    assert sum(served_by_peers.values()) >= 1, info


def test_source_server_counts_bytes_and_serves_ranges(source: SourceServer) -> None:
    """
    The counting source, the yardstick of these tests, serves whole files,
    single ranges (206, 416 past the end), honours If-None-Match (304) and
    If-Range, answers 404 for missing files, and logs for each request the
    body bytes it sent.
    """
    data = source.add_file("r.bin", 1000)
    raw = data.path.read_bytes()
    url = source.url("r.bin")
    status, headers, body = http_get(url)
    assert (status, body, headers["content-length"]) == (200, raw, "1000")
    etag = headers["etag"]
    status, headers, body = http_get(url, headers={"Range": "bytes=100-199"})
    assert (status, body) == (206, raw[100:200])
    assert headers["content-range"] == "bytes 100-199/1000"
    status, _, body = http_get(url, headers={"Range": "bytes=990-", "If-Range": etag})
    assert (status, body) == (206, raw[990:])
    status, _, body = http_get(url, headers={"Range": "bytes=5-", "If-Range": '"x"'})
    assert (status, body) == (200, raw)
    assert http_get(url, headers={"Range": "bytes=1000-"})[0] == 416
    assert http_get(url, headers={"If-None-Match": etag})[0] == 304
    assert http_get(source.url("nope.bin"))[0] == 404
    source.wait_for_requests(7)
    logged = [(r["status"], r["bytes_sent"]) for r in source.requests()]
    assert logged == [
        (200, 1000),
        (206, 100),
        (206, 10),
        (200, 1000),
        (416, 0),
        (304, 0),
        (404, 10),
    ]
    assert source.bytes_sent("r.bin") == 2110


def test_three_peers_share_pieces_over_tcp(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    Three concurrent dfgets (127.0.0.1, .2, .3) of a ~48 MiB file through a
    plain-TCP supernode all produce the source's bytes, take at least one
    piece from another peer, and the source sends the file about once
    (at most 1.05 x its size).
    """
    _swarm_of_three(processes, work, source, dfget, None)


def test_three_peers_share_pieces_over_mutual_tls(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget, pki: PKI
) -> None:
    """
    The same swarm over mutual TLS (supernode API, piece port and every
    peer with a certificate naming its own IP, all signed by one CA): same
    bytes, pieces between peers, source read about once.  That the
    certificates are checked (see the two tests below).
    """
    _swarm_of_three(processes, work, source, dfget, pki)


def _raw_tls(
    host: str, port: int, pki: PKI, client_ip: str, rogue: bool, tls12: bool
) -> bytes:
    """
    Connect to a piece port with a client certificate, say HELLO and return
    the first bytes answered (b"" on EOF).  Raises C{ssl.SSLError} when the
    handshake (or, under TLS 1.3, the first read after it) is refused.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki.ca))
    leaf = pki.rogue_leaf(client_ip) if rogue else pki.leaf(client_ip)
    context.load_cert_chain(str(leaf.cert), str(leaf.key))
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(
        (host, port), timeout=5, source_address=(client_ip, 0)
    ) as raw:
        raw.settimeout(5)
        with context.wrap_socket(raw, server_hostname=host) as tls:
            tls.sendall(
                wire.encode(
                    wire.Hello(wire.PROTOCOL_VERSION, "raw-test", f"{client_ip}:1")
                )
            )
            return tls.recv(4096)


def test_untrusted_certificate_gets_nothing(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget, pki: PKI
) -> None:
    """
    Against a mutual-TLS supernode, a dfget whose certificate is signed by
    another CA (it trusts the right CA itself) cannot register: with
    C{--notbs} it exits 6, writes no output, and the source never sees it.
    A raw TLS connection to the supernode's piece port with the untrusted
    certificate fails (the handshake is refused under TLS 1.2; under TLS 1.3
    the server answers the HELLO with an alert or a hang-up, never a HELLO),
    while the same connection with a trusted certificate gets the
    supernode's HELLO back.  A trusted dfget then succeeds against the same
    supernode, so the refusal was about the certificate.
    """
    small = source.add_file("small.bin", 8 * MIB)
    supernode = start_supernode(processes, work / "supernode", pki=pki)
    url = source.url("small.bin")
    rogue = pki.rogue_leaf("127.0.0.2")
    result = dfget.run(
        url,
        node=supernode.node,
        ip="127.0.0.2",
        extra=[
            "--notbs",
            "--tls-cert",
            str(rogue.cert),
            "--tls-key",
            str(rogue.key),
            "--tls-ca",
            str(pki.ca),
        ],
        timeout=60,
    )
    _failed_without_output(result, 6)
    assert "back to source is disabled" in result.stderr
    assert source.requests("small.bin") == []

    piece_port = supernode.extra["piece_port"]
    with pytest.raises(ssl.SSLError):
        _raw_tls("127.0.0.1", piece_port, pki, "127.0.0.2", rogue=True, tls12=True)
    try:
        answer = _raw_tls(
            "127.0.0.1", piece_port, pki, "127.0.0.2", rogue=True, tls12=False
        )
    except (ssl.SSLError, ConnectionResetError):
        answer = b""
    assert answer == b"", answer

    for tls12 in (True, False):
        answer = _raw_tls(
            "127.0.0.1", piece_port, pki, "127.0.0.2", rogue=False, tls12=tls12
        )
        events = wire.Decoder().feed(answer)
        assert events and isinstance(events[0], wire.Hello), answer
        assert events[0].peer_id.startswith("cdnnode:127.0.0.1")

    trusted = dfget.run(url, node=supernode.node, ip="127.0.0.3", pki=pki, timeout=60)
    _succeeded(trusted, small.sha256)


def test_tls_api_does_not_speak_plain_http(
    processes: Processes, work: Path, pki: PKI
) -> None:
    """
    A mutual-TLS supernode's control API answers only over TLS with a
    trusted client certificate: plain HTTP and an untrusted certificate get
    no HTTP answer, a trusted certificate gets C{/_ping} → OK.
    """
    supernode = start_supernode(processes, work / "supernode", pki=pki)
    with pytest.raises(OSError):
        http_get(f"http://{supernode.node}/_ping", timeout=5)
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    leaf = pki.rogue_leaf("127.0.0.1")
    rogue.load_cert_chain(str(leaf.cert), str(leaf.key))
    with pytest.raises(OSError):
        http_get(supernode.url("/_ping"), timeout=5, context=rogue)
    assert (
        http_get(supernode.url("/_ping"), timeout=5, context=supernode.context)[2]
        == b"OK"
    )


def test_no_supernode_goes_back_to_source(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    With nothing listening on the --node port, dfget downloads straight from
    the source (exit 0, right bytes, the source saw the peer's own address),
    and with C{--notbs} it exits 6 without an output and without touching
    the source.
    """
    small = source.add_file("small.bin", 8 * MIB)
    dead = f"127.0.0.1:{free_port()}"
    url = source.url("small.bin")

    result = dfget.run(url, node=dead, ip="127.0.0.2", timeout=60)
    _succeeded(result, small.sha256)
    assert "back to source" in result.stdout
    assert [r["client"] for r in source.requests("small.bin")] == ["127.0.0.2"]
    assert source.bytes_sent("small.bin") == small.size

    refused = dfget.run(url, node=dead, ip="127.0.0.3", extra=["--notbs"], timeout=60)
    _failed_without_output(refused, 6)
    assert "back to source is disabled" in refused.stderr
    assert [r["client"] for r in source.requests("small.bin")] == ["127.0.0.2"]


@pytest.fixture(params=["supernode", "no-supernode"])
def node(request: pytest.FixtureRequest, processes: Processes, work: Path) -> str:
    """
    The --node to use: a running supernode, or a port where nothing listens
    (dfget then goes back to source).
    """
    if request.param == "supernode":
        return start_supernode(processes, work / "supernode").node
    return f"127.0.0.1:{free_port()}"


def test_source_404_exits_3(source: SourceServer, dfget: Dfget, node: str) -> None:
    """
    A URL the source answers 404 for makes dfget exit 3 with a message
    naming the HTTP status on stderr, and no output file, whether the
    supernode or dfget itself asked the source.
    """
    result = dfget.run(source.url("missing.bin"), node=node, ip="127.0.0.2", timeout=60)
    _failed_without_output(result, 3)
    assert "404" in result.stderr, result.stderr
    statuses = {r["status"] for r in source.requests("missing.bin")}
    assert statuses == {404}


def test_digest_checked(source: SourceServer, dfget: Dfget, node: str) -> None:
    """
    With a wrong C{--digest} dfget exits 4 and leaves no output; with the
    right one it exits 0 with the file.
    """
    small = source.add_file("small.bin", 6 * MIB)
    url = source.url("small.bin")
    wrong = "sha256:" + "0" * 64
    result = dfget.run(
        url, node=node, ip="127.0.0.2", extra=["--digest", wrong], timeout=60
    )
    _failed_without_output(result, 4)
    assert "sha256" in result.stderr

    right = dfget.run(
        url, node=node, ip="127.0.0.3", extra=["--digest", small.digest], timeout=60
    )
    _succeeded(right, small.sha256)


def test_dfpeer_serves_local_programs_and_the_swarm(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    A dfpeer daemon on 127.0.0.2 downloads a file for a local program over
    its HTTP API (right bytes, X-Dragonfly-Sha256 = their sha256), and a
    dfget on 127.0.0.3 of the same URL then takes pieces from the dfpeer
    (piece lines whose dstCid is the dfpeer's peer id and dstAddr its piece
    port).  The source is read once.  On SIGTERM the dfpeer leaves the
    swarm: the supernode no longer lists it.
    """
    data = source.add_file("peer.bin", 16 * MIB + 1)
    supernode = start_supernode(processes, work / "supernode")
    peer = start_dfpeer(processes, work / "dfpeer", supernode.node, ip="127.0.0.2")
    url = source.url("peer.bin")

    status, headers, body = http_get(peer.url(f"/api/v1/files?url={url}"), timeout=60)
    assert status == 200, body[:500]
    assert len(body) == data.size
    assert headers["content-length"] == str(data.size)
    assert hashlib.sha256(body).hexdigest() == data.sha256
    assert headers["x-dragonfly-sha256"] == data.sha256
    del body

    state = peer.get_json("/api/v1/tasks")
    peer_id = state["peer_id"]
    assert state["address"] == f"127.0.0.2:{peer.extra['peer_port']}"
    assert [t["pieces_held"] for t in state["tasks"]] == [_pieces(data.size)]

    result = dfget.run(url, node=supernode.node, ip="127.0.0.3", timeout=60)
    _succeeded(result, data.sha256)
    lines = _fetched_through_swarm(result, _pieces(data.size))
    from_peer = [p for p in lines if p["result"] == SUCCESS and p["dstCid"] == peer_id]
    assert from_peer, lines
    assert {p["dstAddr"] for p in from_peer} == {state["address"]}
    assert source.bytes_sent("peer.bin") <= 1.05 * data.size

    task_id = state["tasks"][0]["task_id"]
    assert peer_id in supernode.get_json(f"/api/v1/tasks/{task_id}")["peers"]
    assert peer.stop() in (0, -signal.SIGTERM)
    assert peer_id not in supernode.get_json(f"/api/v1/tasks/{task_id}")["peers"]


def test_fail_over_to_the_next_supernode(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    With C{--node dead,good} dfget registers with the second supernode and
    downloads through it (C{--notbs}: the source is read by the supernode
    only); its piece lines name the supernode that answered.
    """
    data = source.add_file("f.bin", 8 * MIB)
    supernode = start_supernode(processes, work / "supernode")
    dead = f"127.0.0.1:{free_port()}"
    result = dfget.run(
        source.url("f.bin"),
        node=f"{dead},{supernode.node}",
        ip="127.0.0.2",
        extra=["--notbs"],
        timeout=60,
    )
    _succeeded(result, data.sha256)
    lines = _fetched_through_swarm(result, _pieces(data.size))
    assert {p["superNode"] for p in lines} == {supernode.node}
    assert {r["client"] for r in source.requests("f.bin")} == {"127.0.0.1"}


def test_restarted_supernode_reuses_its_cache(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    A supernode restarted on the same --home serves a file it cached before
    after revalidating it: the source answers 304 and sends no body again.
    """
    data = source.add_file("f.bin", 8 * MIB + 7)
    url = source.url("f.bin")
    first = start_supernode(processes, work / "supernode")
    _succeeded(dfget.run(url, node=first.node, ip="127.0.0.2", timeout=60), data.sha256)
    assert first.stop() in (0, -signal.SIGTERM)

    second = start_supernode(processes, work / "supernode")
    assert second.home == first.home
    result = dfget.run(
        url, node=second.node, ip="127.0.0.3", extra=["--notbs"], timeout=60
    )
    _succeeded(result, data.sha256)
    _fetched_through_swarm(result, _pieces(data.size))
    assert [r["status"] for r in source.requests("f.bin")] == [200, 304]
    assert source.bytes_sent("f.bin") == data.size


def test_supernode_lost_mid_download_goes_back_to_source(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    When the only supernode dies (SIGKILL) after dfget has fetched a piece
    from it, dfget finishes from the source: exit 0, the right bytes, and
    it says why it went back to source.
    """
    data = source.add_file("f.bin", 8 * MIB)
    supernode = start_supernode(processes, work / "supernode")
    run = dfget.start(
        source.url("f.bin"),
        node=supernode.node,
        ip="127.0.0.2",
        extra=["--locallimit", "2M"],
    )
    deadline = time.monotonic() + 20
    while (
        not piece_lines(run.home)
        and time.monotonic() < deadline
        and run.proc.poll() is None
    ):
        time.sleep(0.05)
    assert piece_lines(run.home), "dfget fetched no piece within 20 s"
    supernode.proc.send_signal(signal.SIGKILL)
    supernode.proc.wait(10)
    result = run.finish(timeout=60)
    _succeeded(result, data.sha256)
    assert "back to source: lost the supernode" in result.stdout, result.stdout
    assert "127.0.0.2" in {r["client"] for r in source.requests("f.bin")}


# Regressions: bugs these tests found ------------------------------------------


def test_empty_file_through_supernode(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget
) -> None:
    """
    A 0-byte file goes through the supernode like any other: dfget exits 0
    with an empty output, the supernode's task ends C{done} with the sha256
    of nothing, and the source is read once.
    """
    empty = source.add_file("empty.bin", 0)
    supernode = start_supernode(processes, work / "supernode")
    url = source.url("empty.bin")
    result = dfget.run(
        url,
        node=supernode.node,
        ip="127.0.0.2",
        extra=["--keep-serving", "3s"],
        timeout=30,
    )
    _succeeded(result, empty.sha256)
    assert result.output.stat().st_size == 0
    deadline = time.monotonic() + 10
    while True:
        (task,) = supernode.get_json("/api/v1/tasks")["tasks"]
        if task["status"] != "fetching" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert task["status"] == "done", task
    assert task["file_sha256"] == empty.sha256
    assert len(source.requests("empty.bin")) == 1, source.requests("empty.bin")


def test_dfpeer_serves_concurrent_requests_for_one_file(
    processes: Processes, work: Path, source: SourceServer
) -> None:
    """
    Three programs asking a dfpeer for the same URL at once share one
    download and all get the file (200, right bytes and sha256 header).
    """
    data = source.add_file("shared.bin", 12 * MIB)
    supernode = start_supernode(processes, work / "supernode")
    peer = start_dfpeer(processes, work / "dfpeer", supernode.node, ip="127.0.0.2")
    url = peer.url(f"/api/v1/files?url={source.url('shared.bin')}")
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: http_get(url, timeout=60), range(3)))
    for status, headers, body in answers:
        assert status == 200, body[:300]
        assert hashlib.sha256(body).hexdigest() == data.sha256
        assert headers["x-dragonfly-sha256"] == data.sha256
    assert source.bytes_sent("shared.bin") <= 1.05 * data.size


@pytest.mark.parametrize("notbs", [False, True], ids=["back-to-source", "notbs"])
def test_wrong_digest_found_by_supernode_exits_4(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget, notbs: bool
) -> None:
    """
    Through a supernode, a wrong C{--digest} is found by the supernode
    while it caches the file; dfget then exits 4 (digest) without an
    output, with or without C{--notbs}, and the source is read once (by
    the supernode), not a second time by dfget.
    """
    source.add_file("small.bin", 6 * MIB)
    supernode = start_supernode(processes, work / "supernode")
    wrong = "sha256:" + "0" * 64
    extra = ["--digest", wrong] + (["--notbs"] if notbs else [])
    result = dfget.run(
        source.url("small.bin"),
        node=supernode.node,
        ip="127.0.0.2",
        extra=extra,
        timeout=60,
    )
    assert {r["client"] for r in source.requests("small.bin")} == {"127.0.0.1"}
    _failed_without_output(result, 4)


def _cost(result: DfgetResult) -> float:
    """
    The download time dfget reports (C{cost:<seconds>s}), without its start-up.
    """
    return float(result.stdout.split("cost:", 1)[1].split("s", 1)[0])


LIMITED = 6 * MIB  # at 2M/s: a 2 MiB burst, then 4 MiB take 2 s


@pytest.mark.parametrize("flag", ["--locallimit", "--totallimit"])
def test_rate_limit_through_the_swarm(
    processes: Processes, work: Path, source: SourceServer, dfget: Dfget, flag: str
) -> None:
    """
    C{--locallimit 2M} / C{--totallimit 2M} slow a 6 MiB download through
    the supernode to at least ~2 s (one second's burst, then 2 MiB/s).
    """
    data = source.add_file("limited.bin", LIMITED)
    supernode = start_supernode(processes, work / "supernode")
    result = dfget.run(
        source.url("limited.bin"),
        node=supernode.node,
        ip="127.0.0.2",
        extra=[flag, "2M"],
        timeout=60,
    )
    _succeeded(result, data.sha256)
    assert "back to source" not in result.stdout
    assert _cost(result) >= 1.8, result.stdout


@pytest.mark.parametrize("flag", ["--locallimit", "--totallimit"])
def test_rate_limit_back_to_source(
    source: SourceServer, dfget: Dfget, flag: str
) -> None:
    """
    The same limits hold when there is no supernode and dfget reads the
    source itself: 6 MiB at 2M/s take at least ~2 s.
    """
    data = source.add_file("limited.bin", LIMITED)
    dead = f"127.0.0.1:{free_port()}"
    result = dfget.run(
        source.url("limited.bin"),
        node=dead,
        ip="127.0.0.2",
        extra=[flag, "2M"],
        timeout=60,
    )
    _succeeded(result, data.sha256)
    assert "back to source" in result.stdout
    assert _cost(result) >= 1.8, result.stdout
