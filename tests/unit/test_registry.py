"""The node registry and routing, with fake nodes and a fake clock (no model); expert-parallel replica groups."""

from __future__ import annotations

import random

import pytest

from moemesh.services.core.errors import InvalidRequest, Unavailable
from moemesh.services.scheduler.main import expert_tokens_metric
from moemesh.services.scheduler.registry import Load, Node, NodeState, Registry, ServedModel
from moemesh.services.scheduler.router import pick_node
from moemesh.services.scheduler.service import check_registration
from moemesh.v1 import scheduler_pb2

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


# ---- expert-parallel replicas: a group of ranks routed to as one node ------------------------------------------------
PLACEMENT = '{"experts":[0,0,1,1]}'


def make_rank(group: str, rank: int, world_size: int = 2, placement: str = PLACEMENT) -> Node:
    """Rank 0 serves the model; a shard (rank > 0) serves none."""
    return Node(node_id=f"{group}-r{rank}", address=f"127.0.0.1:{700 + rank}", models=(MODEL,) if rank == 0 else (),
                replica_group=group, rank=rank, world_size=world_size, placement=placement, max_num_seqs=8)


def test_a_replica_is_routable_only_once_every_rank_is_registered_and_ready(registry, clock):
    leader = registry.register(make_rank("g", 0))
    assert registry.routable("demo") == [] and "demo" not in registry.catalogue(), "its shard is missing"
    shard = registry.register(make_rank("g", 1))
    assert registry.routable("demo") == [leader], "whole: routed to as one node, its rank 0"
    assert registry.catalogue()["demo"][1] == 1, "one replica, not two nodes"
    clock.now += 2.0
    registry.heartbeat(leader.node_id, leader.lease_id, Load())
    registry.expire()
    assert shard.state == NodeState.SUSPECT and registry.routable("demo") == [], "a late shard stops the routing"
    registry.heartbeat(shard.node_id, shard.lease_id, Load(draining=True))
    assert registry.routable("demo") == [], "so does a draining one"
    registry.heartbeat(shard.node_id, shard.lease_id, Load())
    assert registry.routable("demo") == [leader]


def test_a_shard_is_never_routed_to_even_if_it_claims_a_model(registry):
    registry.register(make_rank("g", 0))
    shard = make_rank("g", 1)
    shard.models = (MODEL,)
    registry.register(shard)
    assert [n.rank for n in registry.routable("demo")] == [0] and [n.rank for n in registry.serving("demo")] == [0]


def test_losing_a_shard_takes_the_replica_out_of_routing_and_reports_its_rank_0(registry, clock):
    lost = []
    registry.on_replica_lost.append(lambda leader, shard: lost.append((leader.node_id, shard.rank)))
    leader = registry.register(make_rank("g", 0))
    shard = registry.register(make_rank("g", 1))
    assert registry.deregister(shard.node_id, shard.lease_id)  # a broken heartbeat stream does this
    assert lost == [("g-r0", 1)] and registry.routable("demo") == []
    assert leader.node_id in registry.nodes, "rank 0 stays registered: it restarts or its shard comes back"
    again = registry.register(make_rank("g", 1))
    assert registry.routable("demo") == [leader]
    clock.now += 3.5  # missed heartbeats: only rank 0 kept beating
    registry.heartbeat(leader.node_id, leader.lease_id, Load())
    assert registry.expire() == [again.node_id] and lost == [("g-r0", 1), ("g-r0", 1)]


def test_a_restarted_rank_replaces_the_old_process_of_its_group_and_rank(registry):
    lost = []
    registry.on_replica_lost.append(lambda leader, shard: lost.append(shard.node_id))
    registry.register(make_rank("g", 0))
    old = registry.register(make_rank("g", 1))
    new = make_rank("g", 1)
    new.node_id = "g-r1-restarted"
    registry.register(new)
    assert old.node_id not in registry.nodes and lost == [old.node_id], "the old process counts as lost"
    assert [n.node_id for n in registry.ranks_of(registry.nodes["g-r0"])] == ["g-r0", "g-r1-restarted"]


def test_single_process_workers_sharing_a_group_name_stay_independent(registry):
    registry.register(Node(node_id="a", address="a:1", models=(MODEL,), replica_group="same"))
    registry.register(Node(node_id="b", address="b:1", models=(MODEL,), replica_group="same"))
    assert sorted(n.node_id for n in registry.routable("demo")) == ["a", "b"]


@pytest.mark.parametrize("shard", [
    make_rank("g", 1, world_size=3),  # disagrees on the world size
    make_rank("g", 1, placement='{"experts":[0,1,1,1]}'),  # on the placement
])
def test_ranks_that_disagree_on_the_replica_do_not_make_one(registry, shard):
    registry.register(make_rank("g", 0))
    registry.register(shard)
    assert registry.routable("demo") == []


def test_expert_load_from_heartbeats_adds_up_per_model_and_replica_group(registry):
    leader = registry.register(make_rank("g", 0))
    shard = registry.register(make_rank("g", 1))
    registry.heartbeat(leader.node_id, leader.lease_id, Load(expert_load=(3, 0, 1, 2)))
    registry.heartbeat(leader.node_id, leader.lease_id, Load(expert_load=(1, 1, 0, 0)))
    registry.heartbeat(shard.node_id, shard.lease_id, Load(expert_load=(9, 9, 9, 9)))  # only rank 0 counts
    assert registry.expert_tokens == {("demo", "g"): [4, 1, 1, 2]}
    family = expert_tokens_metric(registry)
    assert family.name == "moemesh_expert_tokens" and family.type == "counter"
    assert {(s.labels["expert"], s.value) for s in family.samples} == {("0", 4), ("1", 1), ("2", 1), ("3", 2)}
    assert {s.labels["replica_group"] for s in family.samples} == {"g"}
    registry.evict(leader.node_id)
    assert registry.expert_tokens == {}, "a lost replica's series go (a restarted one counts afresh)"


@pytest.mark.parametrize(("fields", "field"), [
    ({"rank": 2, "world_size": 2}, "rank"),
    ({"rank": -1, "world_size": 2}, "rank"),
    ({"world_size": 5000}, "world_size"),
    ({"rank": 1, "world_size": 2, "models": [{"id": "demo"}]}, "models"),
    ({"rank": 0, "world_size": 2, "replica_group": ""}, "replica_group"),
])
def test_a_registration_inconsistent_about_its_replica_is_refused_naming_the_field(fields, field):
    request = scheduler_pb2.RegisterRequest(**({"node_id": "n", "address": "h:1", "replica_group": "g"} | fields))
    with pytest.raises(InvalidRequest) as refused:
        check_registration(request)
    assert refused.value.field == field
