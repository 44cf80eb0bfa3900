"""
C{dfget preheat}: ask a supernode to fetch a file or an image into its cache
ahead of the peers, and wait for it.

    dfget preheat URL [--digest sha256:...] [--header 'Name: value']
    dfget preheat --image 127.0.0.1:5000/library/demo:latest \\
        [--registry-scheme http] [--platform linux/amd64]

Exit codes (as dfget's, in C{docs/dfget.md}): 0 cached; 2 bad command line
or a request the supernode refused; 3 the preheat failed (the source or
registry refused or failed); 5 C{--timeout} passed; 6 no supernode
reachable.
"""

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater, react

from dragonfly.cli import parse_header, tls_from_args, typed
from dragonfly.peer.supernode_client import (
    SupernodeClient,
    SupernodeRefused,
    SupernodeUnavailable,
    parse_nodes,
)
from dragonfly.tasks import InvalidRequest, check_digest, check_url
from dragonfly.units import format_size, parse_duration

CALL_TIMEOUT = 10.0
POLL_INTERVAL = 1.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dfget preheat",
        description="Fetch a file or an image into the supernode's cache "
        "before the peers ask for it.",
    )
    p.add_argument("url", nargs="?", help="http or https URL of a file to preheat")
    p.add_argument(
        "--image",
        help="image to preheat: [REGISTRY/]NAME[:TAG][@DIGEST], or a "
        "registry URL http(s)://REGISTRY/v2/NAME/manifests/REF",
    )
    p.add_argument(
        "--registry-scheme",
        choices=("http", "https"),
        default="https",
        help="how to reach the registry of --image REF (default https)",
    )
    p.add_argument(
        "--platform",
        action="append",
        default=[],
        help="OS/ARCH[/VARIANT] of a multi-platform image to preheat; "
        "repeatable (default: all)",
    )
    p.add_argument(
        "--header",
        action="append",
        default=[],
        type=typed(parse_header, "header"),
        help="'Name: value' header for the source or registry; repeatable",
    )
    p.add_argument(
        "--digest",
        type=typed(check_digest, "digest"),
        default=None,
        help="expected sha256:<hex> of the file (part of its task identity)",
    )
    p.add_argument(
        "-i",
        "--identifier",
        default="",
        help="extra task identity, as given to dfget",
    )
    p.add_argument(
        "-n",
        "--node",
        action="append",
        default=[],
        help="supernode host:port; repeat or comma-separate for fail-over "
        "in order (default 127.0.0.1:8002)",
    )
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until the preheat ends (default); --no-wait only starts it",
    )
    p.add_argument(
        "-e",
        "--timeout",
        type=typed(parse_duration, "duration"),
        default=1800.0,
        help="stop waiting after this long, e.g. 10m (default 30m)",
    )
    p.add_argument("--tls-cert", default="", help="PEM certificate (mutual TLS)")
    p.add_argument("--tls-key", default="", help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", default="", help="PEM CA the supernode is signed by")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    if bool(args.url) == bool(args.image):
        p.error("give either a URL or --image")
    if args.url:
        try:
            check_url(args.url)
        except InvalidRequest as e:
            p.error(str(e))
        if args.platform:
            p.error("--platform goes with --image")
    elif args.digest or args.identifier:
        p.error("--digest and --identifier go with a URL")
    try:
        args.nodes = parse_nodes(args.node or ["127.0.0.1:8002"])
    except ValueError as e:
        p.error(str(e))
    args.tls = tls_from_args(p, args)
    return args


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """
    The supernode's preheat request for the command line.
    """
    headers: dict[str, list[str]] = {}
    for name, value in args.header:
        headers.setdefault(name, []).append(value)
    if args.url:
        body: dict[str, Any] = {"type": "file", "url": args.url}
        if args.digest:
            body["digest"] = args.digest
        if args.identifier:
            body["identifier"] = args.identifier
    elif args.image.startswith(("http://", "https://")):
        body = {"type": "image", "url": args.image}
    else:
        body = {
            "type": "image",
            "image": args.image,
            "registry_scheme": args.registry_scheme,
        }
    if args.platform:
        body["platforms"] = args.platform
    if headers:
        body["headers"] = headers
    return body


def describe(preheat: dict[str, Any]) -> str:
    progress = preheat.get("progress") or {}
    size = progress.get("size")
    total = format_size(size) if isinstance(size, int) else "?"
    return (
        f"preheat {preheat.get('id')}: {preheat.get('state')}, "
        f"{progress.get('success', 0)}/{progress.get('tasks', 0)} files, "
        f"{format_size(progress.get('bytes', 0))} of {total}"
    )


async def run(reactor: Any, args: argparse.Namespace) -> int:
    """
    Start the preheat and (with C{--wait}) follow it; return the exit code.
    """
    client = SupernodeClient(reactor, args.nodes, args.tls)
    deadline = reactor.seconds() + args.timeout
    try:
        preheat = await client.post_first(
            "/api/v1/preheats", request_body(args), CALL_TIMEOUT
        )
    except SupernodeUnavailable as e:
        return _failed(6, f"no supernode answered: {e}")
    except SupernodeRefused as e:
        return _failed(2 if e.status < 500 else 3, str(e))
    print(f"preheat {preheat['id']} started on {client.node}")
    if not args.wait:
        return 0
    shown = ""
    unavailable = 0
    while preheat.get("state") in ("pending", "running"):
        if reactor.seconds() >= deadline:
            return _failed(5, f"not finished within {args.timeout:g}s: {shown}")
        await deferLater(reactor, POLL_INTERVAL)
        try:
            preheat = await client.get(
                f"/api/v1/preheats/{preheat['id']}", CALL_TIMEOUT
            )
        except SupernodeUnavailable as e:
            # A restart loses the preheat; a hiccup does not.
            unavailable += 1
            if unavailable >= 5:
                return _failed(6, f"the supernode stopped answering: {e}")
            continue
        except SupernodeRefused as e:
            return _failed(3, str(e))
        unavailable = 0
        line = describe(preheat)
        if line != shown:
            print(line)
            shown = line
    if preheat.get("state") == "success":
        progress = preheat.get("progress") or {}
        print(
            f"preheat SUCCESS id:{preheat['id']} files:{progress.get('tasks', 0)} "
            f"bytes:{progress.get('bytes', 0)}"
        )
        return 0
    error = preheat.get("error") or {}
    for task in preheat.get("tasks") or []:
        if task.get("state") == "failed":
            print(f"  {task.get('url')}: {task.get('error')}", file=sys.stderr)
    code = 5 if error.get("code") == "timeout" else 3
    return _failed(code, f"{error.get('code')}: {error.get('message')}")


def _failed(code: int, message: str) -> int:
    print(f"dfget: preheat FAIL({code}) error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str]) -> None:
    """
    C{dfget preheat ...} (C{argv} without the word C{preheat}).
    """
    args = parse_args(argv)

    async def go(reactor: Any) -> None:
        code = await run(reactor, args)
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(go(reactor)))
