"""
The supernode's status page (C{GET /}) and its JSON twin
(C{GET /api/v1/status}): is peer-to-peer really working?

Both show one snapshot (L{snapshot}): every task with the supernode's own
fetch progress, its swarm and the bytes delivered to it by peers and by the
supernode; the share of bytes peers served ("bytes saved"); and who sent
pieces to whom in the last minutes, from L{TransferLog}.

The page is rendered on the server from the very dictionary the JSON route
returns, so the two cannot disagree.  It is one self-contained document:
inline CSS, no script, no external resource (the closed networks supernodes
run in have no CDN), refreshed by a meta refresh.  Every string a client
chose (URLs, peer ids, hostnames, addresses) is escaped, in text and in
attributes alike.  The picture of the swarm is inline SVG with a
deterministic layout, the supernode in the centre and the peers on a circle
in the order of their ids, so that an unchanged swarm is drawn the same way
on every refresh; edges are drawn wider for more bytes.  Drawing it in the
browser from the JSON was rejected: a second renderer to keep in step, and
script errors to chase on a page whose job is to be trusted at a glance.

The page and the graph are capped (L{MAX_GRAPH_PEERS}, L{MAX_PAGE_PEERS}) so
that a swarm of thousands stays readable; the JSON is not.
"""

import math
import time
from html import escape
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from dragonfly.resources import ReadOnly
from dragonfly.supernode.service import Supernode
from dragonfly.supernode.state import SUPERNODE

REFRESH_SECONDS = 5
MAX_GRAPH_PEERS = 40
MAX_PAGE_PEERS = 50


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _delivered(peer_bytes: int, supernode_bytes: int) -> dict[str, Any]:
    total = peer_bytes + supernode_bytes
    return {
        "bytes_from_peers": peer_bytes,
        "bytes_from_supernode": supernode_bytes,
        "bytes_delivered": total,
        "bytes_saved": _ratio(peer_bytes, total),
    }


async def snapshot(supernode: Supernode) -> dict[str, Any]:
    """
    The supernode's state as the status page and C{/api/v1/status} show it.
    """
    transfers = supernode.transfers
    tasks = []
    members: dict[str, dict[str, str]] = {}
    for task_id in await supernode.state.task_ids():
        swarm = await supernode.state.get(task_id)
        if swarm is None:
            continue
        task = swarm.task
        peers = []
        for peer_id in sorted(swarm.peers):
            peer = swarm.peers[peer_id]
            members[peer_id] = {"address": peer.address, "hostname": peer.hostname}
            peers.append(
                {
                    "peer_id": peer_id,
                    "address": peer.address,
                    "hostname": peer.hostname,
                    "pieces": len(swarm.holdings.get(peer_id, ())),
                    "load": swarm.load.get(peer_id, 0),
                    "finished": peer_id in swarm.finished,
                    "banned": peer_id in swarm.banned,
                }
            )
        delivered = transfers.delivered(task_id)
        tasks.append(
            {
                "task_id": task_id,
                "url": task.url,
                "digest": task.digest,
                "status": task.status.value,
                "error": task.error,
                "length": task.length,
                "piece_size": task.piece_size,
                "piece_count": task.piece_count,
                "pieces_cached": len(task.pieces),
                "created": task.created,
                "peer_count": len(swarm.peers),
                "downloading": swarm.downloading,
                "supernode_load": swarm.load.get(SUPERNODE, 0),
                **_delivered(delivered.peer_bytes, delivered.supernode_bytes),
                "peers": peers,
            }
        )
    tasks.sort(key=lambda t: (t["created"], t["task_id"]))
    total = transfers.total
    return {
        "time": transfers.now(),
        "supernode": {"address": supernode.address},
        "totals": {
            "tasks": len(tasks),
            "peers": len(members),
            "bytes_from_source": supernode.source_bytes,
            **_delivered(total.peer_bytes, total.supernode_bytes),
            "pieces_from_peers": total.peer_pieces,
            "pieces_from_supernode": total.supernode_pieces,
        },
        "tasks": tasks,
        "swarm": _graph(supernode, members),
    }


