"""The admission queue and the replica router: plain data, a fake clock, no I/O."""

from __future__ import annotations

import gc
import random
import weakref
from collections import Counter

import grpc
import pytest

from moemesh.services.core.errors import Overloaded, Unavailable
from moemesh.services.core.interceptors import grpc_status_code
from moemesh.services.scheduler.queue import RETRY_PRIORITY, AdmissionQueue, Pending, QueueLimits
from moemesh.services.scheduler.registry import Load, Node, ServedModel
from moemesh.services.scheduler.router import AFFINITY_PREFIX_BYTES, affinity_key, pick_node, pressure

MODEL = ServedModel(model_id="demo", revision="r1", kind="generation")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_queue(max_requests: int = 1000, max_tokens: int = 10_000_000, weights: dict[str, float] | None = None,
               clock: FakeClock | None = None) -> AdmissionQueue:
    return AdmissionQueue(QueueLimits(max_requests, max_tokens, weights or {}), clock=clock or FakeClock())


def item(request_id: str, tenant: str = "t", priority: int = 0, cost: int = 100, deadline: float | None = None,
         payload: object = None) -> Pending:
    return Pending(request_id=request_id, tenant=tenant, priority=priority, cost=cost, deadline=deadline,
                   payload=payload)


def drain(queue: AdmissionQueue, n: int | None = None) -> list[Pending]:
    out = []
    while (n is None or len(out) < n) and (popped := queue.pop()) is not None:
        out.append(popped)
    return out


def make_node(node_id: str, in_flight: int = 0, max_num_seqs: int = 8, waiting: int = 0) -> Node:
    return Node(node_id=node_id, address=f"10.0.0.1:{len(node_id)}", models=(MODEL,), replica_group=node_id,
                max_num_seqs=max_num_seqs, in_flight=in_flight, load=Load(waiting_seqs=waiting))


# ---- bounds ----------------------------------------------------------------------------------------------------------

def test_request_bound_refuses_with_retry_after_and_queues_nothing():
    queue = make_queue(max_requests=3)
    for i in range(3):
        queue.push(item(f"r{i}"))
    tokens_before = queue.tokens
    with pytest.raises(Overloaded) as info:
        queue.push(item("r3"), retry_after=2.5)
    assert grpc_status_code(info.value.code) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.retry_after == 2.5
    assert len(queue) == 3 and "r3" not in queue and queue.tokens == tokens_before
    assert queue.rejected == 1
    assert [p.request_id for p in drain(queue)] == ["r0", "r1", "r2"], "the refused request must not be queued"


def test_token_bound_refuses_a_push_that_would_pass_it():
    queue = make_queue(max_requests=100, max_tokens=250)
    queue.push(item("a", cost=100))
    queue.push(item("b", cost=100))
    with pytest.raises(Overloaded) as info:
        queue.push(item("c", cost=51))
    assert info.value.retry_after > 0
    assert "c" not in queue and len(queue) == 2 and queue.tokens == 200
    queue.push(item("d", cost=50))  # exactly at the bound is fine
    assert queue.tokens == 250
    assert queue.rejected == 1


def test_force_bypasses_both_bounds():
    queue = make_queue(max_requests=1, max_tokens=100)
    queue.push(item("a", cost=100))
    queue.push(item("retry", cost=500, priority=RETRY_PRIORITY), force=True)
    assert len(queue) == 2 and queue.tokens == 600
    assert queue.rejected == 0
    with pytest.raises(Overloaded):
        queue.push(item("b", cost=1))
    assert queue.rejected == 1


def test_rejected_counts_every_refusal():
    queue = make_queue(max_requests=2, max_tokens=1000)
    queue.push(item("a"))
    queue.push(item("b"))
    for i in range(5):
        with pytest.raises(Overloaded):
            queue.push(item(f"x{i}"))
    assert queue.rejected == 5


def test_memory_bounded_under_a_flood():
    queue = make_queue(max_requests=100)
    refused = 0
    for i in range(10_000):
        try:
            queue.push(item(f"r{i}", tenant=f"t{i % 7}", cost=10))
        except Overloaded:
            refused += 1
    assert len(queue) == 100
    assert refused == 9_900 and queue.rejected == 9_900
    assert queue.tokens == 100 * 10


