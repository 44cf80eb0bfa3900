"""
Hostile clients against real daemons on loopback: slow-loris connections
on every port, and thousands of malformed piece-protocol connections and
HTTP requests, with the daemons' memory and descriptors measured before
and after.  Every daemon must close what it cannot use within a bounded
time, keep serving normal clients meanwhile, and end where it started.
"""

import contextlib
import hashlib
import http.client
import json
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile import (
    MIB,
    client_hello,
    fetch_piece,
    open_fds,
    rss_bytes,
    settle_fds,
    socket_budget,
)
from loopback import (
    Daemon,
    Dfget,
    Processes,
    SourceServer,
    TestFile,
    http_get,
    sha256_of,
    start_dfpeer,
    start_supernode,
)

from dragonfly import wire
from dragonfly.tasks import task_id_for

pytestmark = pytest.mark.loopback

HTTP_TIMEOUT = 2.0  # --http-timeout given to both daemons
HANDSHAKE_TIMEOUT = 10.0  # the piece servers' deadline for a HELLO
PIECE = MIB


@dataclass
class Daemons:
    source: SourceServer
    supernode: Daemon
    dfpeer: Daemon
    file: TestFile
    url: str
    task_id: str

    def piece_ports(self) -> list[tuple[str, int]]:
        return [
            (self.supernode.ip, self.supernode.extra["piece_port"]),
            (self.dfpeer.ip, self.dfpeer.extra["peer_port"]),
        ]

    def http_ports(self) -> list[tuple[str, int]]:
        return [
            (self.supernode.ip, self.supernode.port),
            (self.dfpeer.ip, self.dfpeer.port),
        ]

    def pids(self) -> dict[str, int]:
        return {"supernode": self.supernode.proc.pid, "dfpeer": self.dfpeer.proc.pid}


@pytest.fixture
def daemons(processes: Processes, work: Path, source: SourceServer) -> Daemons:
    """
    A supernode and a dfpeer (on 127.0.0.2) with a 2 s HTTP timeout, both
    holding a 4 MiB file of 1 MiB pieces; the dfpeer's upstream registry is
    the test source.
    """
    data = source.add_file("file.bin", 4 * PIECE)
    supernode = start_supernode(
        processes,
        work / "supernode",
        extra=["--piece-size", "1M", "--http-timeout", f"{HTTP_TIMEOUT:g}s"],
    )
    dfpeer = start_dfpeer(
        processes,
        work / "dfpeer",
        supernode.node,
        ip="127.0.0.2",
        extra=[
            "--http-timeout",
            f"{HTTP_TIMEOUT:g}s",
            "--registry",
            f"http://{source.host}:{source.port}",
        ],
    )
    url = source.url("file.bin")
    status, _, body = http_get(dfpeer.url(f"/api/v1/files?url={url}"), timeout=60)
    assert status == 200 and hashlib.sha256(body).hexdigest() == data.sha256
    return Daemons(source, supernode, dfpeer, data, url, task_id_for(url))


def _served_normally(d: Daemons) -> list[float]:
    """
    A normal client of every port: C{/_ping} on both HTTP ports and a piece
    from both piece ports, each answered right; returns how long each took.
    """
    took = []
    for host, port in d.http_ports():
        began = time.monotonic()
        status, _, body = http_get(f"http://{host}:{port}/_ping", timeout=5)
        took.append(time.monotonic() - began)
        assert (status, body) == (200, b"OK")
    expected = (d.source.root / "file.bin").read_bytes()[PIECE : 2 * PIECE]
    for host, port in d.piece_ports():
        began = time.monotonic()
        assert fetch_piece(host, port, d.task_id, 1) == expected
        took.append(time.monotonic() - began)
    return took


# Slow loris --------------------------------------------------------------------


@dataclass
class _Loris:
    sock: socket.socket
    kind: str
    data: bytes
    opened: float
    sent: int = 0
    closed_after: float | None = None


