"""
Scenario 4, the supernode's control plane: 1,000 simulated peers join one
task and report pieces, through the real API over loopback, and the latency
of every scheduling call is recorded.

The peers are lightweight clients in this process (asyncio, one keep-alive
HTTP/1.1 connection each), shaped like the real engine: each has 6 download
slots, asks for as many pieces as it has free slots, "fetches" each assigned
piece in L{PIECE_SECONDS} (no bytes move: only the control plane is
measured), and reports what finished in its next call; one call at a time
per peer, so pieces that finish meanwhile are batched.  Calls never wait on
the server (C{wait} 0): when nothing was assigned and nothing is in flight
the peer asks again after L{BACKOFF} instead of long-polling, so the
latencies are the server's work and queueing, not time spent parked in a
long poll.  Peers join evenly over L{RAMP} seconds; each leaves once it
holds every piece.

The task (64 pieces of 1 MiB, from a source generating the content) is
fully cached before the first simulated peer joins.  The supernode's CPU is
its user + system time from C{/proc/<pid>/stat} over the measured phase.
The clients share the machine's two cores with the supernode, so their own
CPU time is reported too.
"""

import asyncio
import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from dragonfly.bench.common import (
    MIB,
    BenchError,
    Context,
    Processes,
    Supernode,
    cpu_seconds,
    median,
    percentile,
    remove,
    start_source,
    start_supernode,
)
from dragonfly.bench.report import Line, Section, verdict

PEERS = 1000
SLOTS = 6
PIECE_SIZE = MIB
PIECES = 64
PIECE_SECONDS = 0.25
BACKOFF = 0.25
RAMP = 10.0
PHASE_TIMEOUT = 300.0
TARGET = 0.050


@dataclass
class _Latencies:
    register: list[float] = field(default_factory=list)
    schedule: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    calls_with_pieces: int = 0


@dataclass
class _Run:
    latencies: _Latencies
    seconds: float
    supernode_cpu: float
    client_cpu: float