@pytest.mark.parametrize("how", ["remove", "expired"])
def test_removed_requests_are_not_retained(how):
    """A queue that keeps its head (every replica busy) while callers cancel or time out must not hold them all.

    The module promises that the scheduler's memory stays flat; a removed request's payload (the dispatcher's route,
    prompt included) must be released, not kept as a tombstone in the heap until it reaches the top.
    """
    clock = FakeClock()
    queue = make_queue(max_requests=10, clock=clock)
    queue.push(item("head", tenant="h", cost=1))  # never popped while the replicas stay busy

    class Payload:
        pass

    refs = []
    for i in range(2000):
        payload = Payload()
        refs.append(weakref.ref(payload))
        queue.push(item(f"r{i}", tenant="churn", cost=1, deadline=50.0, payload=payload))
        if how == "remove":
            assert queue.remove(f"r{i}") is not None
        else:
            assert [p.request_id for p in queue.expired(now_unix=100.0)] == [f"r{i}"]
        del payload
        assert queue.peek().request_id == "head"
    assert len(queue) == 1 and queue.tokens == 1
    gc.collect()
    alive = sum(ref() is not None for ref in refs)
    assert alive <= 10, f"{alive} removed requests are still held by the queue"


# ---- priority --------------------------------------------------------------------------------------------------------

def test_higher_priority_pops_first_regardless_of_arrival():
    queue = make_queue()
    queue.push(item("low-1", priority=0))
    queue.push(item("mid", priority=5))
    queue.push(item("low-2", priority=0))
    queue.push(item("high", priority=9))
    assert [p.request_id for p in drain(queue)] == ["high", "mid", "low-1", "low-2"]


def test_retry_priority_beats_everything():
    queue = make_queue()
    queue.push(item("big-client-priority", priority=1_000_000))
    queue.push(item("retry", priority=RETRY_PRIORITY, cost=10_000), force=True)
    queue.push(item("normal"))
    assert queue.peek().request_id == "retry"
    assert [p.request_id for p in drain(queue)] == ["retry", "big-client-priority", "normal"]


# ---- fairness --------------------------------------------------------------------------------------------------------

def test_late_tenant_is_not_stuck_behind_a_flood():
    queue = make_queue()
    for i in range(50):
        queue.push(item(f"a{i}", tenant="A", cost=100))
    for i in range(5):
        queue.push(item(f"b{i}", tenant="B", cost=100))
    first = [p.request_id for p in drain(queue, 10)]
    assert sorted(r for r in first if r.startswith("b")) == [f"b{i}" for i in range(5)], first
    # each tenant's own requests stay in arrival order
    rest = [p.request_id for p in drain(queue)]
    assert [r for r in first + rest if r.startswith("a")] == [f"a{i}" for i in range(50)]


def test_fair_share_is_by_tokens_not_requests():
    queue = make_queue()
    for i in range(30):
        queue.push(item(f"big{i}", tenant="big", cost=1000))
        queue.push(item(f"small{i}", tenant="small", cost=100))
    window = drain(queue, 22)
    pops = Counter(p.tenant for p in window)
    tokens = Counter()
    for p in window:
        tokens[p.tenant] += p.cost
    assert pops["small"] > 5 * pops["big"], pops
    assert pops["big"] >= 1, "the expensive tenant still gets served"
    assert tokens["big"] == pytest.approx(tokens["small"], rel=0.5), tokens


def test_tenant_weights_scale_the_token_share():
    queue = make_queue(weights={"gold": 2.0})
    for i in range(60):
        queue.push(item(f"g{i}", tenant="gold", cost=100))
        queue.push(item(f"s{i}", tenant="std", cost=100))
    window = drain(queue, 45)
    tokens = Counter()
    for p in window:
        tokens[p.tenant] += p.cost
    assert tokens["gold"] / tokens["std"] == pytest.approx(2.0, rel=0.15), tokens


def test_tenant_arriving_later_gets_no_credit_for_idle_time():
    queue = make_queue()
    for i in range(20):
        queue.push(item(f"a{i}", tenant="A", cost=100))
    drain(queue, 10)  # A has been served alone for a while
    for i in range(3):
        queue.push(item(f"b{i}", tenant="B", cost=100))
    order = [p.tenant for p in drain(queue, 6)]
    assert order.count("A") == 3 and order.count("B") == 3, "B shares from now on instead of taking a burst"


# ---- remove / expiry / accounting ----------------------------------------------------------------------------------

