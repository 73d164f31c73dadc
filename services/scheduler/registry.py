"""The node registry: who is registered, their leases, load and state, and which replicas are whole.

Plain data, no protobuf and no I/O, so it can be tested with fake nodes. The
scheduler can always rebuild it from re-registrations.

A replica is one process (world size 1) or an expert-parallel group of N
processes sharing a `replica_group`: rank 0 runs the engine and is the node
requests go to; ranks 1..N-1 are expert shards, which serve no model and are
never routed to. A replica is routable only while every rank of its group is
registered and ready (`is_routable`). Losing any shard counts as losing the
replica: `on_replica_lost` fires for its rank 0, whose requests then move on.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field


class NodeState(enum.StrEnum):
    JOINING = "joining"
    READY = "ready"
    DRAINING = "draining"
    SUSPECT = "suspect"
    UNHEALTHY = "unhealthy"  # heartbeats arrive, but the engine makes no progress while it has work
    DEAD = "dead"


@dataclass(frozen=True)
class ServedModel:
    """A model a node serves, as it reported it."""

    model_id: str
    revision: str
    kind: str  # "generation" or "embedding"
    architecture: str = ""
    max_context_tokens: int = 0
    max_output_tokens: int = 0
    max_batch_inputs: int = 0
    dimensions: int = 0


@dataclass
class Load:
    running_seqs: int = 0
    waiting_seqs: int = 0
    free_kv_blocks: int = 0
    steps_per_second: float = 0.0
    seconds_since_progress: float = 0.0
    draining: bool = False
    expert_load: tuple[int, ...] = ()  # tokens routed to each expert since the node's previous report


@dataclass
class Node:
    """One registered worker process (rank 0 of a replica, or one of its expert shards)."""

    node_id: str
    address: str
    models: tuple[ServedModel, ...]
    replica_group: str
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    placement: str = ""  # the replica's expert placement (canonical JSON) when world_size > 1
    held_experts: tuple[int, ...] = ()  # the experts this rank holds in the placement's default map
    max_num_seqs: int = 1
    num_kv_blocks: int = 0  # 0 = not reported
    block_size: int = 16
    lease_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: NodeState = NodeState.READY
    load: Load = field(default_factory=Load)
    last_heartbeat: float = field(default_factory=time.monotonic)
    in_flight: int = 0  # requests the scheduler routed here and has not seen finish
    routed_requests: int = 0  # requests routed here since registration

    def serves(self, model_id: str) -> bool:
        """Whether requests for `model_id` may go here: never to an expert shard, whatever it reported."""
        return self.rank == 0 and any(m.model_id == model_id for m in self.models)

    @property
    def generation_model(self) -> str:
        """The id of the generation model this node serves ("" if none)."""
        return next((m.model_id for m in self.models if m.kind == "generation"), "")


class Registry:
    """Registered nodes keyed by node id, the ranks of each replica group; callbacks fire on loss."""

    def __init__(self, heartbeat_interval: float, max_missed: int, clock: Callable[[], float] = time.monotonic,
                 hang_timeout: float = 30.0) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.max_missed = max_missed
        self.hang_timeout = hang_timeout
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self.on_evict: list[Callable[[Node], None]] = []
        self.on_unhealthy: list[Callable[[Node], None]] = []  # fired when a node turns UNHEALTHY (it stays registered)
        # Fired with a replica's rank 0 when one of its shards is lost (rank 0 stays registered, not routable).
        self.on_replica_lost: list[Callable[[Node, Node], None]] = []  # (rank 0, the lost shard)
        self.version = 0  # bumped whenever membership changes
        self._serving: dict[str, tuple[int, list[Node]]] = {}
        self.groups: dict[str, dict[int, str]] = {}  # expert-parallel replica group -> rank -> node id
        # Tokens per expert reported by each replica, summed since it registered: (model, group) -> [E].
        self.expert_tokens: dict[tuple[str, str], list[int]] = {}

    def register(self, node: Node) -> Node:
        """Add (or replace, on re-registration) a node; it is routable at once if its replica is whole.

        In an expert-parallel group (world size > 1), a newer process of the same group and rank replaces the
        old one (a restarted rank may register before the old one is evicted): the old one is evicted, as lost.
        """
        old = self.nodes.get(node.node_id)
        if old is not None:
            self.evict(old.node_id)
        if node.world_size > 1:
            holder = self.groups.get(node.replica_group, {}).get(node.rank)
            if holder is not None:
                self.evict(holder)
            self.groups.setdefault(node.replica_group, {})[node.rank] = node.node_id
        node.last_heartbeat = self.clock()
        self.nodes[node.node_id] = node
        self.version += 1
        return node

    def heartbeat(self, node_id: str, lease_id: str, load: Load) -> bool:
        """Record a heartbeat; False when the lease is unknown (re-register)."""
        node = self.nodes.get(node_id)
        if node is None or node.lease_id != lease_id:
            return False
        node.load = load
        node.last_heartbeat = self.clock()
        if load.expert_load and node.rank == 0:
            self._count_expert_tokens(node, load.expert_load)
        if load.draining:
            node.state = NodeState.DRAINING
        elif load.running_seqs and load.seconds_since_progress > self.hang_timeout:
            turned = node.state != NodeState.UNHEALTHY
            node.state = NodeState.UNHEALTHY  # a hung engine must not keep receiving traffic
            if turned:  # nor keep the requests it holds: they fail over
                for callback in self.on_unhealthy:
                    callback(node)
        else:
            node.state = NodeState.READY
        return True

    def deregister(self, node_id: str, lease_id: str) -> bool:
        node = self.nodes.get(node_id)
        if node is None or node.lease_id != lease_id:
            return False
        self.evict(node_id)
        return True

    def evict(self, node_id: str) -> None:
        """Remove a node as lost; a lost shard takes its replica out of routing and fires `on_replica_lost`."""
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        self.version += 1
        node.state = NodeState.DEAD
        ranks = self.groups.get(node.replica_group, {})
        if ranks.get(node.rank) == node_id:
            del ranks[node.rank]
            if not ranks:
                del self.groups[node.replica_group]
        if node.rank == 0:
            self.expert_tokens.pop((node.generation_model, node.replica_group), None)
        for callback in self.on_evict:
            callback(node)
        leader = self.leader_of(node)
        if node.rank > 0 and leader is not None:
            for callback in self.on_replica_lost:
                callback(leader, node)

    def leader_of(self, node: Node) -> Node | None:
        """Rank 0 of `node`'s replica group, if registered."""
        leader_id = self.groups.get(node.replica_group, {}).get(0)
        return self.nodes.get(leader_id) if leader_id is not None else None

    def ranks_of(self, leader: Node) -> list[Node]:
        """The registered ranks of `leader`'s group, rank 0 first."""
        ranks = self.groups.get(leader.replica_group, {})
        return [self.nodes[ranks[r]] for r in sorted(ranks)]

    def is_routable(self, node: Node) -> bool:
        """Whether requests may go to `node`: a ready rank 0 whose every rank 1..world_size-1 is registered, ready,
        and agrees on the world size and placement."""
        if node.rank != 0 or node.state != NodeState.READY:
            return False
        if node.world_size == 1:
            return True
        ranks = self.groups.get(node.replica_group, {})
        for rank in range(1, node.world_size):
            shard = self.nodes.get(ranks.get(rank, ""))
            if (shard is None or shard.state != NodeState.READY or shard.world_size != node.world_size
                    or shard.placement != node.placement):
                return False
        return len(ranks) == node.world_size  # no rank beyond the world size either

    def _count_expert_tokens(self, node: Node, expert_load: tuple[int, ...]) -> None:
        totals = self.expert_tokens.setdefault((node.generation_model, node.replica_group), [])
        if len(totals) < len(expert_load):
            totals.extend([0] * (len(expert_load) - len(totals)))
        for expert, tokens in enumerate(expert_load):
            totals[expert] += max(tokens, 0)  # counters only grow

    def expire(self) -> list[str]:
        """Mark late nodes suspect; evict those past max_missed intervals."""
        now = self.clock()
        evicted = []
        for node in list(self.nodes.values()):
            age = now - node.last_heartbeat
            if age > self.heartbeat_interval * self.max_missed:
                self.evict(node.node_id)
                evicted.append(node.node_id)
            elif age > self.heartbeat_interval * 1.5 and node.state == NodeState.READY:
                node.state = NodeState.SUSPECT
        return evicted

    def serving(self, model_id: str) -> list[Node]:
        """Registered replicas (rank 0) serving the model, in any state; cached until membership changes."""
        cached = self._serving.get(model_id)
        if cached is None or cached[0] != self.version:
            cached = (self.version, [n for n in self.nodes.values() if n.serves(model_id)])
            self._serving[model_id] = cached
        return cached[1]

    def routable(self, model_id: str) -> list[Node]:
        """Routable replicas (see `is_routable`) serving the model."""
        return [n for n in self.nodes.values() if n.serves(model_id) and self.is_routable(n)]

    def catalogue(self) -> dict[str, tuple[ServedModel, int]]:
        """Model id -> (its description, number of routable replicas)."""
        found: dict[str, tuple[ServedModel, int]] = {}
        for node in self.nodes.values():
            if not self.is_routable(node):
                continue
            for model in node.models:
                _, count = found.get(model.model_id, (model, 0))
                found[model.model_id] = (model, count + 1)
        return found
