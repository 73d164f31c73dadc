"""Batched sampling: greedy, filters, and seeds independent of the batch."""

from __future__ import annotations

import torch

from moemesh.worker.sampling import SamplingBatch, SamplingParams, sample


def draw(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int]) -> list[int]:
    batch = SamplingBatch.build(params, seeds, positions, logits.device)
    return sample(logits, batch).tolist()


def random_logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_is_argmax():
    logits = random_logits(4)
    assert draw(logits, [SamplingParams(temperature=0.0)] * 4, [1, 2, 3, 4], [0] * 4) == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_even_when_hot():
    logits = random_logits(4)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4
    assert draw(logits, params, [5, 6, 7, 8], [3] * 4) == logits.argmax(-1).tolist()


def test_same_seed_same_token_whatever_else_is_in_the_batch():
    row = random_logits(1, seed=42)
    alone = draw(row, [SamplingParams(temperature=1.0)], [1234], [7])
    crowd = torch.cat([random_logits(5, seed=1), row, random_logits(3, seed=2)])
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 5 + [SamplingParams(temperature=1.0)] + \
        [SamplingParams(temperature=0.0)] * 3
    mixed = draw(crowd, params, [9, 8, 7, 6, 5, 1234, 1, 2, 3], [0, 1, 2, 3, 4, 7, 0, 0, 0])
    assert mixed[5] == alone[0], "a seeded row must not depend on its neighbours"


def test_different_positions_draw_different_noise():
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the noise alone
    tokens = {draw(logits, [SamplingParams(temperature=1.0)], [7], [p])[0] for p in range(20)}
    assert len(tokens) > 15, "each output position must get fresh randomness"


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    for position in range(3000):
        counts[draw(logits, [SamplingParams(temperature=1.0)], [99], [position])[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03), counts


def test_top_p_and_min_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = {draw(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [1], [p])[0] for p in range(300)}
    assert nucleus == {0, 1}
    floor = {draw(logits, [SamplingParams(temperature=1.0, min_p=0.5)], [1], [p])[0] for p in range(300)}
    assert floor == {0, 1}
