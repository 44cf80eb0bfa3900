"""
A bare piece-protocol client, for scenario 1's breakdown (run as its own
process)::

    python -m dragonfly.bench.wire_client --address IP:PORT --task-id ID \\
        --piece-size N --length N --ip 127.0.0.3 [--verify-write FILE] [TLS]

It fetches every piece of a task from one node with the engine's own
L{PieceClientPool}, keeping L{IN_FLIGHT} requests outstanding (what the
scheduler lets one peer serve to one requester), and prints
C{WIRE <seconds> <bytes>}.  Alone it measures the protocol and Twisted
(with the sha256 the client computes as bytes arrive); with
C{--verify-write} each piece is also written
at its offset on the thread pool and its buffer given back for the next
piece, as the engine does, but with no supernode
round trip between pieces.  Comparing the two with a whole C{dfget} shows which stage
costs what.
"""

import argparse
import os
import time
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import react
from twisted.internet.threads import deferToThread

from dragonfly.piece_protocol import Identity, PieceClientPool, ReceivedPiece
from dragonfly.tls import TLSConfig

IN_FLIGHT = 5


def _write(fd: int, data: ReceivedPiece, offset: int) -> None:
    # The engine compares data.sha256 with the supernode's digest here, a
    # string comparison; the trusted digest is not known to this client.
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


async def fetch_all(reactor: Any, args: argparse.Namespace) -> None:
    tls = None
    if args.tls_cert:
        tls = TLSConfig.load(args.tls_cert, args.tls_key, args.tls_ca)
    pool = PieceClientPool(
        reactor, Identity(f"{args.ip}-wire", f"{args.ip}:1"), bind_ip=args.ip, tls=tls
    )
    count = (args.length + args.piece_size - 1) // args.piece_size
    todo = list(range(count))
    fd = -1
    if args.verify_write:
        fd = os.open(args.verify_write, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    async def worker() -> None:
        while todo:
            piece = todo.pop(0)
            offset = piece * args.piece_size
            size = min(args.piece_size, args.length - offset)
            data = await pool.fetch(args.address, args.task_id, piece, size)
            if fd >= 0:
                await deferToThread(_write, fd, data, offset)
                pool.give_back(data)

    started = time.monotonic()
    try:
        await gatherResults(
            [Deferred.fromCoroutine(worker()) for _ in range(IN_FLIGHT)]
        )
        print(f"WIRE {time.monotonic() - started:.6f} {args.length}", flush=True)
    finally:
        pool.close()
        if fd >= 0:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-id", required=True)
    parser.add_argument("--piece-size", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--ip", default="127.0.0.3")
    parser.add_argument("--verify-write", default="")
    parser.add_argument("--tls-cert", default="")
    parser.add_argument("--tls-key", default="")
    parser.add_argument("--tls-ca", default="")
    args = parser.parse_args()
    react(lambda reactor: Deferred.fromCoroutine(fetch_all(reactor, args)))


if __name__ == "__main__":
    main()
