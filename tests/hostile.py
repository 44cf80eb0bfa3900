"""
Helpers for the hostile-client tests: a blocking piece-protocol client, a
daemon's resident memory and open descriptors from C{/proc}, and a TLS
ClientHello made by the ssl module itself.
"""

import contextlib
import os
import resource
import socket
import ssl
import time
from pathlib import Path

from dragonfly import wire

MIB = 1 << 20


def fetch_piece(
    host: str, port: int, task_id: str, piece: int, timeout: float = 5.0
) -> bytes:
    """
    One piece over a fresh connection (HELLO, GET_PIECE): its payload.

    @raise AssertionError: on an ERROR frame or an early close.
    """
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(
            wire.encode(wire.Hello(wire.PROTOCOL_VERSION, "hostile", "127.0.0.9:1"))
            + wire.encode(wire.GetPiece(1, task_id, piece))
        )
        decoder = wire.Decoder()
        data = bytearray()
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise AssertionError(f"{host}:{port} closed before piece {piece}")
            for event in decoder.feed(chunk):
                if isinstance(event, wire.Error):
                    raise AssertionError(f"{host}:{port} answered {event}")
                if isinstance(event, wire.PayloadChunk):
                    data += event.data
                elif isinstance(event, wire.PayloadEnd):
                    return bytes(data)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settle_fds(pid: int, at_most: int, timeout: float = 10.0) -> int:
    """
    Wait (bounded) until C{pid} has at most C{at_most} descriptors open;
    return the count it ended with.
    """
    deadline = time.monotonic() + timeout
    count = open_fds(pid)
    while count > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
        count = open_fds(pid)
    return count


def client_hello() -> bytes:
    """
    The first bytes a TLS client sends: a real ClientHello.
    """
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def socket_budget(wanted: int) -> int:
    """
    How many extra sockets this process may open, at most C{wanted}: the
    descriptor limit raised to its hard maximum, less what is in use and a
    margin.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    in_use = len(os.listdir("/proc/self/fd"))
    return max(0, min(wanted, soft - in_use - 64))
