"""
Scenario 1, piece protocol throughput: one peer fetches a whole task from
another over loopback, plain TCP and TLS, verifying and writing it to disk;
the reference is C{curl} fetching the same file from nginx (C{sendfile on})
over HTTP and HTTPS into a file on the same disk.

The serving peer is a C{dfpeer} daemon on 127.0.0.2 that downloaded the
file once through the swarm (the supernode fetched it from nginx).  The
timed peer is a fresh C{dfget} on 127.0.0.3: the scheduler sends it to the
peer rather than to the supernode whenever a peer holds a piece, so every
piece crosses the piece protocol from one peer to the other, is checked
against its sha256 and written with C{pwrite}; the output is then linked
into place.  The TLS run is mutual TLS everywhere (supernode, both peers);
nginx's HTTPS authenticates the server only.

Throughput is the file size over C{dfget}'s own C{cost} (registration to
output in place) and over C{curl}'s C{time_total}: neither counts process
start-up.  The figure with C{dfget}'s Python start-up is in the details.
"""

import re
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.bench.certs import Authority
from dragonfly.bench.common import (
    DOWNLOAD_TIMEOUT,
    GIB,
    MIB,
    SUPERNODE_IP,
    BenchError,
    Context,
    CurlResult,
    DfgetResult,
    Processes,
    Supernode,
    TLSFiles,
    cpu_seconds,
    curl_result,
    dfget_result,
    make_random_file,
    median,
    remove,
    size_text,
    start_curl,
    start_dfget,
    start_supernode,
    tool,
    tree_cpu_seconds,
    wait_port,
)
from dragonfly.bench.nginx import Nginx, start_nginx
from dragonfly.bench.report import Line, Section, verdict
from dragonfly.devtools.processes import free_port
from dragonfly.tasks import piece_size_for, task_id_for

SERVING_IP = "127.0.0.2"
FETCHING_IP = "127.0.0.3"
TARGET = 0.5


@dataclass
class _Variant:
    name: str
    tls: bool
    dfget: list[DfgetResult] = field(default_factory=list)
    curl: list[CurlResult] = field(default_factory=list)
    wire: list[float] = field(default_factory=list)
    verify_write: list[float] = field(default_factory=list)
    # CPU seconds of both ends, per run: (dfget, serving dfpeer) and
    # (curl, nginx).
    ours_cpu: list[tuple[float, float]] = field(default_factory=list)
    their_cpu: list[tuple[float, float]] = field(default_factory=list)


def _start_dfpeer(
    procs: Processes, home: Path, supernode: Supernode, tls: TLSFiles | None
) -> tuple[int, int]:
    """
    Start the serving peer; return the ports of its local API and of its
    piece server.
    """
    remove(home)
    home.mkdir(parents=True)
    api_port, piece_port = free_port(SERVING_IP), free_port(SERVING_IP)
    argv = [
        tool("twistd"),
        "-n",
        "--pidfile=",
        "-l",
        str(home / "dfpeer.log"),
        "dfpeer",
        "--node",
        supernode.node,
        "--ip",
        SERVING_IP,
        "--peer-port",
        str(piece_port),
        "--port",
        str(api_port),
        "--listen-ip",
        SERVING_IP,
        "--home",
        str(home),
        *(tls.flags() if tls else []),
    ]
    procs.start("dfpeer", argv, home / "dfpeer.out")
    wait_port(SERVING_IP, api_port)
    wait_port(SERVING_IP, piece_port)
    return api_port, piece_port


def _warm(api_port: int, url: str, expected: str) -> None:
    """
    Have the serving peer download the file through the swarm.
    """
    query = urllib.parse.urlencode({"url": url})
    request = f"http://{SERVING_IP}:{api_port}/api/v1/files?{query}"
    with urllib.request.urlopen(request, timeout=600) as response:
        digest = response.headers.get("X-Dragonfly-Sha256", "")
        while response.read(4 * MIB):
            pass
    if digest != expected:
        raise BenchError(f"the serving peer got sha256 {digest}, expected {expected}")


def _wire(
    procs: Processes,
    work: Path,
    address: str,
    url: str,
    size: int,
    tls: TLSFiles | None,
    verify_write: bool,
) -> float:
    """
    Seconds for the bare protocol client to fetch the task from the serving
    peer (L{dragonfly.bench.wire_client}), optionally hashing and writing.
    """
    output = work / "wire-out.bin"
    argv = [
        sys.executable,
        "-m",
        "dragonfly.bench.wire_client",
        "--address",
        address,
        "--task-id",
        task_id_for(url),
        "--piece-size",
        str(piece_size_for(size)),
        "--length",
        str(size),
        "--ip",
        FETCHING_IP,
        *(["--verify-write", str(output)] if verify_write else []),
        *(tls.flags() if tls else []),
    ]
    proc = procs.start("wire client", argv, work / "wire.out")
    try:
        code = proc.wait(DOWNLOAD_TIMEOUT)
        match = re.search(r"WIRE ([0-9.]+) (\d+)", proc.output())
        if code != 0 or match is None or int(match.group(2)) != size:
            raise BenchError(f"the wire client failed: {proc.output()[-800:]}")
        return float(match.group(1))
    finally:
        remove(output)