def _graph(supernode: Supernode, members: dict[str, dict[str, str]]) -> dict[str, Any]:
    """
    The transfers of the window as a directed graph: node 0 is the
    supernode, the others are peers (current members, and peers that sent
    or got pieces in the window and have left since); each edge sums the
    pieces one node sent another.
    """
    transfers = supernode.transfers
    edges: dict[tuple[str, str], list[int]] = {}
    for transfer in transfers.recent():
        key = (transfer.source, transfer.requester)
        counts = edges.get(key)
        if counts is None:
            counts = edges[key] = [0, 0]
        counts[0] += transfer.size
        counts[1] += 1
    # The supernode is not a peer id: it is kept apart so that a peer
    # naming itself "supernode" cannot pass for it.
    peer_ids = set(members)
    for source, requester in edges:
        if source != SUPERNODE:
            peer_ids.add(source)
        peer_ids.add(requester)
    index = {peer_id: i for i, peer_id in enumerate(sorted(peer_ids), start=1)}
    nodes: list[dict[str, Any]] = [
        {"kind": "supernode", "id": "", "address": supernode.address, "hostname": ""}
    ]
    for peer_id in sorted(peer_ids):
        member = members.get(peer_id)
        nodes.append(
            {
                "kind": "peer" if member else "gone",
                "id": peer_id,
                "address": member["address"] if member else "",
                "hostname": member["hostname"] if member else "",
            }
        )
    return {
        "window_seconds": transfers.window,
        "nodes": nodes,
        "edges": [
            {
                "from": 0 if source == SUPERNODE else index[source],
                "to": index[requester],
                "bytes": size,
                "pieces": pieces,
            }
            for (source, requester), (size, pieces) in sorted(edges.items())
        ],
    }


# Rendering -------------------------------------------------------------------


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _percent(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio * 100:.0f}%"


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _short(text: str, limit: int = 28) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _node_label(node: dict[str, Any]) -> str:
    if node["kind"] == "supernode":
        return "supernode"
    return str(node["address"] or node["id"])


def _bar(part: int, whole: int, cls: str = "") -> str:
    width = 0.0 if not whole else min(100.0, 100.0 * part / whole)
    return f'<span class="bar {cls}"><span style="width:{width:.1f}%"></span></span>'


_STYLE = """
:root { color-scheme: light; --peer: #2e8b57; --sn: #d9822b; --ink: #1f2933;
  --muted: #66788a; --line: #dde3ea; --bg: #f5f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto,
  "DejaVu Sans", sans-serif; color: var(--ink); background: var(--bg); }
header { background: #1f2933; color: #fff; padding: 14px 24px;
  display: flex; align-items: baseline; gap: 16px; flex-wrap: wrap; }
header h1 { font-size: 20px; margin: 0; font-weight: 600; }
header .meta { color: #c5d0db; font-size: 13px; }
main { padding: 16px 24px 32px; max-width: 1200px; }
h2 { font-size: 16px; margin: 24px 0 8px; }
.cards { display: flex; gap: 12px; flex-wrap: wrap; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 10px 14px; flex: 1 1 120px; }
.card .k { color: var(--muted); font-size: 11px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; }
.card.saved .v { color: var(--peer); font-size: 30px; }
.split { margin-top: 12px; height: 14px; border-radius: 7px; overflow: hidden;
  display: flex; background: var(--line); }
.split .p { background: var(--peer); } .split .s { background: var(--sn); }
.legend { color: var(--muted); font-size: 12px; margin-top: 4px; }
.dot { display: inline-block; width: 10px; height: 10px; border-radius: 5px;
  margin: 0 4px 0 10px; vertical-align: -1px; }
td .dot { margin-left: 0; }
.dot.p { background: var(--peer); } .dot.s { background: var(--sn); }
table { border-collapse: collapse; background: #fff; width: 100%;
  border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
th, td { text-align: left; padding: 6px 10px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { background: #eef2f6; font-weight: 600; font-size: 12px; color: #3e4c59; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num, th, td.fetch { white-space: nowrap; }
tr.peers > td { background: #fafbfc; padding: 4px 10px 10px 28px; }
tr.peers table { font-size: 12px; }
.url { word-break: break-all; font-family: ui-monospace, "DejaVu Sans Mono",
  monospace; font-size: 12px; }
.id { color: var(--muted); font-family: ui-monospace, "DejaVu Sans Mono",
  monospace; font-size: 11px; }
.bar { display: inline-block; width: 90px; height: 8px; background: var(--line);
  border-radius: 4px; overflow: hidden; vertical-align: middle; margin-right: 6px; }
.bar > span { display: block; height: 100%; background: #3b82c4; }
.bar.p > span { background: var(--peer); }
.status { font-size: 12px; padding: 1px 8px; border-radius: 10px; background: #e4e7eb; }
.status.done { background: #d6f0df; color: #1d6b3a; }
.status.fetching { background: #dbeafe; color: #1e4f8a; }
.status.failed { background: #fde2e2; color: #9b1c1c; }
.swarm { display: flex; gap: 16px; align-items: flex-start; flex-wrap: wrap; }
.graph { background: #fff; border: 1px solid var(--line); border-radius: 8px;
  padding: 8px; flex: 3 1 520px; max-width: 760px; }
.graph .legend { padding: 0 8px 4px; }
.senders { flex: 2 1 300px; }
.graph svg { width: 100%; height: auto; display: block; }
.empty { color: var(--muted); padding: 12px; background: #fff;
  border: 1px dashed var(--line); border-radius: 8px; }
"""


