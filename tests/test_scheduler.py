"""
The supernode's piece scheduler, on swarms built by hand.
"""

import random
from collections import Counter

from helpers import DETERMINISTIC
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.supernode.scheduler import (
    Assignment,
    Limits,
    record_failed,
    record_finished,
    schedule,
)
from dragonfly.supernode.state import (
    SUPERNODE,
    Holders,
    Lease,
    PeerInfo,
    Swarm,
    TaskInfo,
)

TASK_ID = "ef" * 32
ROOMY = Limits(peer_upload_limit=100, supernode_upload_limit=100)


def make_swarm(pieces: int = 4, peers: tuple[str, ...] = ("a", "b", "c", "r")) -> Swarm:
    task = TaskInfo(
        task_id=TASK_ID,
        url="http://127.0.0.1/file",
        piece_size=4,
        length=4 * pieces,
        pieces={p: f"{p:064x}" for p in range(pieces)},
    )
    swarm = Swarm(task)
    for i, peer in enumerate(peers):
        swarm.peers[peer] = PeerInfo(peer, f"127.0.0.{i + 1}:65001")
    return swarm


def hold(swarm: Swarm, peer: str, *pieces: int) -> None:
    swarm.holdings.setdefault(peer, set())
    for piece in pieces:
        swarm.hold(peer, piece)


def lease(
    swarm: Swarm, requester: str, piece: int, source: str, expires: float
) -> None:
    swarm.add_lease(requester, piece, Lease(source, expires))


def drop_leases(swarm: Swarm) -> None:
    for requester, piece in list(swarm.leases):
        swarm.drop_lease(requester, piece)


def run(
    swarm: Swarm,
    requester: str = "r",
    want: int = 10,
    now: float = 0.0,
    limits: Limits = ROOMY,
    seed: int = 0,
) -> list[Assignment]:
    return schedule(swarm, requester, want, now, limits, random.Random(seed))


# Order and sources ---------------------------------------------------------------


def test_rarest_piece_first_then_lowest_number() -> None:
    """
    Pieces held by fewer peers come first; equally rare pieces go in order.
    """
    swarm = make_swarm(4)
    hold(swarm, "a", 0, 1, 2, 3)
    hold(swarm, "b", 0, 2, 3)
    hold(swarm, "c", 0, 3)
    assert [a.piece for a in run(swarm, want=4)] == [1, 2, 0, 3]
    assert [a.piece for a in run(make_swarm_like(swarm), want=1)] == [1]


def make_swarm_like(swarm: Swarm) -> Swarm:
    copy = make_swarm(len(swarm.task.pieces))
    for peer, pieces in swarm.holdings.items():
        hold(copy, peer, *pieces)
    return copy


def test_unheld_pieces_are_rarest_and_come_from_supernode() -> None:
    """
    A piece nobody holds is the rarest of all and, nobody fetching it, is
    assigned from the supernode.
    """
    swarm = make_swarm(3)
    hold(swarm, "a", 0, 2)
    assert run(swarm) == [
        Assignment(1, SUPERNODE),
        Assignment(0, "a"),
        Assignment(2, "a"),
    ]


def test_peers_preferred_over_supernode() -> None:
    """
    A piece a usable peer holds is fetched from that peer, never the
    supernode, even when the supernode is idle.
    """
    swarm = make_swarm(2)
    hold(swarm, "b", 0, 1)
    assert {a.source for a in run(swarm)} == {"b"}


def test_least_loaded_holder_is_chosen() -> None:
    """
    Among holders, the one with the fewest leases serves; ties are broken at
    random between the equally loaded only.
    """
    chosen = set()
    for seed in range(40):
        swarm = make_swarm(3, peers=("a", "b", "c", "r", "x", "y"))
        hold(swarm, "a", 0, 1, 2)
        hold(swarm, "b", 0, 1, 2)
        hold(swarm, "c", 0, 1, 2)
        lease(swarm, "x", 0, "a", 100)
        lease(swarm, "y", 1, "a", 100)
        lease(swarm, "y", 0, "b", 100)
        (first,) = run(swarm, want=1, seed=seed)
        assert first.source == "c"
        swarm2 = make_swarm(1, peers=("a", "b", "r"))
        hold(swarm2, "a", 0)
        hold(swarm2, "b", 0)
        chosen.add(run(swarm2, want=1, seed=seed)[0].source)
    assert chosen == {"a", "b"}