def _run_variant(
    ctx: Context,
    variant: _Variant,
    size: int,
    expected: str,
    nginx: Nginx,
    authority: Authority,
    work: Path,
) -> None:
    tls = {ip: authority.leaf(ip) for ip in (SUPERNODE_IP, SERVING_IP, FETCHING_IP)}
    with Processes() as procs:
        supernode = start_supernode(
            procs,
            work / f"sn-{variant.name}",
            tls[SUPERNODE_IP] if variant.tls else None,
        )
        api_port, piece_port = _start_dfpeer(
            procs,
            work / f"dfpeer-{variant.name}",
            supernode,
            tls[SERVING_IP] if variant.tls else None,
        )
        ctx.say(f"  {variant.name}: the serving peer downloads {size_text(size)} ...")
        _warm(api_port, nginx.http_url("task.bin"), expected)
        dfpeer = next(p for p in procs.started if p.name == "dfpeer")
        home, output = work / "dfget-home", work / "dfget-out.bin"
        curl_output = work / "curl-out.bin"
        for rep in range(ctx.repeat):
            # Alternate which goes first, so that neither always finds a
            # page cache the other just churned.
            for step in ("dfget", "curl") if rep % 2 == 0 else ("curl", "dfget"):
                if step == "dfget":
                    serving = cpu_seconds(dfpeer.pid)
                    proc = start_dfget(
                        procs,
                        nginx.http_url("task.bin"),
                        supernode,
                        FETCHING_IP,
                        home,
                        output,
                        keep_serving="0s",
                        tls=tls[FETCHING_IP] if variant.tls else None,
                    )
                    result = dfget_result(proc, home)
                    variant.ours_cpu.append(
                        (result.cpu, cpu_seconds(dfpeer.pid) - serving)
                    )
                    remove(output, home)
                    if result.sha256 != expected or result.length != size:
                        raise BenchError(f"dfget got {result.sha256}, not {expected}")
                    variant.dfget.append(result)
                else:
                    url = nginx.https_url("task.bin") if variant.tls else None
                    serving = tree_cpu_seconds(nginx.proc.pid)
                    proc = start_curl(
                        procs,
                        url or nginx.http_url("task.bin"),
                        curl_output,
                        work / "curl.out",
                        ca=authority.ca if variant.tls else None,
                    )
                    got = curl_result(proc)
                    variant.their_cpu.append(
                        (proc.cpu, tree_cpu_seconds(nginx.proc.pid) - serving)
                    )
                    remove(curl_output)
                    if got.size != size:
                        raise BenchError(f"curl got {got.size} bytes, not {size}")
                    variant.curl.append(got)
            address = f"{SERVING_IP}:{piece_port}"
            url = nginx.http_url("task.bin")
            client_tls = tls[FETCHING_IP] if variant.tls else None
            variant.wire.append(
                _wire(procs, work, address, url, size, client_tls, False)
            )
            variant.verify_write.append(
                _wire(procs, work, address, url, size, client_tls, True)
            )
            ctx.say(
                f"  {variant.name} #{rep + 1}: dfget "
                f"{size / variant.dfget[-1].cost / MIB:.0f} MiB/s, curl "
                f"{size / variant.curl[-1].seconds / MIB:.0f} MiB/s; bare client "
                f"{size / variant.wire[-1] / MIB:.0f} MiB/s, with verify+write "
                f"{size / variant.verify_write[-1] / MIB:.0f} MiB/s"
            )
        if ctx.profiler is not None:
            # An extra run, not counted: py-spy on both ends of the transfer.
            profiler = ctx.profiler
            name = f"1-{variant.name.lower()}"
            spy = profiler.attach(procs, f"{name}-serving-dfpeer", dfpeer.pid)
            proc = start_dfget(
                procs,
                nginx.http_url("task.bin"),
                supernode,
                FETCHING_IP,
                home,
                output,
                keep_serving="0s",
                tls=tls[FETCHING_IP] if variant.tls else None,
                wrap=lambda argv: profiler.wrap(f"{name}-fetching-dfget", argv),
            )
            proc.wait(DOWNLOAD_TIMEOUT)
            remove(output, home)
            profiler.detach(spy, f"{name}-serving-dfpeer")
            profiler.summarise(f"{name}-fetching-dfget")
            ctx.say(f"  {variant.name}: profiles in {profiler.directory}")
    remove(work / f"sn-{variant.name}", work / f"dfpeer-{variant.name}")