def render_page(status: dict[str, Any]) -> str:
    """
    The status page: an HTML document for the snapshot C{status}.
    """
    totals = status["totals"]
    updated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(status["time"]))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # An empty icon, so that the browser does not ask for /favicon.ico.
        '<link rel="icon" href="data:,">',
        "<title>Dragonfly supernode status</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<header><h1>Dragonfly supernode</h1>",
        f'<span class="meta">piece server {_e(status["supernode"]["address"])}'
        f" · updated {_e(updated)} · refreshes every {REFRESH_SECONDS} s</span>",
        "</header><main>",
        _summary(totals),
        _graph_section(status["swarm"]),
        _tasks_section(status["tasks"]),
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _summary(totals: dict[str, Any]) -> str:
    delivered = totals["bytes_delivered"]
    by_peers = totals["bytes_from_peers"]
    by_supernode = totals["bytes_from_supernode"]
    cards = [
        ("saved", "bytes saved", _percent(totals["bytes_saved"])),
        ("", "delivered", _size(delivered)),
        ("", "by peers", _size(by_peers)),
        ("", "by supernode", _size(by_supernode)),
        ("", "from sources", _size(totals["bytes_from_source"])),
        ("", "tasks", str(totals["tasks"])),
        ("", "peers", str(totals["peers"])),
    ]
    html = ['<section class="summary"><div class="cards">']
    for cls, key, value in cards:
        html.append(
            f'<div class="card {cls}" data-k="{_e(key)}"><div class="k">{_e(key)}'
            f'</div><div class="v">{_e(value)}</div></div>'
        )
    html.append("</div>")
    peer_share = 100.0 * by_peers / delivered if delivered else 0.0
    sn_share = 100.0 * by_supernode / delivered if delivered else 0.0
    html.append(
        f'<div class="split" title="bytes delivered to peers">'
        f'<span class="p" style="width:{peer_share:.1f}%"></span>'
        f'<span class="s" style="width:{sn_share:.1f}%"></span></div>'
        '<div class="legend">bytes saved = bytes served by peers ÷ bytes delivered '
        'to peers, since the supernode started<span class="dot p"></span>by peers'
        '<span class="dot s"></span>by the supernode</div></section>'
    )
    return "".join(html)