def test_load_spreads_within_one_call() -> None:
    """
    Assignments made in the same call count as load: several pieces held by
    two peers alternate between them.
    """
    swarm = make_swarm(4)
    hold(swarm, "a", 0, 1, 2, 3)
    hold(swarm, "b", 0, 1, 2, 3)
    sources = Counter(a.source for a in run(swarm, want=4))
    assert sources == Counter({"a": 2, "b": 2})


def test_same_seed_same_schedule() -> None:
    """
    With the same random seed the decision is the same (determinism).
    """
    results = set()
    for _ in range(3):
        swarm = make_swarm(6, peers=("a", "b", "c", "r"))
        for peer in "abc":
            hold(swarm, peer, *range(6))
        results.add(tuple(run(swarm, seed=7)))
    assert len(results) == 1


def test_peer_upload_limit_respected() -> None:
    """
    A peer already serving peer_upload_limit leases gets no more, and the
    supernode does not step in for a piece a busy peer holds: the requester
    waits.
    """
    limits = Limits(peer_upload_limit=2)
    swarm = make_swarm(4, peers=("a", "r", "x"))
    hold(swarm, "a", 0, 1, 2, 3)
    lease(swarm, "x", 0, "a", 100)
    assert run(swarm, limits=limits) == [Assignment(0, "a")]
    assert run(swarm, limits=limits) == []
    assert SUPERNODE not in {lease.source for lease in swarm.leases.values()}


def test_requester_and_its_holdings_and_leases_are_skipped() -> None:
    """
    The requester is not given pieces it holds or already has leased.
    """
    swarm = make_swarm(4)
    hold(swarm, "a", 0, 1, 2, 3)
    hold(swarm, "r", 0)
    lease(swarm, "r", 1, "a", 100)
    assert {a.piece for a in run(swarm)} == {2, 3}


def test_want_limits_and_zero_want() -> None:
    """
    At most C{want} pieces are assigned; want 0 assigns and leases nothing.
    """
    swarm = make_swarm(5)
    hold(swarm, "a", *range(5))
    assert run(swarm, want=0) == []
    assert swarm.leases == {}
    assert len(run(swarm, want=2)) == 2
    assert len(swarm.leases) == 2


# The supernode ------------------------------------------------------------------


def test_supernode_only_when_nobody_is_fetching_the_piece() -> None:
    """
    A piece nobody holds but another peer is already fetching is not given to
    a second requester from the supernode: it waits for the first copy.
    """
    swarm = make_swarm(2, peers=("r", "x"))
    lease(swarm, "x", 0, SUPERNODE, 100)
    assert run(swarm) == [Assignment(1, SUPERNODE)]
    # once x holds piece 0, r takes it from x
    record_finished(swarm, "x", [0])
    assert run(swarm) == [Assignment(0, "x")]


def test_supernode_when_every_holder_is_refused() -> None:
    """
    When all holders are blacklisted by the requester (or banned), the
    supernode serves the piece.
    """
    swarm = make_swarm(1, peers=("a", "r"))
    hold(swarm, "a", 0)
    swarm.blacklist["r"] = {"a"}
    assert run(swarm) == [Assignment(0, SUPERNODE)]


def test_supernode_upload_limit_respected() -> None:
    """
    The supernode carries at most supernode_upload_limit leases at once,
    counting those already out.
    """
    limits = Limits(supernode_upload_limit=3)
    swarm = make_swarm(6, peers=("r", "x"))
    lease(swarm, "x", 5, SUPERNODE, 100)
    assert run(swarm, limits=limits) == [
        Assignment(0, SUPERNODE),
        Assignment(1, SUPERNODE),
    ]
    assert run(swarm, "x", limits=limits) == []


# Failures --------------------------------------------------------------------


