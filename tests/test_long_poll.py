"""
The supernode's long polls, in memory on a Clock: changes made in one
reactor turn wake the waiting scheduling calls once, at the end of the turn.
"""

import random
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dragonfly.supernode import scheduler
from dragonfly.supernode.service import Settings, Supernode
from dragonfly.supernode.state import (
    InMemorySwarmState,
    PeerInfo,
    Swarm,
    TaskInfo,
)

TASK_ID = "ab" * 32


class _Clock(Clock):
    """
    A Clock the supernode's piece store accepts (its thread pool is never
    used here: nothing is fetched or written).
    """

    def getThreadPool(self) -> Any:
        return reactor.getThreadPool()


def _supernode(tmp_path: Path) -> tuple[_Clock, Supernode, Swarm]:
    clock = _Clock()
    state = InMemorySwarmState()
    supernode = Supernode(
        clock, tmp_path, state, None, Settings(), rng=random.Random(1)
    )
    swarm = Swarm(TaskInfo(TASK_ID, "http://127.0.0.1/f", 4))
    for n, name in enumerate(("a", "b", "c", "d")):
        swarm.peers[name] = PeerInfo(name, f"127.0.0.{n + 1}:65001")
        swarm.holdings[name] = set()
    Deferred.fromCoroutine(state.put(swarm))
    return clock, supernode, swarm


def test_changes_of_one_turn_wake_each_waiter_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Two peers wait for pieces of a task still being fetched; two peers
    leaving in the same turn make each waiter schedule once more (not twice),
    and only when the turn ends.  A piece cut later is assigned to one
    waiter, from the supernode; the other keeps waiting until its time is
    up.  Nothing is left scheduled on the clock.
    """
    clock, supernode, swarm = _supernode(tmp_path)
    runs: list[str] = []
    schedule = scheduler.schedule

    def counting(swarm: Swarm, requester: str, *args: Any) -> Any:
        runs.append(requester)
        return schedule(swarm, requester, *args)

    monkeypatch.setattr(scheduler, "schedule", counting)
    waiting = [
        Deferred.fromCoroutine(supernode.schedule(TASK_ID, name, [], [], 1, 5.0))
        for name in ("a", "b")
    ]
    assert runs == ["a", "b"]
    assert not any(d.called for d in waiting)

    Deferred.fromCoroutine(supernode.leave(TASK_ID, "c"))
    Deferred.fromCoroutine(supernode.leave(TASK_ID, "d"))
    assert runs == ["a", "b"]
    clock.advance(0)
    assert sorted(runs) == ["a", "a", "b", "b"]
    assert not any(d.called for d in waiting)

    swarm.task.pieces[0] = "00" * 32
    swarm.task.length = 4
    supernode._changed(TASK_ID)
    clock.advance(0)
    answers = [d.result for d in waiting if d.called]
    assert len(answers) == 1
    assert [p["piece"] for p in answers[0]["pieces"]] == [0]
    assert answers[0]["pieces"][0]["peer_id"] == supernode.supernode_peer_id(TASK_ID)

    clock.advance(5.0)
    assert all(d.called for d in waiting)
    late = [d.result for d in waiting if d.result is not answers[0]]
    assert late[0]["pieces"] == []
    supernode.stop()
    assert clock.getDelayedCalls() == []


def test_stop_cancels_a_pending_wake_up(tmp_path: Path) -> None:
    """
    Stopping the supernode with a wake-up pending cancels it (the waiting
    call schedules again at once instead), and the call still ends when its
    time is up.
    """
    clock, supernode, _ = _supernode(tmp_path)
    waiting = Deferred.fromCoroutine(supernode.schedule(TASK_ID, "a", [], [], 1, 5.0))
    Deferred.fromCoroutine(supernode.leave(TASK_ID, "c"))
    pending = [c for c in clock.getDelayedCalls() if c.getTime() == 0]
    assert len(pending) == 1
    supernode.stop()
    assert not pending[0].active()
    clock.advance(5.0)
    assert waiting.called
    assert waiting.result["pieces"] == []
    assert clock.getDelayedCalls() == []
