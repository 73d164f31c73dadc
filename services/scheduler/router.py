"""Replica choice for one request: prefix affinity, guarded by load, else power of two choices.

Requests whose prompts start alike should land where that prefix already
sits in a worker's prefix cache. Each prompt prefix has a preferred replica
by rendezvous hashing (stable as replicas come and go: only the prefixes of
a lost replica move). The preference holds only while that replica is not
much busier than the least loaded of two random others; past the guard the
request goes to the lighter one, so a popular prefix cannot pile its
traffic onto one node.
"""

from __future__ import annotations

import hashlib
import random

from moemesh.services.core.errors import Unavailable
from moemesh.services.scheduler.registry import Node

AFFINITY_PREFIX_BYTES = 256  # how much of a prompt decides its preferred replica


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
    if not candidates:
        raise Unavailable("no ready replica serves this model")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    lighter = a if pressure(a) <= pressure(b) else b
    if affinity_key is None:
        return lighter
    preferred = max(candidates, key=lambda node: _rendezvous(affinity_key, node.node_id))
    return preferred if pressure(preferred) <= pressure(lighter) + load_guard else lighter


def pressure(node: Node) -> float:
    """In-flight and waiting work per sequence slot."""
    return (node.in_flight + node.load.waiting_seqs) / max(node.max_num_seqs, 1)


def affinity_key(prompt_text: str, prompt_token_ids: list[int] | None = None) -> bytes | None:
    """The prefix that decides a prompt's preferred replica (None for an empty prompt)."""
    if prompt_token_ids:
        head = b"".join(int(t).to_bytes(4, "little") for t in prompt_token_ids[: AFFINITY_PREFIX_BYTES // 4])
        return b"t" + head
    if prompt_text:
        return b"s" + prompt_text.encode("utf-8", "surrogatepass")[:AFFINITY_PREFIX_BYTES]
    return None


def _rendezvous(key: bytes, node_id: str) -> bytes:
    return hashlib.blake2b(key + b"\0" + node_id.encode(), digest_size=8).digest()