def _loris_bytes(kind: str) -> bytes:
    if kind == "http":
        # A request line, then headers that never end: a byte at a time,
        # each sooner than the idle timeout.
        return b"GET /_ping HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: 1\r\n" * 500
    # A HELLO frame missing its last byte, a byte at a time.
    hello = wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "loris", "127.0.0.9:1"))
    return hello[:-1]


def _poll_closed(lorises: list[_Loris], now: float) -> None:
    open_ones = {x.sock.fileno(): x for x in lorises if x.closed_after is None}
    if not open_ones:
        return
    readable, _, _ = select.select(list(open_ones), [], [], 0)
    for fd in readable:
        loris = open_ones[fd]
        try:
            if loris.sock.recv(4096):
                continue  # an answer (an error frame, a 408): wait for the close
        except OSError:
            pass
        loris.closed_after = now - loris.opened


def test_slow_loris_on_every_port_is_cut_off_while_others_are_served(
    daemons: Daemons, dfget: Dfget
) -> None:
    """
    50 connections on each of the four ports (both daemons' HTTP and piece
    ports) trickle a request a byte every 0.5 s, more often than the idle
    timeout.  The HTTP ports close them at their 2 s request deadline, the
    piece ports at their 10 s handshake deadline; meanwhile /_ping, piece
    requests and a whole dfget are served at once.
    """
    ports = [(*a, "http") for a in daemons.http_ports()] + [
        (*a, "piece") for a in daemons.piece_ports()
    ]
    per_port = socket_budget(4 * 50) // 4
    assert per_port >= 10, "too few file descriptors for this test"
    lorises: list[_Loris] = []
    normal: list[float] = []
    errors: list[BaseException] = []

    def normal_clients() -> None:
        try:
            for _ in range(3):
                normal.extend(_served_normally(daemons))
                time.sleep(0.5)
        except BaseException as e:
            errors.append(e)

    try:
        for host, port, kind in ports:
            for _ in range(per_port):
                sock = socket.create_connection((host, port), timeout=5)
                sock.setblocking(False)
                lorises.append(_Loris(sock, kind, _loris_bytes(kind), time.monotonic()))
        started = time.monotonic()
        checker = threading.Thread(target=normal_clients)
        checker.start()
        run = dfget.start(daemons.url, node=daemons.supernode.node, ip="127.0.0.3")
        limit = started + HANDSHAKE_TIMEOUT + 10
        while time.monotonic() < limit:
            now = time.monotonic()
            _poll_closed(lorises, now)
            pending = [x for x in lorises if x.closed_after is None]
            if not pending:
                break
            for loris in pending:
                if loris.sent < len(loris.data):
                    try:
                        loris.sock.send(loris.data[loris.sent : loris.sent + 1])
                        loris.sent += 1
                    except OSError:
                        loris.closed_after = now - loris.opened
            time.sleep(0.5)
        checker.join(30)
        result = run.finish(60)
    finally:
        for loris in lorises:
            loris.sock.close()
    assert not errors, errors
    assert result.code == 0, result.stderr
    assert sha256_of(result.output) == daemons.file.sha256

    still_open = [x.kind for x in lorises if x.closed_after is None]
    assert not still_open, f"{len(still_open)} slow connections never closed"
    http = [x.closed_after or 0.0 for x in lorises if x.kind == "http"]
    piece = [x.closed_after or 0.0 for x in lorises if x.kind == "piece"]
    assert max(http) < HTTP_TIMEOUT + 2.5, sorted(http)
    assert min(piece) > HANDSHAKE_TIMEOUT - 1 and max(piece) < HANDSHAKE_TIMEOUT + 3
    assert max(normal) < 2.0, normal
    print(
        f"slow loris: {len(lorises)} connections; HTTP closed after "
        f"{min(http):.1f}-{max(http):.1f}s, piece ports after "
        f"{min(piece):.1f}-{max(piece):.1f}s; normal requests meanwhile took "
        f"at most {max(normal) * 1000:.0f} ms"
    )


