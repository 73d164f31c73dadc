"""The node registry and routing, with fake nodes and a fake clock (no model)."""

from __future__ import annotations

import random

import pytest

from moemesh.services.core.errors import Unavailable
from moemesh.services.scheduler.registry import Load, Node, NodeState, Registry, ServedModel
from moemesh.services.scheduler.router import pick_node

MODEL = ServedModel(model_id="demo", revision="r1", kind="generation")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_node(node_id: str, **kwargs) -> Node:
    return Node(node_id=node_id, address=f"127.0.0.1:{len(node_id)}", models=(MODEL,), replica_group=node_id,
                max_num_seqs=8, **kwargs)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def registry(clock):
    return Registry(heartbeat_interval=1.0, max_missed=3, clock=clock)


def test_registered_node_is_routable_for_its_model(registry):
    registry.register(make_node("a"))
    assert [n.node_id for n in registry.routable("demo")] == ["a"]
    assert registry.routable("other") == []


def test_heartbeat_with_unknown_lease_asks_for_reregistration(registry):
    node = registry.register(make_node("a"))
    assert registry.heartbeat("a", node.lease_id, Load(running_seqs=2))
    assert registry.nodes["a"].load.running_seqs == 2
    assert not registry.heartbeat("a", "stale-lease", Load())
    assert not registry.heartbeat("ghost", node.lease_id, Load())


def test_late_node_becomes_suspect_then_is_evicted(registry, clock):
    evicted = []
    registry.on_evict.append(lambda n: evicted.append(n.node_id))
    registry.register(make_node("a"))
    clock.now += 2.0
    registry.expire()
    assert registry.nodes["a"].state == NodeState.SUSPECT
    assert registry.routable("demo") == [], "a suspect node must not receive traffic"
    clock.now += 1.5
    assert registry.expire() == ["a"]
    assert evicted == ["a"] and "a" not in registry.nodes


def test_suspect_node_recovers_on_heartbeat(registry, clock):
    node = registry.register(make_node("a"))
    clock.now += 2.0
    registry.expire()
    assert registry.heartbeat("a", node.lease_id, Load())
    assert registry.nodes["a"].state == NodeState.READY


def test_reregistration_replaces_the_old_lease(registry):
    first = registry.register(make_node("a"))
    second = registry.register(make_node("a"))
    assert first.lease_id != second.lease_id
    assert not registry.heartbeat("a", first.lease_id, Load())


def test_deregister_needs_the_lease(registry):
    node = registry.register(make_node("a"))
    assert not registry.deregister("a", "wrong")
    assert registry.deregister("a", node.lease_id)
    assert registry.nodes == {}


def test_catalogue_counts_ready_replicas(registry):
    registry.register(make_node("a"))
    registry.register(make_node("b"))
    model, replicas = registry.catalogue()["demo"]
    assert model == MODEL and replicas == 2


def test_router_prefers_the_less_loaded_node():
    busy, idle = make_node("busy"), make_node("idle")
    busy.in_flight = 8
    rng = random.Random(0)
    picks = {pick_node([busy, idle], rng).node_id for _ in range(20)}
    assert picks == {"idle"}


def test_router_without_candidates_is_unavailable():
    with pytest.raises(Unavailable):
        pick_node([], random.Random(0))