def test_failure_blacklists_source_for_that_requester_only() -> None:
    """
    After r fails to get a piece from a, r is not sent to a again (for this
    task) but other requesters still are; the lease is released.
    """
    limits = Limits()
    swarm = make_swarm(2, peers=("a", "b", "r", "s"))
    hold(swarm, "a", 0, 1)
    assert run(swarm, want=1) == [Assignment(0, "a")]
    record_failed(swarm, "r", 0, "a", bad_data=False, limits=limits)
    assert ("r", 0) not in swarm.leases
    assert swarm.blacklist["r"] == {"a"}
    assert "a" not in swarm.banned
    hold(swarm, "b", 0, 1)
    assert {a.source for a in run(swarm)} == {"b"}
    assert run(swarm, "s", want=1)[0].source in {"a", "b"}
    assert "a" in {a.source for a in run(make_swarm_with_blacklist(), "s")}


def make_swarm_with_blacklist() -> Swarm:
    swarm = make_swarm(1, peers=("a", "r", "s"))
    hold(swarm, "a", 0)
    swarm.blacklist["r"] = {"a"}
    return swarm


def test_source_banned_after_ban_after_failures() -> None:
    """
    A source several requesters could not use is banned from the task for
    everyone: it holds nothing any more and serves nobody.
    """
    limits = Limits(ban_after_failures=3)
    swarm = make_swarm(1, peers=("a", "r", "s", "t", "u"))
    hold(swarm, "a", 0)
    record_failed(swarm, "r", 0, "a", False, limits)
    record_failed(swarm, "s", 0, "a", False, limits)
    assert "a" not in swarm.banned
    assert run(swarm, "u", want=1) == [Assignment(0, "a")]
    record_failed(swarm, "t", 0, "a", False, limits)
    assert "a" in swarm.banned
    assert "a" not in swarm.holdings
    drop_leases(swarm)
    hold(swarm, "a", 0)  # a banned peer reporting again is still not a source
    assert run(swarm, "u") == [Assignment(0, SUPERNODE)]


def test_bad_data_bans_at_once() -> None:
    """
    A source that served bytes with the wrong digest is banned on the first
    report.
    """
    swarm = make_swarm(1, peers=("a", "r", "s"))
    hold(swarm, "a", 0)
    record_failed(swarm, "r", 0, "a", bad_data=True, limits=Limits())
    assert swarm.banned == {"a"}
    assert run(swarm, "s") == [Assignment(0, SUPERNODE)]


def test_supernode_failure_is_not_blacklisted() -> None:
    """
    Failing to fetch from the supernode counts against the requester but
    never blacklists or bans the supernode.
    """
    limits = Limits()
    swarm = make_swarm(1, peers=("r",))
    for _ in range(5):
        assert run(swarm, limits=limits) == [Assignment(0, SUPERNODE)]
        record_failed(swarm, "r", 0, SUPERNODE, True, limits)
    assert swarm.banned == set()
    assert swarm.blacklist.get("r", set()) == set()
    assert swarm.requester_failures["r"] == 5


def test_failing_requester_gets_everything_from_supernode() -> None:
    """
    A requester with more than requester_failure_limit failures is served by
    the supernode only, even for pieces peers hold or others are fetching.
    """
    limits = Limits(requester_failure_limit=8)
    swarm = make_swarm(3, peers=("a", "r", "x"))
    hold(swarm, "a", 0, 1)
    lease(swarm, "x", 2, SUPERNODE, 100)
    swarm.requester_failures["r"] = 8
    assert {a.source for a in run(swarm, limits=limits)} == {"a"}
    drop_leases(swarm)
    lease(swarm, "x", 2, SUPERNODE, 100)
    swarm.requester_failures["r"] = 9
    assert run(swarm, limits=limits) == [
        Assignment(2, SUPERNODE),
        Assignment(0, SUPERNODE),
        Assignment(1, SUPERNODE),
    ]