# Fuzzing the piece ports -------------------------------------------------------

FUZZ_CONNECTIONS = 2000
BATCH = 100


def _raw_frame(kind: int, request_id: int, payload: bytes, flags: int = 0) -> bytes:
    return wire.HEADER.pack(kind, flags, 0, request_id, len(payload)) + payload


def _hostile_payloads(known_task: str, seed: int) -> Callable[[], bytes]:
    """
    A generator of hostile first bytes for a piece port, seeded: garbage,
    huge lengths, wrong versions and magic, unknown tasks, out-of-range
    pieces, truncated and mutated frames, too many requests, HTTP, a TLS
    ClientHello, a port scanner's probes.
    """
    rng = random.Random(seed)
    hello = wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "fuzz", "127.0.0.9:1"))
    good = hello + wire.encode(wire.GetPiece(1, known_task, 0))
    tls = client_hello()

    def garbage() -> bytes:
        return rng.randbytes(rng.randint(1, 4096))

    def huge_length() -> bytes:
        kind = rng.choice([int(k) for k in wire.MessageType])
        length = rng.choice([wire.MAX_CONTROL_LENGTH + 1, 1 << 31, 0xFFFFFFFF])
        return hello + wire.HEADER.pack(kind, 0, 0, 7, length)

    def wrong_version() -> bytes:
        version = rng.choice([0, 2, 255, 65535]).to_bytes(2, "big")
        at = wire.HEADER.size + len(wire.MAGIC)
        return hello[:at] + version + hello[at + 2 :]

    def bad_magic() -> bytes:
        at = wire.HEADER.size
        return hello[:at] + rng.randbytes(4) + hello[at + 4 :]

    def bad_header() -> bytes:
        kind = rng.choice([0, 6, 200, 255])
        flags = rng.choice([0, 1, 128])
        return hello + _raw_frame(kind, 1, rng.randbytes(rng.randint(0, 64)), flags)

    def unknown_task() -> bytes:
        return hello + wire.encode(wire.GetPiece(1, rng.randbytes(32).hex(), 0))

    def out_of_range() -> bytes:
        piece = rng.choice([4, 1000, 2**31 - 1, 2**32 - 1])
        return hello + wire.encode(wire.GetPiece(1, known_task, piece))

    def truncated() -> bytes:
        return good[: rng.randint(1, len(good) - 1)]

    def mutated() -> bytes:
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)

    def flood() -> bytes:
        return hello + b"".join(
            wire.encode(wire.GetPiece(i, known_task, i % 4)) for i in range(300)
        )

    def server_frames() -> bytes:
        return hello + wire.encode(
            rng.choice(
                [
                    wire.PieceHeader(1, 0, 1 << 20),
                    wire.Error(1, 1, "x" * 100),
                    wire.Cancel(99),
                    wire.Hello(wire.PROTOCOL_VERSION, "again", "127.0.0.9:1"),
                ]
            )
        )

    def http() -> bytes:
        return rng.choice(
            [
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /v2/ HTTP/1.0\r\n\r\n",
                b"OPTIONS * HTTP/1.1\r\n\r\n",
            ]
        )

    def scanner() -> bytes:
        # Connect-and-close, then the probes nmap's service scan sends.
        return rng.choice([b"", b"\r\n\r\n", b"HELP\r\n", b"\x00" * 40, tls[:5]])

    kinds = [
        garbage,
        huge_length,
        wrong_version,
        bad_magic,
        bad_header,
        unknown_task,
        out_of_range,
        truncated,
        mutated,
        flood,
        server_frames,
        http,
        scanner,
        lambda: tls,
    ]

    def one() -> bytes:
        return rng.choice(kinds)()

    return one