class _Connection:
    """
    One keep-alive HTTP/1.1 connection speaking JSON.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(
                self.host, self.port
            )
        assert self._reader is not None
        data = json.dumps(body).encode() if body is not None else b""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        self._writer.write(head.encode() + data)
        reply = await self._reader.readuntil(b"\r\n\r\n")
        lines = reply.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        raw = await self._reader.readexactly(length)
        return status, json.loads(raw) if raw else None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


async def _peer(
    index: int, port: int, url: str, task_id: str, out: _Latencies, start_at: float
) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))
    connection = _Connection("127.0.0.1", port)
    # Distinct identities, as if on 127.0.1.0/24 and beyond.
    address = f"127.0.{1 + index // 250}.{1 + index % 250}:{40000 + index}"
    peer_id = f"{address.partition(':')[0]}-{index}-sim"
    try:
        begun = time.monotonic()
        status, reply = await connection.call(
            "POST",
            "/api/v1/tasks",
            {"url": url, "peer": {"peer_id": peer_id, "address": address}},
        )
        out.register.append(time.monotonic() - begun)
        if status != 200 or reply["task_id"] != task_id:
            out.errors.append(f"register: HTTP {status} {reply}")
            return
        in_flight: dict[int, float] = {}
        finished: list[int] = []
        while True:
            now = loop.time()
            for piece, due in list(in_flight.items()):
                if due <= now:
                    del in_flight[piece]
                    finished.append(piece)
            body = {
                "peer_id": peer_id,
                "finished": finished,
                "want": SLOTS - len(in_flight),
                "wait": 0,
            }
            begun = time.monotonic()
            status, reply = await connection.call(
                "POST", f"/api/v1/tasks/{task_id}/schedule", body
            )
            out.schedule.append(time.monotonic() - begun)
            if status != 200:
                out.errors.append(f"schedule: HTTP {status} {reply}")
                return
            finished = []
            if reply["status"] == "done":
                break
            if reply["pieces"]:
                out.calls_with_pieces += 1
            arrived = loop.time()
            for assignment in reply["pieces"]:
                in_flight[int(assignment["piece"])] = arrived + PIECE_SECONDS
            if in_flight:
                await asyncio.sleep(max(0.0, min(in_flight.values()) - loop.time()))
            else:
                await asyncio.sleep(BACKOFF)
        await connection.call("DELETE", f"/api/v1/tasks/{task_id}/peers/{peer_id}")
    finally:
        connection.close()


async def _swarm(
    port: int,
    url: str,
    task_id: str,
    out: _Latencies,
    count: int = PEERS,
    ramp: float = RAMP,
) -> None:
    loop = asyncio.get_running_loop()
    first = loop.time() + 0.1
    peers = [
        _peer(i, port, url, task_id, out, first + ramp * i / count)
        for i in range(count)
    ]
    await asyncio.wait_for(asyncio.gather(*peers), PHASE_TIMEOUT)


def simulate_peers(
    port: int, url: str, task_id: str, count: int, ramp: float
) -> tuple[int, list[str]]:
    """
    Run C{count} simulated peers joining the cached task C{task_id} over
    C{ramp} seconds until each holds every piece (the load test uses this
    too); return how many scheduling calls they made and the errors seen.
    """
    out = _Latencies()
    asyncio.run(_swarm(port, url, task_id, out, count, ramp))
    return len(out.schedule), out.errors


def _cache(supernode: Supernode, url: str) -> str:
    """
    Register once so that the supernode fetches the task, wait until it is
    cached, and leave; return the task id.
    """
    base = f"http://{supernode.node}/api/v1/tasks"
    body = {"url": url, "peer": {"peer_id": "bench-seed", "address": "127.0.0.9:1"}}
    request = urllib.request.Request(
        base,
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        task_id = str(json.loads(response.read())["task_id"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{base}/{task_id}", timeout=10) as response:
            if json.loads(response.read())["status"] == "done":
                break
        time.sleep(0.2)
    else:
        raise BenchError("the supernode did not cache the task in 120s")
    leave = urllib.request.Request(
        f"{base}/{task_id}/peers/bench-seed", method="DELETE"
    )
    with urllib.request.urlopen(leave, timeout=10):
        pass
    return task_id


def _one(ctx: Context, procs: Processes, source_port: int, index: int) -> _Run:
    work = ctx.work / "control"
    supernode = start_supernode(
        procs, work / "sn", extra=["--piece-size", str(PIECE_SIZE)]
    )
    try:
        url = f"http://127.0.0.1:{source_port}/gen/{PIECES * PIECE_SIZE}.bin"
        task_id = _cache(supernode, url)
        out = _Latencies()
        spy = None
        if ctx.profiler is not None and index == 0:
            spy = ctx.profiler.attach(procs, "4-supernode", supernode.proc.pid)
        cpu_before = cpu_seconds(supernode.proc.pid)
        client_before = sum(os.times()[:2])
        started = time.monotonic()
        asyncio.run(_swarm(supernode.api_port, url, task_id, out))
        seconds = time.monotonic() - started
        if spy is not None and ctx.profiler is not None:
            ctx.profiler.detach(spy, "4-supernode")
            ctx.say(f"  profile of the supernode in {ctx.profiler.directory}")
        supernode_cpu = cpu_seconds(supernode.proc.pid) - cpu_before
        client_cpu = sum(os.times()[:2]) - client_before
        if out.errors:
            raise BenchError(
                f"{len(out.errors)} calls failed, the first: {out.errors[0]}"
            )
        return _Run(out, seconds, supernode_cpu, client_cpu)
    finally:
        procs.stop(supernode.proc)
        remove(supernode.home)


def run(ctx: Context) -> Section:
    work = ctx.work / "control"
    remove(work)
    section = Section("4. Supernode control plane")
    runs: list[_Run] = []
    try:
        with Processes() as procs:
            port = start_source(procs, work / "src", work / "source.out")
            # The slowest scenario: one run is enough for --quick's check.
            runs_wanted = 1 if ctx.quick and not ctx.repeat_given else ctx.repeat
            for index in range(runs_wanted):
                ctx.say(f"4. control plane #{index + 1}: {PEERS} simulated peers ...")
                result = _one(ctx, procs, port, index)
                runs.append(result)
                lat = result.latencies.schedule
                ctx.say(
                    f"  {len(lat)} scheduling calls in {result.seconds:.1f}s: p50 "
                    f"{percentile(lat, 0.5) * 1000:.1f} ms, p99 "
                    f"{percentile(lat, 0.99) * 1000:.1f} ms; supernode CPU "
                    f"{result.supernode_cpu / result.seconds:.0%}"
                )
    finally:
        remove(work)
    p50 = [percentile(r.latencies.schedule, 0.5) for r in runs]
    p99 = [percentile(r.latencies.schedule, 0.99) for r in runs]
    cpu = [r.supernode_cpu / r.seconds for r in runs]
    section.lines += [
        Line(
            f"4 control plane, {PEERS} peers, p99",
            f"{median(p99) * 1000:.1f} ms",
            f"p50 {median(p50) * 1000:.1f} ms",
            "-",
            f"p99 <= {TARGET * 1000:.0f} ms",
            verdict(median(p99) <= TARGET),
            f"supernode CPU {median(cpu):.0%} of a core",
        )
    ]
    section.details += [
        f"{PEERS} simulated peers in the bench process join one task of "
        f"{PIECES} pieces over {RAMP:g} s; {SLOTS} slots each, "
        f"{PIECE_SECONDS * 1000:.0f} ms per simulated piece, calls with `wait` 0 "
        f"and a {BACKOFF * 1000:.0f} ms pause when nothing was assigned. "
        "Latency is from writing the request to reading the whole reply, on "
        "a keep-alive connection per peer."
        + (" The first run was profiled (py-spy)." if ctx.profiler else ""),
        "",
        "| run | calls | calls/s | schedule p50 ms | p99 ms | max ms | "
        "register p50 / p99 ms | supernode CPU | client CPU | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for index, r in enumerate(runs):
        lat = r.latencies.schedule
        reg = r.latencies.register
        section.details.append(
            f"| {index + 1} | {len(lat)} | {len(lat) / r.seconds:.0f} | "
            f"{percentile(lat, 0.5) * 1000:.1f} | {percentile(lat, 0.99) * 1000:.1f} | "
            f"{max(lat) * 1000:.1f} | {percentile(reg, 0.5) * 1000:.1f} / "
            f"{percentile(reg, 0.99) * 1000:.1f} | "
            f"{r.supernode_cpu / r.seconds:.0%} ({r.supernode_cpu:.1f} s) | "
            f"{r.client_cpu / r.seconds:.0%} | {r.seconds:.1f} |"
        )
    return section