def run(ctx: Context) -> Section:
    size = 256 * MIB if ctx.quick else 1024 * MIB
    work = ctx.work / "throughput"
    remove(work)
    section = Section("1. Piece protocol throughput")
    variants = [_Variant("TCP", tls=False), _Variant("TLS", tls=True)]
    try:
        ctx.say(f"1. piece protocol: writing a {size_text(size)} file ...")
        expected = make_random_file(work / "www" / "task.bin", size)
        authority = Authority(work / "pki")
        with Processes() as procs:
            nginx = start_nginx(
                procs, work / "nginx", work / "www", authority.leaf("127.0.0.1")
            )
            for variant in variants:
                _run_variant(ctx, variant, size, expected, nginx, authority, work)
    finally:
        remove(work)
    for variant in variants:
        ours = median([size / r.cost for r in variant.dfget])
        theirs = median([size / r.seconds for r in variant.curl])
        ratio = ours / theirs
        protocol = "HTTPS" if variant.tls else "HTTP"
        section.lines.append(
            Line(
                f"1 piece protocol {variant.name}, {size_text(size)}",
                f"{ours / MIB:.0f} MiB/s",
                f"curl+nginx {protocol} {theirs / MIB:.0f} MiB/s",
                f"{ratio:.2f}x",
                f">= {TARGET:.2f}x curl",
                verdict(ratio >= TARGET),
            )
        )
        gib = size / GIB
        ours_cpu = median([a + b for a, b in variant.ours_cpu]) / gib
        their_cpu = median([a + b for a, b in variant.their_cpu]) / gib
        section.lines.append(
            Line(
                f"  ({variant.name}: CPU per GiB, both ends)",
                f"{ours_cpu:.2f} s",
                f"curl+nginx {their_cpu:.2f} s",
                f"{ours_cpu / their_cpu:.2f}x",
                "(breakdown)",
                "-",
            )
        )
        for what, seconds in (
            ("bare client", variant.wire),
            ("bare + verify/write", variant.verify_write),
        ):
            figure = median([size / s for s in seconds])
            section.lines.append(
                Line(
                    f"  ({variant.name}: {what})",
                    f"{figure / MIB:.0f} MiB/s",
                    f"curl+nginx {protocol} {theirs / MIB:.0f} MiB/s",
                    f"{figure / theirs:.2f}x",
                    "(breakdown)",
                    "-",
                )
            )
    section.details += [
        f"A {size_text(size)} task, served by a `dfpeer` on {SERVING_IP} that "
        f"downloaded it through the swarm, fetched by a fresh `dfget` on "
        f"{FETCHING_IP} ({ctx.repeat} times per protocol, alternating with curl). "
        "Throughput is the size over `dfget`'s own `cost` (registration to "
        "verified output in place) and over curl's `time_total`; *with start-up* "
        "counts from the launch of the `dfget` process instead. TLS is mutual TLS "
        "for the swarm, server-only TLS for nginx. The breakdown: a bare client "
        "(`dragonfly.bench.wire_client`: the engine's piece client pool, "
        "5 requests outstanding to the serving peer, no supernode) fetching the "
        "same task, alone and then also hashing and writing each piece on the "
        "thread pool as the engine does.",
        "",
        "| protocol | run | dfget MiB/s | with start-up | from peer "
        "| CPU s dfget + dfpeer | bare client MiB/s | bare + verify/write MiB/s "
        "| curl MiB/s | CPU s curl + nginx |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant in variants:
        for index, (ours_run, curl_run, wire, both, ours_cpu, their_cpu) in enumerate(
            zip(
                variant.dfget,
                variant.curl,
                variant.wire,
                variant.verify_write,
                variant.ours_cpu,
                variant.their_cpu,
                strict=True,
            )
        ):
            section.details.append(
                f"| {variant.name} | {index + 1} | {size / ours_run.cost / MIB:.0f} | "
                f"{size / ours_run.seconds / MIB:.0f} | "
                f"{ours_run.tiers['peers'] / size:.0%} | "
                f"{ours_cpu[0]:.2f} + {ours_cpu[1]:.2f} | "
                f"{size / wire / MIB:.0f} | {size / both / MIB:.0f} | "
                f"{size / curl_run.seconds / MIB:.0f} | "
                f"{their_cpu[0]:.2f} + {their_cpu[1]:.2f} |"
            )
    return section