def _tasks_section(tasks: list[dict[str, Any]]) -> str:
    html = ["<section><h2>Tasks</h2>"]
    if not tasks:
        html.append(
            '<div class="empty">No tasks yet: a task appears here when a peer '
            "registers a download with this supernode.</div></section>"
        )
        return "".join(html)
    html.append(
        '<table class="tasks"><thead><tr><th>URL</th><th>status</th>'
        '<th class="num">size</th><th>supernode fetch</th><th class="num">peers</th>'
        '<th class="num">by peers</th><th class="num">by supernode</th>'
        '<th class="num">saved</th></tr></thead><tbody>'
    )
    for task in tasks:
        count = task["piece_count"]
        cached = task["pieces_cached"]
        progress = f"{cached} / {'?' if count is None else count} pieces"
        digest = f'<div class="id">{_e(task["digest"])}</div>' if task["digest"] else ""
        error = f'<div class="id">{_e(task["error"])}</div>' if task["error"] else ""
        html.append(
            f'<tr class="task" data-task-id="{_e(task["task_id"])}">'
            f'<td><div class="url">{_e(task["url"])}</div>{digest}'
            f'<div class="id">task {_e(task["task_id"][:16])}…</div></td>'
            f'<td><span class="status {_e(task["status"])}">{_e(task["status"])}'
            f"</span>{error}</td>"
            f'<td class="num">{_size(task["length"])}</td>'
            f'<td class="fetch">{_bar(cached, count or 0)}{_e(progress)}</td>'
            f'<td class="num peer-count">{task["peer_count"]}</td>'
            f'<td class="num">{_size(task["bytes_from_peers"])}</td>'
            f'<td class="num">{_size(task["bytes_from_supernode"])}</td>'
            f'<td class="num">{_percent(task["bytes_saved"])}</td></tr>'
        )
        html.append(f'<tr class="peers"><td colspan="8">{_peers_table(task)}</td></tr>')
    html.append("</tbody></table></section>")
    return "".join(html)


def _peers_table(task: dict[str, Any]) -> str:
    peers = task["peers"]
    if not peers:
        return '<span class="id">no peers in the swarm</span>'
    count = task["piece_count"] or task["pieces_cached"]
    html = [
        "<table><thead><tr><th>peer</th><th>address</th><th>host</th>"
        '<th>pieces held</th><th class="num">uploading</th><th>state</th></tr>'
        "</thead><tbody>"
    ]
    for peer in peers[:MAX_PAGE_PEERS]:
        state = (
            "banned" if peer["banned"] else "done" if peer["finished"] else "fetching"
        )
        html.append(
            f'<tr class="peer"><td class="id">{_e(_short(peer["peer_id"], 40))}</td>'
            f"<td>{_e(peer['address'])}</td><td>{_e(peer['hostname'])}</td>"
            f"<td>{_bar(peer['pieces'], count, 'p')}{peer['pieces']}"
            f" / {count}</td>"
            f'<td class="num">{peer["load"]}</td><td>{state}</td></tr>'
        )
    html.append("</tbody></table>")
    if len(peers) > MAX_PAGE_PEERS:
        html.append(
            f'<div class="id">and {len(peers) - MAX_PAGE_PEERS} more peers '
            "(see /api/v1/status)</div>"
        )
    return "".join(html)


def _graph_section(graph: dict[str, Any]) -> str:
    minutes = graph["window_seconds"] / 60
    return (
        f"<section><h2>Who sent pieces to whom, last {minutes:g} minutes</h2>"
        f'<div class="swarm"><div class="graph">{render_svg(graph)}'
        '<div class="legend">arrows point from the sender to the receiver; '
        "wider means more bytes"
        '<span class="dot s"></span>from the supernode'
        '<span class="dot p"></span>between peers</div></div>'
        f"{_senders(graph)}</div></section>"
    )


def _senders(graph: dict[str, Any], limit: int = 15) -> str:
    """
    The nodes that sent or got the most in the window, with their totals.
    """
    nodes = graph["nodes"]
    sent = [[0, 0] for _ in nodes]
    got = [0] * len(nodes)
    for edge in graph["edges"]:
        sent[edge["from"]][0] += edge["bytes"]
        sent[edge["from"]][1] += edge["pieces"]
        got[edge["to"]] += edge["bytes"]
    busy = [i for i in range(len(nodes)) if sent[i][0] or got[i]]
    busy.sort(key=lambda i: (-sent[i][0], -got[i], i))
    html = [
        '<div class="senders"><table><thead><tr><th>node</th>'
        '<th class="num">sent</th><th class="num">pieces</th>'
        '<th class="num">received</th></tr></thead><tbody>'
    ]
    for i in busy[:limit]:
        kind = "s" if i == 0 else "p"
        html.append(
            f'<tr><td><span class="dot {kind}"></span>'
            f"{_e(_short(_node_label(nodes[i]), 24))}</td>"
            f'<td class="num">{_size(sent[i][0])}</td>'
            f'<td class="num">{sent[i][1]}</td>'
            f'<td class="num">{_size(got[i])}</td></tr>'
        )
    if not busy:
        html.append('<tr><td colspan="4" class="id">nothing sent yet</td></tr>')
    html.append("</tbody></table>")
    if len(busy) > limit:
        html.append(f'<div class="id">and {len(busy) - limit} more</div>')
    html.append("</div>")
    return "".join(html)