def _fuzz(ports: list[tuple[str, int]], make: Callable[[], bytes], total: int) -> int:
    """
    C{total} hostile connections spread over C{ports}, C{BATCH} at a time:
    each sends its bytes and is closed (some with a reset) once the daemon
    closed it or after 0.2 s.  Returns how many the daemons closed first.
    """
    closed_by_daemon = 0
    done = 0
    rng = random.Random(1)
    while done < total:
        batch = []
        for i in range(min(BATCH, total - done)):
            host, port = ports[(done + i) % len(ports)]
            sock = socket.create_connection((host, port), timeout=5)
            payload = make()
            with contextlib.suppress(OSError):
                sock.sendall(payload)
            sock.setblocking(False)
            batch.append(sock)
        deadline = time.monotonic() + 0.2
        waiting = {s.fileno(): s for s in batch}
        while waiting and time.monotonic() < deadline:
            readable, _, _ = select.select(list(waiting), [], [], 0.05)
            for fd in readable:
                try:
                    if waiting[fd].recv(65536):
                        continue
                except OSError:
                    pass
                del waiting[fd]
                closed_by_daemon += 1
        for sock in batch:
            if rng.random() < 0.3:
                # An abortive close (RST), as scanners do.
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            sock.close()
        done += len(batch)
    return closed_by_daemon


def test_fuzzing_the_piece_ports_of_live_daemons(
    daemons: Daemons, dfget: Dfget
) -> None:
    """
    2,000 hostile connections (seeded random and mutated frames, huge
    lengths, wrong versions, unknown tasks, out-of-range pieces, truncated
    frames, HTTP, a TLS ClientHello, scanner probes) against the supernode's
    and the dfpeer's piece ports.  Afterwards both still serve pieces and a
    whole dfget, their memory grew by less than 20 MiB and their open
    descriptors are back to where they were.
    """
    pids = daemons.pids()
    make = _hostile_payloads(daemons.task_id, seed=20241203)
    # Warm up: the first hostile connections and normal fetches allocate
    # what any later ones reuse (buffers, log files, the thread pool).
    _fuzz(daemons.piece_ports(), make, 200)
    _served_normally(daemons)
    time.sleep(1.0)  # the warm-up's connections close
    fds = {name: open_fds(pid) for name, pid in pids.items()}
    rss = {name: rss_bytes(pid) for name, pid in pids.items()}

    began = time.monotonic()
    closed = _fuzz(daemons.piece_ports(), make, FUZZ_CONNECTIONS)
    seconds = time.monotonic() - began

    _served_normally(daemons)
    result = dfget.run(daemons.url, node=daemons.supernode.node, ip="127.0.0.3")
    assert result.code == 0, result.stderr
    assert sha256_of(result.output) == daemons.file.sha256
    after_fds = {name: settle_fds(pid, fds[name] + 3) for name, pid in pids.items()}
    after_rss = {name: rss_bytes(pid) for name, pid in pids.items()}
    for name in pids:
        assert after_fds[name] <= fds[name] + 3, (name, fds, after_fds)
        assert after_rss[name] - rss[name] < 20 * MIB, (name, rss, after_rss)
    print(
        f"piece-port fuzzing: {FUZZ_CONNECTIONS} connections in {seconds:.1f}s, "
        f"{closed} closed by the daemons first; "
        + "; ".join(
            f"{n}: RSS {rss[n] / MIB:.1f} -> {after_rss[n] / MIB:.1f} MiB, "
            f"fds {fds[n]} -> {after_fds[n]}"
            for n in pids
        )
    )


# Fuzzing the HTTP ports ------------------------------------------------------

HEX = "ab" * 32
_TRAVERSALS = [
    "..",
    "%2e%2e",
    "%2E%2E%2F%2E%2E",
    "..%2f..%2fetc%2fpasswd",
    "%2fetc%2fpasswd",
    "/etc/passwd",
    "....//....//etc",
    "%00",
    "a" * 300,
]


def _http(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {
            "Content-Length": str(len(body)),
            "Connection": "close",
            **(headers or {}),
        }.items():
            connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            response.read(),
        )
    finally:
        connection.close()