def test_success_clears_failure_counts() -> None:
    """
    A successful piece from a source clears that source's failure count and
    the requester's.
    """
    limits = Limits(ban_after_failures=2)
    swarm = make_swarm(2, peers=("a", "r", "s"))
    hold(swarm, "a", 0, 1)
    record_failed(swarm, "s", 0, "a", False, limits)
    assert swarm.failures["a"] == 1
    assert run(swarm, want=1) == [Assignment(0, "a")]
    record_finished(swarm, "r", [0])
    assert "a" not in swarm.failures
    assert swarm.served == {"a": 1}
    record_failed(swarm, "s", 1, "a", False, limits)
    assert "a" not in swarm.banned


# Leases and membership ---------------------------------------------------------------


def test_leases_expire_and_free_load() -> None:
    """
    A lease counts as load until lease_seconds pass; then it is dropped and
    its source and piece are free again.
    """
    limits = Limits(peer_upload_limit=1, lease_seconds=30)
    swarm = make_swarm(2, peers=("a", "r", "x"))
    hold(swarm, "a", 0, 1)
    assert run(swarm, "x", want=1, now=0, limits=limits) == [Assignment(0, "a")]
    assert swarm.leases[("x", 0)] == Lease("a", 30)
    assert run(swarm, "r", now=29.9, limits=limits) == []
    assert run(swarm, "r", want=1, now=30, limits=limits) == [Assignment(0, "a")]
    assert ("x", 0) not in swarm.leases


def test_expired_own_lease_is_reassigned() -> None:
    """
    A piece leased to the requester is not handed out again while the lease
    runs, and is after it expires.
    """
    limits = Limits(lease_seconds=10)
    swarm = make_swarm(1, peers=("a", "r"))
    hold(swarm, "a", 0)
    assert run(swarm, now=0, limits=limits) == [Assignment(0, "a")]
    assert run(swarm, now=5, limits=limits) == []
    assert run(swarm, now=10, limits=limits) == [Assignment(0, "a")]


def test_record_finished_adds_holdings_and_clears_leases() -> None:
    """
    A finished piece is held by the reporter (and so becomes a source for
    others) and its lease stops counting; unknown pieces are ignored.
    """
    limits = Limits(peer_upload_limit=1)
    swarm = make_swarm(2, peers=("a", "r", "s"))
    hold(swarm, "a", 0, 1)
    assert run(swarm, "r", want=1, limits=limits) == [Assignment(0, "a")]
    assert run(swarm, "s", limits=limits) == []
    record_finished(swarm, "r", [0, 99])
    assert swarm.holdings["r"] == {0}
    assert swarm.leases == {}
    assert {a.piece for a in run(swarm, "s", limits=limits)} == {0, 1}


def test_removed_peer_is_no_longer_a_source() -> None:
    """
    Swarm.remove_peer forgets a peer's holdings, its leases as requester and
    as source; it is never assigned again.
    """
    swarm = make_swarm(2, peers=("a", "r", "x"))
    hold(swarm, "a", 0, 1)
    lease(swarm, "x", 0, "a", 100)
    lease(swarm, "a", 1, SUPERNODE, 100)
    swarm.finished.add("a")
    swarm.remove_peer("a")
    assert "a" not in swarm.peers
    assert "a" not in swarm.holdings
    assert "a" not in swarm.finished
    assert swarm.leases == {}
    assert run(swarm) == [Assignment(0, SUPERNODE), Assignment(1, SUPERNODE)]


def test_holder_not_in_swarm_is_not_a_source() -> None:
    """
    Holdings of a peer that is not (or no longer) a swarm member are ignored.
    """
    swarm = make_swarm(1, peers=("r",))
    hold(swarm, "ghost", 0)
    assert run(swarm) == [Assignment(0, SUPERNODE)]


def test_downloading_counts_unfinished_members() -> None:
    """
    downloading counts the members that have not finished.
    """
    swarm = make_swarm(1, peers=("a", "b", "c"))
    swarm.finished |= {"a", "gone"}
    assert swarm.downloading == 2


# Invariants ------------------------------------------------------------------