WIDTH, HEIGHT = 720, 440
CENTRE = (WIDTH / 2, HEIGHT / 2)
RADIUS = 170.0
NODE_RADIUS = 14.0
# A label on the circle's left ends 24 px right of the node (x = 166): at
# about 7 px a character in 12 px sans-serif, 22 characters stay in view.
LABEL_CHARS = 22


def _positions(count: int) -> list[tuple[float, float]]:
    """
    Node 0 in the centre, the others evenly on a circle from the top,
    clockwise.
    """
    cx, cy = CENTRE
    points = [(cx, cy)]
    for i in range(count - 1):
        angle = -math.pi / 2 + 2 * math.pi * i / (count - 1)
        points.append((cx + RADIUS * math.cos(angle), cy + RADIUS * math.sin(angle)))
    return points


def _shown_nodes(graph: dict[str, Any]) -> list[int]:
    """
    The nodes drawn: the supernode, then the peers with the most traffic in
    the window, then the other members, at most L{MAX_GRAPH_PEERS} peers,
    in node order.
    """
    nodes = graph["nodes"]
    traffic = [0] * len(nodes)
    for edge in graph["edges"]:
        traffic[edge["from"]] += edge["bytes"]
        traffic[edge["to"]] += edge["bytes"]
    peers = sorted(range(1, len(nodes)), key=lambda i: (-traffic[i], i))
    return [0, *sorted(peers[:MAX_GRAPH_PEERS])]


def render_svg(graph: dict[str, Any]) -> str:
    """
    The swarm graph of a snapshot as an inline SVG element.
    """
    nodes = graph["nodes"]
    shown = _shown_nodes(graph)
    where = dict(zip(shown, _positions(len(shown)), strict=True))
    edges = [e for e in graph["edges"] if e["from"] in where and e["to"] in where]
    heaviest = max((e["bytes"] for e in edges), default=0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="transfers between the supernode and peers">',
    ]
    for edge in edges:
        out.append(_edge(edge, where, nodes, heaviest))
    for i in shown:
        out.append(_node(nodes[i], where[i]))
    if not edges:
        out.append(
            f'<text x="{WIDTH / 2:.0f}" y="{HEIGHT - 14}" text-anchor="middle" '
            'fill="#66788a" font-size="13">no pieces delivered in this window</text>'
        )
    hidden = len(nodes) - len(shown)
    if hidden:
        out.append(
            f'<text x="8" y="{HEIGHT - 8}" fill="#66788a" font-size="12">'
            f"{hidden} more peers not drawn</text>"
        )
    out.append("</svg>")
    return "".join(out)