def _raw_answer(daemon: Daemon, headers: str) -> bytes:
    with socket.create_connection((daemon.ip, daemon.port), timeout=10) as s:
        request = f"GET /_ping HTTP/1.1\r\nHost: x\r\n{headers}\r\n"
        with contextlib.suppress(OSError):
            s.sendall(request.encode())
        try:
            return s.recv(200)
        except ConnectionResetError:
            return b""


def _supernode_requests(rng: random.Random) -> list[tuple[str, str, bytes]]:
    peer = {"peer_id": "fuzz", "address": "127.0.0.9:1"}
    bodies = [
        b"",
        b"{",
        b"[]",
        b"null",
        b'"x"',
        b"\xff\xfe",
        json.dumps({"url": 5, "peer": peer}).encode(),
        json.dumps({"url": "file:///etc/passwd", "peer": peer}).encode(),
        json.dumps({"url": "http://127.0.0.1:1/../../etc/passwd"}).encode(),
        json.dumps(
            {"url": "http://127.0.0.1:1/x", "digest": "sha256:zz", "peer": peer}
        ).encode(),
        json.dumps(
            {"url": "http://127.0.0.1:1/x", "peer": {"peer_id": "../../x"}}
        ).encode(),
        b'{"url": "' + b"a" * (2 * MIB) + b'"}',
    ]
    requests = [("POST", "/api/v1/tasks", b) for b in bodies]
    schedules = [
        {"peer_id": "fuzz", "want": -1},
        {"peer_id": "fuzz", "want": 10**9},
        {"peer_id": "fuzz", "finished": ["x"], "want": 1},
        {"peer_id": "fuzz", "failed": [{"piece": -1}], "want": 1},
        {"peer_id": "fuzz", "finished": list(range(5000))},
        {"peer_id": 7},
    ]
    requests += [
        ("POST", f"/api/v1/tasks/{HEX}/schedule", json.dumps(b).encode())
        for b in schedules
    ]
    for bad in _TRAVERSALS:
        requests += [
            ("GET", f"/api/v1/tasks/{bad}", b""),
            ("POST", f"/api/v1/tasks/{bad}/schedule", b"{}"),
            ("DELETE", f"/api/v1/tasks/{HEX}/peers/{bad}", b""),
            ("POST", f"/api/v1/peers/{bad}/heartbeat", b'{"tasks": []}'),
        ]
    for _ in range(150):
        path = "/api/v1/" + "/".join(
            rng.choice(["tasks", "peers", HEX, "schedule", "heartbeat", *_TRAVERSALS])
            for _ in range(rng.randint(1, 5))
        )
        body = rng.choice([b"", rng.randbytes(rng.randint(1, 200)), b"{}"])
        requests.append((rng.choice(["GET", "POST", "DELETE", "PUT"]), path, body))
    return requests


def _dfpeer_requests(rng: random.Random, source: str) -> list[tuple[str, str, bytes]]:
    requests = [
        ("GET", "/api/v1/files", b""),
        ("GET", "/api/v1/files?url=", b""),
        ("GET", "/api/v1/files?url=file:///etc/passwd", b""),
        ("GET", "/api/v1/files?url=ftp://127.0.0.1/x", b""),
        ("GET", "/api/v1/files?url=" + "a" * 5000, b""),
        ("GET", f"/api/v1/files?url={source}/..%2f..%2fetc%2fpasswd", b""),
        ("GET", f"/v2/library/x/blobs/sha256:{'z' * 64}", b""),
        ("GET", f"/v2/library/x/blobs/sha256:{HEX[:63]}", b""),
        ("GET", "/v2/library/x/blobs/md5:abc", b""),
        ("PUT", f"/v2/library/x/blobs/sha256:{HEX}", b"x"),
    ]
    for bad in _TRAVERSALS:
        requests += [
            ("GET", f"/v2/{bad}/blobs/sha256:{HEX}", b""),
            ("GET", f"/v2/library/{bad}/manifests/latest", b""),
            ("GET", f"/v2/library/x/manifests/{bad}", b""),
            ("GET", f"/v2/{bad}/{bad}/manifests/latest", b""),
        ]
    for _ in range(150):
        path = "/v2/" + "/".join(
            rng.choice(["library", "blobs", "manifests", "x", *_TRAVERSALS])
            for _ in range(rng.randint(1, 6))
        )
        requests.append((rng.choice(["GET", "HEAD", "DELETE"]), path, b""))
    return requests