def test_removed_request_never_pops_and_accounting_follows():
    queue = make_queue()
    queue.push(item("a", cost=10))
    queue.push(item("b", cost=20))
    queue.push(item("c", cost=30))
    assert len(queue) == 3 and queue.tokens == 60
    removed = queue.remove("b")
    assert removed is not None and removed.request_id == "b"
    assert "b" not in queue and len(queue) == 2 and queue.tokens == 40
    assert queue.remove("b") is None and queue.remove("ghost") is None
    assert queue.tokens == 40
    first = queue.pop()
    assert first.request_id == "a" and len(queue) == 1 and queue.tokens == 30
    assert [p.request_id for p in drain(queue)] == ["c"]
    assert len(queue) == 0 and queue.tokens == 0
    assert queue.pop() is None and queue.peek() is None


def test_removing_the_head_moves_peek_on():
    queue = make_queue()
    queue.push(item("head", priority=1))
    queue.push(item("next"))
    queue.remove("head")
    assert queue.peek().request_id == "next"
    assert queue.pop().request_id == "next"


def test_expired_removes_and_returns_exactly_the_late_ones():
    queue = make_queue()
    queue.push(item("early", deadline=100.0, cost=1))
    queue.push(item("edge", deadline=150.0, cost=2))
    queue.push(item("later", deadline=200.0, cost=4))
    queue.push(item("none", deadline=None, cost=8))
    late = queue.expired(now_unix=150.0)
    assert sorted(p.request_id for p in late) == ["early", "edge"]
    assert len(queue) == 2 and queue.tokens == 12
    assert queue.expired(now_unix=150.0) == []
    assert sorted(p.request_id for p in drain(queue)) == ["later", "none"]


def test_oldest_wait_uses_the_clock():
    clock = FakeClock()
    queue = make_queue(clock=clock)
    assert queue.oldest_wait() == 0.0
    queue.push(item("a"))
    clock.now += 2.0
    queue.push(item("b"))
    clock.now += 1.0
    assert queue.oldest_wait() == pytest.approx(3.0)
    assert queue.pop().request_id == "a"
    assert queue.oldest_wait() == pytest.approx(1.0)
    queue.pop()
    assert queue.oldest_wait() == 0.0


def test_queue_restarts_cleanly_after_idle():
    queue = make_queue()
    for i in range(10):
        queue.push(item(f"a{i}", tenant="A", cost=100))
    drain(queue)
    queue.push(item("a-new", tenant="A", cost=100))
    queue.push(item("b-new", tenant="B", cost=100))
    assert [p.request_id for p in drain(queue)] == ["a-new", "b-new"]


# ---- out-of-order service (the dispatcher's bypass) ---------------------------------------------------------------

def test_ahead_lists_requests_in_pop_order_without_taking_them():
    queue = make_queue()
    for request_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5)]:
        queue.push(item(request_id, priority=priority))
    queue.remove("d")
    assert [p.request_id for p in queue.ahead(10)] == ["b", "a", "c"]
    assert [p.request_id for p in queue.ahead(2)] == ["b", "a"]
    assert len(queue) == 3 and [p.request_id for p in drain(queue)] == ["b", "a", "c"]


def test_take_serves_a_request_behind_the_head_and_keeps_the_rest_in_order():
    queue = make_queue()
    for request_id in ("big", "s1", "s2", "s3"):
        queue.push(item(request_id, cost=1000 if request_id == "big" else 10))
    queue.take(next(p for p in queue.ahead(4) if p.request_id == "s2"))
    assert "s2" not in queue and len(queue) == 3 and queue.tokens == 1020
    assert queue.peek().request_id == "big", "the request passed over keeps its place at the head"
    queue.push(item("s4", cost=10))
    assert [p.request_id for p in drain(queue)] == ["big", "s1", "s3", "s4"]


# ---- router ----------------------------------------------------------------------------------------------------------

def test_pick_node_without_candidates_is_unavailable():
    with pytest.raises(Unavailable) as info:
        pick_node([], random.Random(0), affinity_key("hello"))
    assert grpc_status_code(info.value.code) == grpc.StatusCode.UNAVAILABLE


def test_pick_node_with_one_candidate_returns_it():
    only = make_node("only", in_flight=8)
    assert pick_node([only], random.Random(0)) is only
    assert pick_node([only], random.Random(0), affinity_key("x")) is only


