"""
A throttling TCP proxy, run as its own process (stdlib only)::

    python -m dragonfly.bench.throttle --port 18081 --target 127.0.0.1:5000 \\
        --rate 20M

Every connection accepted on C{--ip:--port} is relayed to C{--target}.  The
bytes going back from the target to the clients are capped at C{--rate}
bytes per second in total, over every connection at once (the shared token
bucket of L{dragonfly.bench.sources.Throttle}); requests going to the target
are not slowed.  Scenario 5 puts it in front of the registry, so that the
registry looks like one with a 20 MiB/s uplink to every client together.
"""

import argparse
import contextlib
import socket
import threading

from dragonfly.bench.sources import CHUNK, Throttle
from dragonfly.units import parse_size


def _relay(
    source: socket.socket, sink: socket.socket, throttle: Throttle | None
) -> None:
    """
    Copy C{source} to C{sink} until C{source} ends, then half-close C{sink}.
    """
    try:
        while data := source.recv(CHUNK):
            if throttle is not None:
                throttle.take(len(data))
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _connection(
    client: socket.socket, target: tuple[str, int], throttle: Throttle | None
) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    for sock in (client, upstream):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    back = threading.Thread(
        target=_relay, args=(upstream, client, throttle), daemon=True
    )
    back.start()
    _relay(client, upstream, None)
    back.join()
    client.close()
    upstream.close()


def serve(ip: str, port: int, target: tuple[str, int], rate: int) -> None:
    """
    Relay until killed.
    """
    throttle = Throttle(rate) if rate else None
    with socket.create_server((ip, port), backlog=128) as server:
        while True:
            client, _ = server.accept()
            threading.Thread(
                target=_connection, args=(client, target, throttle), daemon=True
            ).start()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT to relay to")
    parser.add_argument("--rate", default="0", help="total bytes per second back")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    serve(args.ip, args.port, (host, int(port)), parse_size(args.rate))


if __name__ == "__main__":
    main()
