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

import heapq
import random
from dataclasses import dataclass

from dragonfly.supernode.state import SUPERNODE, Holders, Lease, Swarm


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
    expiries = swarm.expiries
    while expiries and expiries[0][0] <= now:
        _, requester, piece = heapq.heappop(expiries)
        lease = swarm.leases.get((requester, piece))
        # A lease renewed since this entry was pushed has a later one.
        if lease is not None and lease.expires <= now:
            swarm.drop_lease(requester, piece)


SAMPLE = 16


def _least_loaded(
    holders: Holders,
    refused: set[str],
    load: dict[str, int],
    limits: Limits,
    rng: random.Random,
) -> str | None:
    """
    The least loaded usable holder among at most L{SAMPLE} drawn at random
    (ties broken at random), or C{None} when none of those is usable.

    Looking at a random few rather than at every holder ("power of k
    choices") balances the load about as well, and keeps a call's cost
    independent of the swarm's size: a piece of a thousand-peer swarm has
    a thousand holders.  The few are L{SAMPLE} draws with replacement (so
    sometimes fewer distinct holders), each one index into the holders'
    list: a call may look at dozens of pieces whose holders are all busy,
    and C{random.sample} (a list copy and a rejection loop in Python per
    piece) was most of the supernode's work.
    """
    order = holders.order
    count = len(order)
    limit = limits.peer_upload_limit
    if count <= SAMPLE:
        usable = [h for h in order if h not in refused and load.get(h, 0) < limit]
        if not usable:
            return None
        least = min(load.get(h, 0) for h in usable)
        return rng.choice([h for h in usable if load.get(h, 0) == least])
    draw = rng.random
    least = limit
    best: list[str] = []
    for _ in range(SAMPLE):
        holder = order[int(draw() * count)]
        if holder in refused:
            continue
        used = load.get(holder, 0)
        if used == 0:
            # Nobody can be less loaded: the first idle one drawn is as
            # random a choice among the idle ones as any.
            return holder
        if used < least:
            least = used
            best = [holder]
        elif used == least and best and holder not in best:
            best.append(holder)
    if not best:
        return None
    return best[0] if len(best) == 1 else rng.choice(best)


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
    mine = swarm.leased.get(requester, set())
    load = swarm.load
    refused = swarm.banned | swarm.blacklist.get(requester, set()) | {requester}
    holders = swarm.holders
    only_supernode = (
        swarm.requester_failures.get(requester, 0) > limits.requester_failure_limit
    )

    # (holder count, piece) tuples sort in C, without a key function.
    candidates = sorted(
        (len(h.order) if (h := holders.get(p)) is not None else 0, p)
        for p in swarm.task.pieces
        if p not in have and p not in mine
    )

    chosen: list[Assignment] = []
    for held_by, piece in candidates:
        if len(chosen) >= want:
            break
        source = None
        if not only_supernode and held_by:
            source = _least_loaded(holders[piece], refused, load, limits, rng)
        if source is None:
            all_refused = held_by == 0 or (
                held_by <= len(refused)
                and all(h in refused for h in holders[piece].order)
            )
            if only_supernode or (all_refused and not swarm.in_flight.get(piece)):
                if load.get(SUPERNODE, 0) >= limits.supernode_upload_limit:
                    continue
                source = SUPERNODE
            else:
                continue
        swarm.add_lease(requester, piece, Lease(source, now + limits.lease_seconds))
        chosen.append(Assignment(piece, source))
    return chosen


def record_finished(
    swarm: Swarm, peer_id: str, pieces: list[int]
) -> list[tuple[int, str]]:
    """
    A peer verified and holds C{pieces}; their leases are done.

    @return: C{(piece, source)} for each reported piece that was leased,
        naming the node that served it.
    """
    swarm.holdings.setdefault(peer_id, set())
    served = []
    for piece in pieces:
        if piece not in swarm.task.pieces:
            continue
        swarm.hold(peer_id, piece)
        lease = swarm.drop_lease(peer_id, piece)
        if lease is not None:
            swarm.served[lease.source] = swarm.served.get(lease.source, 0) + 1
            swarm.failures.pop(lease.source, None)
            swarm.requester_failures.pop(peer_id, None)
            served.append((piece, lease.source))
    return served


def record_failed(
    swarm: Swarm, peer_id: str, piece: int, source: str, bad_data: bool, limits: Limits
) -> None:
    """
    A peer could not get C{piece} from C{source}.

    The requester stops asking that source for this task; a source that
    served bad data, or whose pieces failed C{ban_after_failures} times (for
    one requester or several), is banned from the task for everyone.
    """
    swarm.drop_lease(peer_id, piece)
    swarm.requester_failures[peer_id] = swarm.requester_failures.get(peer_id, 0) + 1
    if source == SUPERNODE:
        return
    swarm.blacklist.setdefault(peer_id, set()).add(source)
    count = swarm.failures.get(source, 0) + 1
    swarm.failures[source] = count
    if bad_data or count >= limits.ban_after_failures:
        swarm.banned.add(source)
        swarm.forget_holdings(source)
