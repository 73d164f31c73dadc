"""Sampling and the paged KV cache on CUDA: the same draws as on the CPU, independent of the batch.

A seeded row's randomness is a hash of (seed, position, token id), computed
in integers, so a request draws the same tokens on a GPU replica as on a CPU
one given the same logits, and whatever else shares its batch. KV blocks
exported from a GPU cache are the same bytes as from a CPU one.

On a machine without CUDA these tests report as skipped (not applicable).
"""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.kv_cache import PagedKVCache
from moemesh.worker.engine.sampling import SamplingBatch, SamplingParams, sample_tokens

pytestmark = pytest.mark.gpu

VOCAB = 32000  # a production-sized vocabulary: the filters sort and the noise covers all of it


def random_logits(rows: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


MIXED_PARAMS = [
    SamplingParams(temperature=0.0, logprobs=2),
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=40, logprobs=3),
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=1.0, min_p=0.05),
    SamplingParams(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2, logprobs=1),
]


def draw(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], position: int):
    """One step's picks for every row, every row at `position` with a short history of its own."""
    prompts = [[i, i + 1, 7] for i in range(len(params))]
    outputs = [[7 + i] * (i % 3) for i in range(len(params))]
    batch = SamplingBatch.build(params, seeds, [position] * len(params), logits.device,
                                prompt_token_ids=prompts, output_token_ids=outputs)
    return sample_tokens(logits, batch, params)


def test_seeded_draws_on_the_gpu_equal_the_cpus():
    logits = random_logits(len(MIXED_PARAMS), seed=1)
    seeds = [11 * i + 3 for i in range(len(MIXED_PARAMS))]
    for position in range(20):
        on_cpu = draw(logits, MIXED_PARAMS, seeds, position)
        on_gpu = draw(logits.cuda(), MIXED_PARAMS, seeds, position)
        assert on_gpu.token_ids == on_cpu.token_ids, f"position {position}: CUDA drew other tokens than the CPU"
        for gpu_lp, cpu_lp in zip(on_gpu.logprobs, on_cpu.logprobs):
            if cpu_lp is None:
                assert gpu_lp is None
                continue
            assert gpu_lp.logprob == pytest.approx(cpu_lp.logprob, abs=1e-4)
            assert [t for t, _ in gpu_lp.top] == [t for t, _ in cpu_lp.top]


def test_a_seeded_row_on_the_gpu_does_not_depend_on_its_batch():
    row = random_logits(1, seed=42).cuda()
    params = SamplingParams(temperature=1.0, top_p=0.95)
    alone = [draw(row, [params], [1234], p).token_ids[0] for p in range(30)]
    crowd = torch.cat([random_logits(3, seed=5).cuda(), row, random_logits(2, seed=6).cuda()])
    neighbours = MIXED_PARAMS[:3] + [params] + MIXED_PARAMS[3:5]
    mixed = [draw(crowd, neighbours, [9, 8, 7, 1234, 5, 4], p).token_ids[3] for p in range(30)]
    assert mixed == alone, "a seeded row must not depend on its neighbours"
    assert len(set(alone)) > 10, "each position must draw fresh randomness"


def test_sampling_on_the_gpu_follows_the_distribution():
    # 6000 rows with one seed at positions 0..5999: the same noise as 6000 steps of one request.
    n = 6000
    logits = torch.log(torch.tensor([0.6, 0.25, 0.1, 0.05])).expand(n, 4).contiguous().cuda()
    params = [SamplingParams(temperature=1.0)] * n
    batch = SamplingBatch.build(params, [99] * n, list(range(n)), logits.device)
    tokens = torch.tensor(sample_tokens(logits, batch, params).token_ids)
    frequencies = torch.bincount(tokens, minlength=4) / n
    assert torch.allclose(frequencies, torch.tensor([0.6, 0.25, 0.1, 0.05]), atol=0.02), frequencies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_the_kv_cache_on_the_gpu_pages_and_exports_the_same_bytes_as_on_the_cpu(dtype):
    layers, blocks, block_size, heads, dim = 2, 9, 4, 2, 8
    caches = {device: PagedKVCache(layers, blocks, block_size, heads, dim, dtype, device) for device in ("cpu", "cuda")}
    g = torch.Generator().manual_seed(0)
    tables = [[7, 1, 4], [0, 8, 2]]
    for table, length in zip(tables, [11, 9]):
        k = torch.randn(length, heads, dim, generator=g).to(dtype)
        v = torch.randn(length, heads, dim, generator=g).to(dtype)
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(length)])
        order = torch.randperm(length, generator=g)
        for device, cache in caches.items():
            for layer in range(layers):
                cache.write(layer, slots[order].to(device), k[order].to(device), v[order].to(device))
    index = torch.tensor(tables)
    for layer in range(layers):
        gpu_keys, gpu_values = caches["cuda"].gather(layer, index.cuda())
        cpu_keys, cpu_values = caches["cpu"].gather(layer, index)
        assert torch.equal(gpu_keys.cpu(), cpu_keys) and torch.equal(gpu_values.cpu(), cpu_values)
    exported = caches["cuda"].read_blocks([7, 1, 0])
    assert exported == caches["cpu"].read_blocks([7, 1, 0]), "exported blocks must not depend on the device"
    fresh = PagedKVCache(layers, blocks, block_size, heads, dim, dtype, "cuda")
    fresh.write_blocks([3, 5, 6], exported)
    assert fresh.read_blocks([3, 5, 6]) == exported
    assert not fresh.k[0][0].any(), "blocks that were not written stay empty"