def _tree(root: Path, homes: list[Path]) -> set[Path]:
    return {
        p
        for p in root.rglob("*")
        if not any(h == p or h in p.parents for h in homes) and p.is_file()
    }


def test_fuzzing_the_http_ports_gets_clear_4xx_answers(
    daemons: Daemons, work: Path
) -> None:
    """
    Malformed JSON, absurd sizes, invalid digests, path traversal (C{..},
    C{%2e%2e}, absolute paths) in task ids, peer ids, repository names and
    references, and oversized headers, against the supernode API and the
    dfpeer's API and mirror: every refusal is a 4xx (with a JSON message
    from our own resources), never a 5xx (but the 502 passing on a source's
    404) or a traceback; a heartbeat or leave naming an odd peer id is a
    harmless 200 (peer ids are opaque keys, never paths); no file appears
    outside the daemons' homes, and both daemons end as they began.
    """
    rng = random.Random(7)
    homes = [daemons.supernode.home, daemons.dfpeer.home]
    before = _tree(work, homes)
    pids = daemons.pids()
    fds = {name: open_fds(pid) for name, pid in pids.items()}
    rss = {name: rss_bytes(pid) for name, pid in pids.items()}
    source = f"http://{daemons.source.host}:{daemons.source.port}"
    targets = [(daemons.supernode, r) for r in _supernode_requests(rng)] + [
        (daemons.dfpeer, r) for r in _dfpeer_requests(rng, source)
    ]
    answers: dict[int, int] = {}
    for daemon, (method, path, body) in [
        *targets,
        (daemons.supernode, ("GET", "/api/v1/tasks", b"")),
        (daemons.dfpeer, ("GET", "/_ping", b"")),
    ]:
        status, headers, answer = _http(daemon.ip, daemon.port, method, path, body)
        answers[status] = answers.get(status, 0) + 1
        if status == 502 and path.startswith("/api/v1/files"):
            # A gateway's answer: the source refused; its status is passed on.
            reply = json.loads(answer)
            assert reply["error"] == "source" and reply["source_status"] == 404
            continue
        assert status < 500, (daemon.port, method, path, status, answer[:300])
        assert b"Traceback" not in answer, answer
        if status >= 400 and path.startswith("/api/"):
            assert headers.get("content-type", "").startswith("application/json")
            message = json.loads(answer)
            assert message.get("message"), (path, answer[:300])
        elif (
            status >= 400
            and method != "HEAD"
            and "json" in headers.get("content-type", "")
        ):
            errors = json.loads(answer).get("errors")
            assert errors and errors[0]["message"], (path, answer[:300])
    for daemon in (daemons.supernode, daemons.dfpeer):
        for size in (10000, 20000, 200000):
            # Past Twisted's 16 KiB of headers: a bare 400, or (one line over
            # the limit) the connection closed at once.
            answer = _raw_answer(daemon, f"X-Big: {'a' * size}\r\n" * 2)
            assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
        assert "Traceback" not in daemon.log_text()
    _served_normally(daemons)

    assert _tree(work, homes) - before <= {daemons.source.log}
    for name, pid in pids.items():
        assert settle_fds(pid, fds[name] + 3) <= fds[name] + 3, name
        assert rss_bytes(pid) - rss[name] < 20 * MIB, name
    print(
        f"HTTP fuzzing: {len(targets)} requests, answers by status {answers}; "
        + "; ".join(
            f"{n}: RSS {rss[n] / MIB:.1f} -> {rss_bytes(pid) / MIB:.1f} MiB, "
            f"fds {fds[n]} -> {open_fds(pid)}"
            for n, pid in pids.items()
        )
    )