@st.composite
def swarms(draw: st.DrawFn) -> tuple[Swarm, Limits, int]:
    n_pieces = draw(st.integers(1, 8))
    names = ["p0", "p1", "p2", "p3", "p4"]
    swarm = make_swarm(n_pieces, peers=tuple(names))
    for name in names:
        hold(swarm, name, *draw(st.sets(st.integers(0, n_pieces - 1))))
    for _ in range(draw(st.integers(0, 6))):
        dst = draw(st.sampled_from(names))
        src = draw(st.sampled_from([*names, SUPERNODE]))
        lease(
            swarm, dst, draw(st.integers(0, n_pieces - 1)), src, draw(st.floats(0, 60))
        )
    swarm.banned = draw(st.sets(st.sampled_from(names), max_size=2))
    swarm.blacklist = {
        name: draw(st.sets(st.sampled_from(names), max_size=2)) for name in names
    }
    swarm.requester_failures = {"p0": draw(st.integers(0, 10))}
    limits = Limits(
        peer_upload_limit=draw(st.integers(1, 3)),
        supernode_upload_limit=draw(st.integers(1, 4)),
        requester_failure_limit=8,
    )
    return swarm, limits, draw(st.integers(0, 2**32))


@DETERMINISTIC
@given(swarms(), st.integers(0, 8), st.floats(0, 60))
def test_schedule_invariants(
    case: tuple[Swarm, Limits, int], want: int, now: float
) -> None:
    """
    Whatever the swarm: at most C{want} distinct pieces the requester lacks,
    each from the supernode or a member that holds it and that the requester
    may use, no source over its limit, and a lease recorded for each.
    """
    swarm, limits, seed = case
    requester = "p0"
    have = set(swarm.holdings.get(requester, set()))
    before = {k: v for k, v in swarm.leases.items() if v.expires > now}
    assigned = schedule(swarm, requester, want, now, limits, random.Random(seed))
    pieces = [a.piece for a in assigned]
    assert len(pieces) <= want
    assert len(set(pieces)) == len(pieces)
    assert not set(pieces) & have
    assert not set(pieces) & {p for (dst, p) in before if dst == requester}
    refused = swarm.banned | swarm.blacklist.get(requester, set()) | {requester}
    only_supernode = swarm.requester_failures.get(requester, 0) > 8
    in_flight = {p for (_, p) in before}
    for a in assigned:
        assert swarm.leases[(requester, a.piece)].source == a.source
        if a.source == SUPERNODE and not only_supernode:
            # nobody usable holds it, and nobody was already fetching it
            assert a.piece not in in_flight
            assert all(
                h in refused or h not in swarm.peers
                for h, held in swarm.holdings.items()
                if a.piece in held
            )
        if a.source != SUPERNODE:
            assert a.source in swarm.peers
            assert a.source not in refused
            assert a.piece in swarm.holdings[a.source]
    load = Counter(lease.source for lease in swarm.leases.values())
    for source, count in load.items():
        new = sum(1 for a in assigned if a.source == source)
        limit = (
            limits.supernode_upload_limit
            if source == SUPERNODE
            else limits.peer_upload_limit
        )
        if new:
            assert count <= limit


@DETERMINISTIC
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=60))
def test_holders_behave_as_a_set(changes: list[tuple[bool, int]]) -> None:
    """
    Whatever the adds and removals, a piece's holders are exactly the peers
    added and not removed since, each once in the list the scheduler draws
    from.
    """
    holders = Holders()
    expected: set[str] = set()
    for add, n in changes:
        name = f"p{n}"
        if add:
            holders.add(name)
            expected.add(name)
        else:
            holders.discard(name)
            expected.discard(name)
        assert sorted(holders.order) == sorted(expected)
        assert len(holders) == len(expected)
        assert all(name in holders for name in expected)


def test_large_swarm_draws_the_least_loaded_of_a_sample() -> None:
    """
    With more holders than the sample, the source is still an idle holder
    when most are idle, and a busy one at the limit is never chosen.
    """
    peers = (*(f"h{i}" for i in range(200)), "r")
    limits = Limits(peer_upload_limit=1)
    for seed in range(20):
        swarm = make_swarm(1, peers=peers)
        for i in range(200):
            hold(swarm, f"h{i}", 0)
        for i in range(0, 200, 2):
            lease(swarm, f"x{i}", 0, f"h{i}", 100)
        (chosen,) = run(swarm, want=1, limits=limits, seed=seed)
        assert int(chosen.source[1:]) % 2 == 1
