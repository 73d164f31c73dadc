"""Replica choice for one request: prefix affinity, guarded by load, else power of two choices.

Requests whose prompts start alike should land where that prefix already
sits in a worker's prefix cache. Each prompt prefix has a preferred replica
on a consistent-hash ring (stable as replicas come and go: only the
prefixes of a lost replica move). The preference holds only while that
replica is not much busier than the lighter of two random others; past the
guard the request goes to the lighter one, so a popular prefix cannot pile
its traffic onto one node.

The cost does not grow with the fleet: the ring is built once per change of
membership, the two random choices are drawn by sampling, and the ring walk
stops at the first replica with room.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence

from moemesh.services.core.errors import Unavailable
from moemesh.services.scheduler.registry import Node

AFFINITY_PREFIX_BYTES = 256  # how much of a prompt decides its preferred replica
POINTS_PER_NODE = 16  # ring points per node: enough to spread keys evenly
SAMPLE_TRIES = 16  # random draws for the two choices before falling back to a scan
MAX_RING_WALK = 8  # replicas tried along the ring for a prefix before load alone decides


def pick_node(
    candidates: list[Node],
    rng: random.Random,
    affinity_key: bytes | None = None,
    load_guard: float = 0.5,
) -> Node:
    """The replica for a request among `candidates` (all able to take it).

    `load_guard`: how much more pressure (in-flight work per sequence slot)
    the preferred replica may carry than the power-of-two pick and still win.
    """
    node = choose(HashRing(candidates), candidates, lambda _: True, rng, affinity_key, load_guard)
    if node is None:
        raise Unavailable("no ready replica serves this model")
    return node


def choose(
    ring: HashRing,
    nodes: Sequence[Node],
    available: Callable[[Node], bool],
    rng: random.Random,
    affinity_key: bytes | None,
    load_guard: float,
) -> Node | None:
    """Pick among the `available` ones of `nodes` (which `ring` covers); None when none is available."""
    lighter = _power_of_two(nodes, available, rng)
    if lighter is None or affinity_key is None:
        return lighter
    for tried, node in enumerate(ring.walk(affinity_key)):
        if tried >= MAX_RING_WALK:
            return lighter  # the prefix's replicas are all full: load decides
        if available(node):
            return node if pressure(node) <= pressure(lighter) + load_guard else lighter
    return lighter


def _power_of_two(nodes: Sequence[Node], available: Callable[[Node], bool], rng: random.Random) -> Node | None:
    """The lighter of two random available nodes; sampled, with a full scan only when few are available."""
    found: list[Node] = []
    if len(nodes) > SAMPLE_TRIES:
        seen: set[int] = set()
        for _ in range(SAMPLE_TRIES):
            index = rng.randrange(len(nodes))
            if index not in seen and available(nodes[index]):
                seen.add(index)
                found.append(nodes[index])
                if len(found) == 2:
                    break
    if len(found) < 2:
        found = [node for node in nodes if available(node)]
        if len(found) > 2:
            found = rng.sample(found, 2)
    if not found:
        return None
    return min(found, key=pressure)


class HashRing:
    """Nodes placed at `POINTS_PER_NODE` hashed points; a key belongs to the next point clockwise."""

    def __init__(self, nodes: Sequence[Node]) -> None:
        points = sorted((_hash(f"{node.node_id}#{i}".encode()), node.node_id, node)
                        for node in nodes for i in range(POINTS_PER_NODE))
        self._hashes = [h for h, _, _ in points]
        self._nodes = [node for _, _, node in points]
        self.size = len(nodes)

    def walk(self, key: bytes) -> Iterator[Node]:
        """Distinct nodes clockwise from `key`'s position."""
        if not self._nodes:
            return
        start = bisect.bisect(self._hashes, _hash(key))
        seen: set[str] = set()
        for offset in range(len(self._nodes)):
            node = self._nodes[(start + offset) % len(self._nodes)]
            if node.node_id not in seen:
                seen.add(node.node_id)
                yield node
                if len(seen) == self.size:
                    return


def pressure(node: Node) -> float:
    """In-flight and waiting work per sequence slot."""
    return (node.in_flight + node.load.waiting_seqs) / max(node.max_num_seqs, 1)


def affinity_key(prompt_text: str, prompt_token_ids: list[int] | None = None) -> bytes | None:
    """The prefix that decides a prompt's preferred replica (None for an empty prompt)."""
    if prompt_token_ids:
        # Signed: ids are int32 on the wire, and a negative one (refused by the worker) must not break routing.
        head = b"".join(int(t).to_bytes(4, "little", signed=True)
                        for t in prompt_token_ids[: AFFINITY_PREFIX_BYTES // 4])
        return b"t" + head
    if prompt_text:
        return b"s" + prompt_text.encode("utf-8", "surrogatepass")[:AFFINITY_PREFIX_BYTES]
    return None


def _hash(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")