def _edge(
    edge: dict[str, Any],
    where: dict[int, tuple[float, float]],
    nodes: list[dict[str, Any]],
    heaviest: int,
) -> str:
    """
    One edge: an arc bending to the left of the direction of travel (so
    that A->B and B->A are two arcs), from the sender's rim to an arrowhead
    touching the receiver's rim, as wide as its share of the heaviest edge.
    """
    (x1, y1), (x2, y2) = where[edge["from"]], where[edge["to"]]
    start_rim = 22.0 if edge["from"] == 0 else NODE_RADIUS
    end_rim = 22.0 if edge["to"] == 0 else NODE_RADIUS
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    bend = 0.15 * length
    cx, cy = (x1 + x2) / 2 + uy * bend, (y1 + y2) / 2 - ux * bend
    # Leave each node along the arc's own tangent, towards the control point.
    sx, sy = _towards((x1, y1), (cx, cy), start_rim)
    tx, ty = _towards((x2, y2), (cx, cy), end_rim + 1)
    width = 1.5 + 6.5 * edge["bytes"] / heaviest if heaviest else 1.5
    head = 7.0 + 1.6 * width
    bx, by = _towards((tx, ty), (cx, cy), head)
    # The arrowhead: tip on the rim, base across the tangent.
    ax, ay = tx - bx, ty - by
    norm = math.hypot(ax, ay) or 1.0
    px, py = -ay / norm * head * 0.55, ax / norm * head * 0.55
    from_supernode = edge["from"] == 0
    colour = "#d9822b" if from_supernode else "#2e8b57"
    title = (
        f"{_node_label(nodes[edge['from']])} → {_node_label(nodes[edge['to']])}: "
        f"{_size(edge['bytes'])} in {edge['pieces']} pieces"
    )
    return (
        f'<g class="link"><path class="edge" d="M{sx:.1f},{sy:.1f} '
        f'Q{cx:.1f},{cy:.1f} {bx:.1f},{by:.1f}" fill="none" stroke="{colour}" '
        f'stroke-width="{width:.1f}" stroke-opacity="0.75" '
        f'stroke-linecap="round" data-bytes="{edge["bytes"]}"/>'
        f'<polygon points="{tx:.1f},{ty:.1f} {bx + px:.1f},{by + py:.1f} '
        f'{bx - px:.1f},{by - py:.1f}" fill="{colour}"/>'
        f"<title>{_e(title)}</title></g>"
    )


def _towards(
    origin: tuple[float, float], target: tuple[float, float], distance: float
) -> tuple[float, float]:
    """
    The point C{distance} from C{origin} on the way to C{target}.
    """
    dx, dy = target[0] - origin[0], target[1] - origin[1]
    norm = math.hypot(dx, dy) or 1.0
    return origin[0] + dx / norm * distance, origin[1] + dy / norm * distance


def _node(node: dict[str, Any], at: tuple[float, float]) -> str:
    x, y = at
    if node["kind"] == "supernode":
        return (
            f'<g class="node supernode"><circle cx="{x:.1f}" cy="{y:.1f}" r="22" '
            'fill="#d9822b"/>'
            f'<text x="{x:.1f}" y="{y + 38:.1f}" text-anchor="middle" '
            'font-size="13" font-weight="600" fill="#1f2933">supernode</text>'
            f"<title>supernode {_e(node['address'])}</title></g>"
        )
    cx, cy = CENTRE
    # Labels sit outside the circle, away from the centre.
    dx, dy = x - cx, y - cy
    norm = math.hypot(dx, dy) or 1.0
    lx, ly = x + dx / norm * 24, y + dy / norm * 24 + 4
    anchor = "middle" if abs(dx) < 1 else "start" if dx > 0 else "end"
    fill = "#2e8b57" if node["kind"] == "peer" else "#c5ccd3"
    tip = f"{node['id']} {node['address']} {node['hostname']}".strip()
    return (
        f'<g class="node peer"><circle cx="{x:.1f}" cy="{y:.1f}" '
        f'r="{NODE_RADIUS:.0f}" fill="{fill}" stroke="#fff" stroke-width="2"/>'
        f'<text x="{lx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" font-size="12" '
        f'fill="#1f2933">{_e(_short(_node_label(node), LABEL_CHARS))}</text>'
        f"<title>{_e(tip)}</title></g>"
    )


class StatusPage(ReadOnly):
    """
    C{GET /}: the status page.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, supernode: Supernode) -> None:
        super().__init__()
        self._supernode = supernode

    def render_GET(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._render(request))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET

    async def _render(self, request: Request) -> None:
        try:
            body = render_page(await snapshot(self._supernode)).encode("utf-8")
            status = 200
            kind = "text/html; charset=utf-8"
        except CancelledError:
            return
        except Exception:
            self._log.failure("rendering the status page", Failure())
            body, status, kind = b"internal error\n", 500, "text/plain"
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader("content-type", kind)
        request.setHeader("cache-control", "no-store")
        request.setHeader("content-length", str(len(body)))
        request.write(body)
        request.finish()