def test_pick_node_without_affinity_picks_the_lighter_of_two():
    busy, idle = make_node("busy", in_flight=6), make_node("idle", in_flight=1)
    rng = random.Random(1)
    assert {pick_node([busy, idle], rng).node_id for _ in range(50)} == {"idle"}
    waiting = make_node("waiting", waiting=7)  # waiting sequences count as pressure too
    assert {pick_node([waiting, idle], rng).node_id for _ in range(50)} == {"idle"}


def test_power_of_two_never_picks_the_heaviest_of_many():
    nodes = [make_node(f"n{i}", in_flight=i) for i in range(5)]
    rng = random.Random(2)
    picks = Counter(pick_node(nodes, rng).node_id for _ in range(500))
    assert "n4" not in picks
    assert picks["n0"] > picks["n3"]


def test_same_affinity_key_always_picks_the_same_node():
    nodes = [make_node(f"n{i}") for i in range(4)]
    key = affinity_key("You are a helpful assistant. Summarise the following text.")
    rng = random.Random(3)
    picks = {pick_node(nodes, rng, key).node_id for _ in range(100)}
    assert len(picks) == 1
    shuffled = list(reversed(nodes))
    assert {pick_node(shuffled, rng, key).node_id for _ in range(20)} == picks, "order of candidates does not matter"


def test_affinity_keys_spread_over_nodes():
    nodes = [make_node(f"n{i}") for i in range(4)]
    rng = random.Random(4)
    picks = Counter(pick_node(nodes, rng, affinity_key(f"prompt number {k}")).node_id for k in range(200))
    assert set(picks) == {n.node_id for n in nodes}
    assert min(picks.values()) >= 20, picks


def _preferred(nodes: list[Node], key: bytes) -> Node:
    idle = random.Random(0)
    return pick_node(nodes, idle, key)


def test_load_guard_sends_work_away_from_a_hot_preferred_node():
    a, b = make_node("a"), make_node("b")
    key = affinity_key("a popular system prompt")
    preferred = _preferred([a, b], key)
    other = b if preferred is a else a
    rng = random.Random(5)
    preferred.in_flight = 4  # pressure 0.5 == 0 + guard: still preferred
    assert pressure(preferred) - pressure(other) == pytest.approx(0.5)
    assert pick_node([a, b], rng, key, load_guard=0.5) is preferred
    preferred.in_flight = 5  # pressure 0.625 > guard: the lighter one wins
    assert {pick_node([a, b], rng, key, load_guard=0.5).node_id for _ in range(20)} == {other.node_id}
    assert pick_node([a, b], rng, key, load_guard=1.0) is preferred


def test_removing_a_node_moves_only_its_keys():
    nodes = [make_node(f"n{i}") for i in range(5)]
    keys = [affinity_key(f"conversation {k}: hello") for k in range(300)]
    rng = random.Random(6)
    before = {k: pick_node(nodes, rng, k).node_id for k in keys}
    survivors = [n for n in nodes if n.node_id != "n2"]
    after = {k: pick_node(survivors, rng, k).node_id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved, "the lost node had some keys"
    assert all(before[k] == "n2" for k in moved), "only keys of the lost node may move"
    assert all(after[k] != "n2" for k in keys)
    added = nodes + [make_node("n5")]
    again = {k: pick_node(added, rng, k).node_id for k in keys}
    assert all(again[k] in (before[k], "n5") for k in keys), "a new node only takes keys, never reshuffles"


def test_affinity_key_uses_only_the_prompt_head():
    common = "x" * 300
    assert affinity_key(common + "first question") == affinity_key(common + "a different question")
    assert len(affinity_key("y" * 1000)) == 1 + AFFINITY_PREFIX_BYTES
    assert affinity_key("short a") != affinity_key("short b")
    assert affinity_key("") is None


def test_affinity_key_prefers_token_ids_over_text():
    ids = list(range(100))
    assert affinity_key("text", ids) == affinity_key("other text", ids)
    assert affinity_key("text", ids) != affinity_key("text")
    assert affinity_key("t", ids[:64] + [1]) == affinity_key("t", ids[:64] + [2]), "past the prefix is ignored"
    assert affinity_key("text", []) == affinity_key("text")


def test_affinity_key_takes_a_negative_token_id_without_failing():
    """Ids are int32 on the wire; a negative one is the worker's to refuse, and must not break routing."""
    assert affinity_key("", [1, -3, 9]) != affinity_key("", [1, 3, 9])
