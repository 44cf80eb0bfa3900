"""
Who sent which piece to whom: the record behind the supernode's status page.

The supernode learns of a transfer only when the requester reports the piece
finished: the lease it then drops names the node that served it.  Each such
report becomes one L{Transfer} in a window bounded twice, by age (the last
C{window} seconds) and by length (C{max_records}), so memory stays bounded
however busy the swarm is, and recording costs the scheduling call one
append, the trimming of what aged out, and two counter updates.

Byte counts (by peers, by the supernode) are kept beside the window, per
task and overall, since the window forgets: the per-task ones go with their
task, the overall ones count since the supernode started.  Bytes are piece
sizes as the supernode knows them; a piece reported twice (a peer re-fetching
after a restart) counts twice, as it crossed the network twice.
"""

from collections import deque
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from dragonfly.supernode.state import SUPERNODE

WINDOW = 300.0
MAX_RECORDS = 20000


@dataclass(frozen=True, slots=True)
class Transfer:
    """
    One piece delivered: C{source} (a peer id, or L{SUPERNODE}) sent
    C{size} bytes of a piece of C{task_id} to C{requester} at C{time}.
    """

    time: float
    task_id: str
    source: str
    requester: str
    size: int


@dataclass
class Delivered:
    """
    Bytes and pieces delivered to peers, split by who served them.
    """

    peer_bytes: int = 0
    supernode_bytes: int = 0
    peer_pieces: int = 0
    supernode_pieces: int = 0

    def add(self, from_supernode: bool, size: int) -> None:
        if from_supernode:
            self.supernode_bytes += size
            self.supernode_pieces += 1
        else:
            self.peer_bytes += size
            self.peer_pieces += 1


class TransferLog:
    """
    The recent transfers (a sliding window) and the delivered-byte counters.

    @ivar total: everything delivered since the supernode started.
    """

    def __init__(
        self,
        clock: IReactorTime,
        window: float = WINDOW,
        max_records: int = MAX_RECORDS,
    ) -> None:
        if window <= 0 or max_records <= 0:
            raise ValueError("the transfer window needs a positive age and length")
        self._clock = clock
        self.window = window
        self._records: deque[Transfer] = deque(maxlen=max_records)
        self._tasks: dict[str, Delivered] = {}
        self.total = Delivered()

    def record(self, task_id: str, source: str, requester: str, size: int) -> None:
        """
        C{source} served C{size} bytes of C{task_id} to C{requester}, now.
        """
        now = self._clock.seconds()
        self._records.append(Transfer(now, task_id, source, requester, size))
        self._trim(now)
        from_supernode = source == SUPERNODE
        self.total.add(from_supernode, size)
        delivered = self._tasks.get(task_id)
        if delivered is None:
            delivered = self._tasks[task_id] = Delivered()
        delivered.add(from_supernode, size)

    def now(self) -> float:
        """
        The time on the clock the window is kept by.
        """
        return self._clock.seconds()

    def recent(self) -> list[Transfer]:
        """
        The transfers of the last C{window} seconds, oldest first (the most
        recent C{max_records} of them when there were more).
        """
        self._trim(self._clock.seconds())
        return list(self._records)

    def delivered(self, task_id: str) -> Delivered:
        """
        What the swarm of C{task_id} was delivered, by whom.
        """
        return self._tasks.get(task_id) or Delivered()

    def forget(self, task_id: str) -> None:
        """
        Drop the counters of a task the supernode no longer knows.
        """
        self._tasks.pop(task_id, None)

    def _trim(self, now: float) -> None:
        cutoff = now - self.window
        records = self._records
        while records and records[0].time < cutoff:
            records.popleft()
