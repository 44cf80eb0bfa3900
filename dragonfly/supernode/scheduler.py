"""
Which pieces a peer fetches next, and from whom.

Rules, in order:
  1. Rarest first: pieces held by the fewest peers come first, then the
     lowest-numbered, so a swarm spreads pieces widely and a peer streaming
     a file to a reader still moves forward.
  2. Peers before the supernode: a piece held by a usable peer is fetched
     from the least-loaded one (ties broken at random).  A usable peer is
     alive, not banned for the task, not blacklisted by the requester and
     below its concurrent upload limit.
  3. The supernode serves each piece once while nobody else can: only when
     no peer holds it and no peer is already fetching it.  Everyone else
     waits a moment for the first copy and takes it from that peer, so the
     supernode's upload (and the source) carries each piece about once,
     however large the swarm.
  4. A requester that keeps failing (its own network, most likely) gets
     everything from the supernode.

The function is pure: it reads a L{Swarm}, returns the assignments and
records their leases, and never waits.
"""

import random
from dataclasses import dataclass

from dragonfly.supernode.state import SUPERNODE, Lease, Swarm


@dataclass(frozen=True)
class Limits:
    peer_upload_limit: int = 5
    supernode_upload_limit: int = 32
    lease_seconds: float = 30.0
    ban_after_failures: int = 3
    requester_failure_limit: int = 8


@dataclass(frozen=True)
class Assignment:
    piece: int
    source: str


def expire_leases(swarm: Swarm, now: float) -> None:
    for key, lease in list(swarm.leases.items()):
        if lease.expires <= now:
            del swarm.leases[key]


def schedule(
    swarm: Swarm,
    requester: str,
    want: int,
    now: float,
    limits: Limits,
    rng: random.Random,
) -> list[Assignment]:
    """
    Choose up to C{want} pieces for C{requester} and lease them.
    """
    expire_leases(swarm, now)
    if want <= 0:
        return []
    have = swarm.holdings.get(requester, set())
    load: dict[str, int] = {}
    in_flight: dict[int, int] = {}
    mine: set[int] = set()
    for (dst, piece), lease in swarm.leases.items():
        load[lease.source] = load.get(lease.source, 0) + 1
        in_flight[piece] = in_flight.get(piece, 0) + 1
        if dst == requester:
            mine.add(piece)

    refused = swarm.banned | swarm.blacklist.get(requester, set()) | {requester}
    holders: dict[int, list[str]] = {}
    for peer_id, pieces in swarm.holdings.items():
        if peer_id in swarm.banned or peer_id not in swarm.peers:
            continue
        for piece in pieces:
            holders.setdefault(piece, []).append(peer_id)
    only_supernode = (
        swarm.requester_failures.get(requester, 0) > limits.requester_failure_limit
    )

    candidates = [p for p in swarm.task.pieces if p not in have and p not in mine]
    candidates.sort(key=lambda p: (len(holders.get(p, ())), p))

    chosen: list[Assignment] = []
    for piece in candidates:
        if len(chosen) >= want:
            break
        piece_holders = holders.get(piece, [])
        usable = [
            h
            for h in piece_holders
            if h not in refused and load.get(h, 0) < limits.peer_upload_limit
        ]
        if usable and not only_supernode:
            least = min(load.get(h, 0) for h in usable)
            source = rng.choice([h for h in usable if load.get(h, 0) == least])
        elif only_supernode or (
            not any(h not in refused for h in piece_holders)
            and not in_flight.get(piece)
        ):
            if load.get(SUPERNODE, 0) >= limits.supernode_upload_limit:
                continue
            source = SUPERNODE
        else:
            continue
        load[source] = load.get(source, 0) + 1
        in_flight[piece] = in_flight.get(piece, 0) + 1
        swarm.leases[(requester, piece)] = Lease(source, now + limits.lease_seconds)
        chosen.append(Assignment(piece, source))
    return chosen


def record_finished(swarm: Swarm, peer_id: str, pieces: list[int]) -> None:
    """
    A peer verified and holds C{pieces}; their leases are done.
    """
    held = swarm.holdings.setdefault(peer_id, set())
    for piece in pieces:
        if piece not in swarm.task.pieces:
            continue
        held.add(piece)
        lease = swarm.leases.pop((peer_id, piece), None)
        if lease is not None:
            swarm.served[lease.source] = swarm.served.get(lease.source, 0) + 1
            swarm.failures.pop(lease.source, None)
            swarm.requester_failures.pop(peer_id, None)


def record_failed(
    swarm: Swarm, peer_id: str, piece: int, source: str, bad_data: bool, limits: Limits
) -> None:
    """
    A peer could not get C{piece} from C{source}.

    The requester stops asking that source for this task; a source that
    served bad data, or whose pieces failed C{ban_after_failures} times (for
    one requester or several), is banned from the task for everyone.
    """
    swarm.leases.pop((peer_id, piece), None)
    swarm.requester_failures[peer_id] = swarm.requester_failures.get(peer_id, 0) + 1
    if source == SUPERNODE:
        return
    swarm.blacklist.setdefault(peer_id, set()).add(source)
    count = swarm.failures.get(source, 0) + 1
    swarm.failures[source] = count
    if bad_data or count >= limits.ban_after_failures:
        swarm.banned.add(source)
        swarm.holdings.pop(source, None)
