"""Replica choice for one request."""

from __future__ import annotations

import random

from moemesh.services.core.errors import Unavailable
from moemesh.services.scheduler.registry import Node


def pick_node(candidates: list[Node], rng: random.Random) -> Node:
    """Least in-flight work relative to capacity, by power of two random choices."""
    if not candidates:
        raise Unavailable("no ready replica serves this model")
    if len(candidates) == 1:
        return candidates[0]
    a, b = rng.sample(candidates, 2)
    return a if _pressure(a) <= _pressure(b) else b


def _pressure(node: Node) -> float:
    return (node.in_flight + node.load.waiting_seqs) / max(node.max_num_seqs, 1)
