"""
The swarm state: tasks, the peers in each task's swarm, who holds which
piece, what is in flight and who is blacklisted.

Everything the scheduler decides from lives in one L{Swarm} record per task,
reached through the narrow L{SwarmState} interface.  A caller takes a swarm,
changes it and puts it back; L{InMemorySwarmState} hands out the live record,
so putting it back costs nothing.  A shared implementation (Redis, so that
several supernodes act as one) stores the same records and must make
take-change-put atomic per task; the interface is asynchronous for that
reason.
"""

import heapq
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

SUPERNODE = "supernode"


class TaskStatus(StrEnum):
    FETCHING = "fetching"
    DONE = "done"
    FAILED = "failed"


@dataclass
class TaskInfo:
    """
    What the supernode knows of one file.

    @ivar pieces: piece number to sha256 for every piece the supernode's CDN
        has complete; these are the trusted digests peers verify against.
    @ivar length: C{None} until the source says (or the body ends).
    """

    task_id: str
    url: str
    piece_size: int
    length: int | None = None
    status: TaskStatus = TaskStatus.FETCHING
    pieces: dict[int, str] = field(default_factory=dict)
    file_sha256: str = ""
    digest: str = ""
    error: str = ""
    error_kind: str = ""
    source_status: int = 0
    created: float = 0.0
    last_access: float = 0.0

    @property
    def piece_count(self) -> int | None:
        if self.length is None:
            return None
        return (self.length + self.piece_size - 1) // self.piece_size


@dataclass
class PeerInfo:
    peer_id: str
    address: str
    hostname: str = ""
    last_seen: float = 0.0


@dataclass
class Lease:
    """
    A piece assigned to a peer and not yet reported: counts as load on its
    source until reported or expired.
    """

    source: str
    expires: float


class Holders:
    """
    The peers holding one piece, kept so that the scheduler can draw one at
    random in constant time (a list) and a peer can be removed in constant
    time (each one's place in the list; the last one moves into the hole).
    The order depends only on the order of the changes, so a seeded random
    draw is reproducible.
    """

    __slots__ = ("_at", "order")

    def __init__(self) -> None:
        self.order: list[str] = []
        self._at: dict[str, int] = {}

    def add(self, peer_id: str) -> None:
        if peer_id not in self._at:
            self._at[peer_id] = len(self.order)
            self.order.append(peer_id)

    def discard(self, peer_id: str) -> None:
        at = self._at.pop(peer_id, None)
        if at is None:
            return
        last = self.order.pop()
        if at < len(self.order):
            self.order[at] = last
            self._at[last] = at

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._at

    def __len__(self) -> int:
        return len(self.order)


@dataclass
class Swarm:
    """
    The scheduling state of one task.

    C{holders}, C{load}, C{in_flight}, C{leased}, C{sourced} and
    C{expiries} are indexes of C{holdings} and C{leases}, kept in step by
    the methods below (change holdings and leases only through them), so
    that a scheduling call costs about the number of pieces, not the number
    of peers times the number of pieces.
    """

    task: TaskInfo
    peers: dict[str, PeerInfo] = field(default_factory=dict)
    holdings: dict[str, set[int]] = field(default_factory=dict)
    leases: dict[tuple[str, int], Lease] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    requester_failures: dict[str, int] = field(default_factory=dict)
    banned: set[str] = field(default_factory=set)
    blacklist: dict[str, set[str]] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    served: dict[str, int] = field(default_factory=dict)
    holders: dict[int, Holders] = field(default_factory=dict)
    load: dict[str, int] = field(default_factory=dict)
    in_flight: dict[int, int] = field(default_factory=dict)
    leased: dict[str, set[int]] = field(default_factory=dict)
    sourced: dict[str, set[tuple[str, int]]] = field(default_factory=dict)
    expiries: list[tuple[float, str, int]] = field(default_factory=list)

    def hold(self, peer_id: str, piece: int) -> None:
        self.holdings.setdefault(peer_id, set()).add(piece)
        # Only members in good standing are sources.
        if peer_id in self.peers and peer_id not in self.banned:
            holders = self.holders.get(piece)
            if holders is None:
                holders = self.holders[piece] = Holders()
            holders.add(peer_id)

    def forget_holdings(self, peer_id: str) -> None:
        for piece in self.holdings.pop(peer_id, set()):
            holders = self.holders.get(piece)
            if holders is not None:
                holders.discard(peer_id)

    def add_lease(self, requester: str, piece: int, lease: Lease) -> None:
        self.drop_lease(requester, piece)
        self.leases[(requester, piece)] = lease
        self.load[lease.source] = self.load.get(lease.source, 0) + 1
        self.in_flight[piece] = self.in_flight.get(piece, 0) + 1
        self.leased.setdefault(requester, set()).add(piece)
        self.sourced.setdefault(lease.source, set()).add((requester, piece))
        heapq.heappush(self.expiries, (lease.expires, requester, piece))

    def drop_lease(self, requester: str, piece: int) -> Lease | None:
        lease = self.leases.pop((requester, piece), None)
        if lease is None:
            return None
        self.load[lease.source] -= 1
        self.in_flight[piece] -= 1
        self.leased.get(requester, set()).discard(piece)
        self.sourced.get(lease.source, set()).discard((requester, piece))
        # Its entry in expiries goes when it comes up (see expire_leases).
        return lease

    def remove_peer(self, peer_id: str) -> None:
        """
        Forget a peer: it holds nothing, serves nothing, fetches nothing.
        """
        self.peers.pop(peer_id, None)
        self.forget_holdings(peer_id)
        self.finished.discard(peer_id)
        self.blacklist.pop(peer_id, None)
        for piece in list(self.leased.get(peer_id, ())):
            self.drop_lease(peer_id, piece)
        self.leased.pop(peer_id, None)
        for requester, piece in list(self.sourced.get(peer_id, ())):
            self.drop_lease(requester, piece)
        self.sourced.pop(peer_id, None)

    @property
    def downloading(self) -> int:
        """
        How many peers of the swarm are still downloading.
        """
        return len(self.peers) - len(self.finished & self.peers.keys())


class SwarmState(Protocol):
    """
    Where swarms live.
    """

    async def get(self, task_id: str) -> Swarm | None:
        """
        The swarm of C{task_id}, or C{None}.
        """

    async def put(self, swarm: Swarm) -> None:
        """
        Store C{swarm} (after changing it).
        """

    async def drop(self, task_id: str) -> None:
        """
        Forget a task and its swarm.
        """

    async def task_ids(self) -> list[str]:
        """
        Every task id known.
        """


class InMemorySwarmState:
    """
    Swarms in this process's memory.
    """

    def __init__(self) -> None:
        self._swarms: dict[str, Swarm] = {}

    async def get(self, task_id: str) -> Swarm | None:
        return self._swarms.get(task_id)

    async def put(self, swarm: Swarm) -> None:
        self._swarms[swarm.task.task_id] = swarm

    async def drop(self, task_id: str) -> None:
        self._swarms.pop(task_id, None)

    async def task_ids(self) -> list[str]:
        return list(self._swarms)
