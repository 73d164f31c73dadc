"""When an open-loop benchmark sends its requests: Poisson arrivals at a given rate, seeded."""

from __future__ import annotations

import random
from collections.abc import Iterator


def poisson_arrivals(rate: float, seed: int) -> Iterator[float]:
    """Send times in seconds from the start of a level: the first at 0, then exponential gaps of mean 1/rate.

    Endless; the caller stops taking times when its request or time budget is spent.
    """
    rng = random.Random(f"{seed}/arrivals")
    at = 0.0
    while True:
        yield at
        at += rng.expovariate(rate)
