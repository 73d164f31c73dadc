"""The node registry: who is registered, their leases, load and state.

Plain data, no protobuf and no I/O, so it can be tested with fake nodes. The
scheduler can always rebuild it from re-registrations.
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


@dataclass
class Node:
    """One registered worker process."""

    node_id: str
    address: str
    models: tuple[ServedModel, ...]
    replica_group: str
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
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
        return any(m.model_id == model_id for m in self.models)


class Registry:
    """Registered nodes keyed by node id; eviction callbacks fire on loss."""

    def __init__(self, heartbeat_interval: float, max_missed: int, clock: Callable[[], float] = time.monotonic,
                 hang_timeout: float = 30.0) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.max_missed = max_missed
        self.hang_timeout = hang_timeout
        self.clock = clock
        self.nodes: dict[str, Node] = {}
        self.on_evict: list[Callable[[Node], None]] = []
        self.on_unhealthy: list[Callable[[Node], None]] = []  # fired when a node turns UNHEALTHY (it stays registered)
        self.version = 0  # bumped whenever membership changes
        self._serving: dict[str, tuple[int, list[Node]]] = {}

    def register(self, node: Node) -> Node:
        """Add (or replace, on re-registration) a node; it is routable at once."""
        old = self.nodes.get(node.node_id)
        if old is not None:
            self.evict(old.node_id)
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
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        self.version += 1
        node.state = NodeState.DEAD
        for callback in self.on_evict:
            callback(node)

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
        """Registered nodes serving the model, in any state; cached until membership changes."""
        cached = self._serving.get(model_id)
        if cached is None or cached[0] != self.version:
            cached = (self.version, [n for n in self.nodes.values() if n.serves(model_id)])
            self._serving[model_id] = cached
        return cached[1]

    def routable(self, model_id: str) -> list[Node]:
        """Ready nodes serving the model."""
        return [n for n in self.nodes.values() if n.state == NodeState.READY and n.serves(model_id)]

    def catalogue(self) -> dict[str, tuple[ServedModel, int]]:
        """Model id -> (its description, number of routable nodes)."""
        found: dict[str, tuple[ServedModel, int]] = {}
        for node in self.nodes.values():
            if node.state != NodeState.READY:
                continue
            for model in node.models:
                _, count = found.get(model.model_id, (model, 0))
                found[model.model_id] = (model, count + 1)
        return found
