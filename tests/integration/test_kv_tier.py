"""The shared prefix-KV tier against a real redis-server: reuse across engines, integrity, and faults."""

from __future__ import annotations

import time

import pytest
import redis
import torch

from moemesh.cache.kv_tier import BlockSpec, RedisKVTier, decode_entry, encode_entry
from moemesh.worker.engine.block_manager import ROOT_HASH, prefix_hashes
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.support.checkpoints import build_tiny_mixtral
from tests.support.redis_server import RedisServer

BLOCK = 8


@pytest.fixture
def server():
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    ckpt = build_tiny_mixtral(tmp_path_factory.mktemp("tier"), seed=3)
    return build_model(open_checkpoint(ckpt)), Tokenizer.from_dir(ckpt)


def make_engine(parts, tier: RedisKVTier | None, writes: str = "all") -> Engine:
    model, tokenizer = parts
    return Engine(model, tokenizer, max_num_seqs=4, max_model_len=256, block_size=BLOCK, kv_tier=tier,
                  kv_tier_writes=writes)


def make_tier(parts, url: str, **kwargs) -> RedisKVTier:
    model, _ = parts
    shape = model.make_cache(1, BLOCK).block_shape
    return RedisKVTier(url, "tiny", "rev1", BlockSpec("float32", shape), **kwargs)


def generate(engine: Engine, prompt: list[int], rid: str = "r") -> tuple[list[int], int]:
    """Greedy tokens and cached_tokens of one request run to completion."""
    engine.add(GenerationRequest(rid, tuple(prompt), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    ids, cached = [], None
    while engine.has_work():
        for out in engine.step():
            ids += out.token_ids
            if out.finish_reason:
                cached = out.cached_tokens
    return ids, cached


PROMPT = list(range(5, 5 + 45))  # 5 full blocks of 8, then 5 tokens


def test_a_cold_engine_reuses_blocks_another_engine_wrote(parts, server):
    writer_tier = make_tier(parts, server.url)
    expected, cached = generate(make_engine(parts, writer_tier), PROMPT)
    assert cached == 0
    writer_tier.flush()
    assert writer_tier.stats.stored >= 5

    reader_tier = make_tier(parts, server.url)
    cold = make_engine(parts, reader_tier)  # its own, empty local cache
    ids, cached = generate(cold, PROMPT)
    assert cached == 40, "all 5 full prompt blocks must come from Redis"
    assert cold.counters.tier_hit_tokens == 40 and reader_tier.stats.hits == 5
    assert ids == expected, "output with KV from the tier must equal the computed one"
    assert cold.counters.prompt_tokens_computed == len(PROMPT) - 40


def test_reused_policy_writes_a_prefix_once_it_recurs(parts, server):
    tier = make_tier(parts, server.url)
    engine = make_engine(parts, tier, writes="reused")
    generate(engine, PROMPT, "once")
    tier.flush()
    assert tier.stats.stored == 0, "a prompt seen once costs no writes"
    _, cached = generate(engine, PROMPT, "twice")  # a local prefix hit: it recurs, so it is shared
    tier.flush()
    assert cached == 40 and tier.stats.stored == 5
    generate(engine, PROMPT, "thrice")
    tier.flush()
    assert tier.stats.stored == 5, "blocks written lately are not written again"
    ids, cached = generate(make_engine(parts, make_tier(parts, server.url), writes="reused"), PROMPT)
    assert cached == 40


def test_a_prompt_sharing_only_a_prefix_gets_only_that_prefix(parts, server):
    tier = make_tier(parts, server.url)
    generate(make_engine(parts, tier), PROMPT)
    tier.flush()
    other = PROMPT[:20] + [499] * 25  # the first 2 blocks agree
    expected, _ = generate(make_engine(parts, None), other)
    ids, cached = generate(make_engine(parts, make_tier(parts, server.url)), other)
    assert cached == 16 and ids == expected


def test_corrupt_and_mismatched_entries_are_ignored_and_counted(parts, server):
    tier = make_tier(parts, server.url)
    expected, _ = generate(make_engine(parts, tier), PROMPT)
    tier.flush()
    hashes = prefix_hashes(PROMPT, BLOCK)
    client = redis.Redis.from_url(server.url)
    raw = bytearray(client.get(tier.key(hashes[1])))
    raw[-1] ^= 0xFF  # a flipped bit in the payload: the checksum catches it
    client.set(tier.key(hashes[1]), bytes(raw))
    reader = make_tier(parts, server.url)
    ids, cached = generate(make_engine(parts, reader), PROMPT)
    assert cached == 8 and reader.stats.rejected == 1, "only the block before the corrupt one may be used"
    assert ids == expected

    other_model = RedisKVTier(server.url, "tiny", "rev1", BlockSpec("float32", (1, 2, BLOCK, 1, 1)))
    assert other_model.fetch(hashes[:1], [ROOT_HASH], [PROMPT[:BLOCK]]) == [], "a shape mismatch is never used"
    assert other_model.stats.rejected == 1


def test_entry_codec_checks_every_field():
    spec = BlockSpec("float32", (1, 2, 2, 1, 1))
    payload = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    entry = encode_entry(spec, [1, 2], b"p" * 16, payload)
    assert decode_entry(entry, spec, [1, 2], b"p" * 16) == payload
    assert decode_entry(entry, spec, [1, 3], b"p" * 16) is None  # other tokens
    assert decode_entry(entry, spec, [1, 2], b"q" * 16) is None  # other parent
    assert decode_entry(entry, BlockSpec("bfloat16", spec.shape), [1, 2], b"p" * 16) is None
    assert decode_entry(b"garbage", spec, [1, 2], b"p" * 16) is None
    assert decode_entry(entry[:-4], spec, [1, 2], b"p" * 16) is None  # truncated


def test_redis_stopped_paused_and_restarted_never_fails_a_request(parts, server):
    expected, _ = generate(make_engine(parts, None), PROMPT)
    tier = make_tier(parts, server.url, timeout=0.1)
    engine = make_engine(parts, tier)

    server.stop()  # down: served by computing
    started = time.monotonic()
    assert generate(engine, PROMPT, "down")[0] == expected
    assert tier.stats.errors >= 1
    assert time.monotonic() - started < 5

    server.start()
    tier.breaker.opened_at = None  # skip the cooldown rather than sleeping through it
    tier.breaker.failures = 0
    engine.blocks.reset_prefix_cache()
    assert generate(engine, PROMPT, "back")[0] == expected
    tier.flush()
    assert tier.stats.stored >= 5, "the tier refills once Redis is back"

    server.pause()  # alive but silent: every call times out, the breaker opens
    cold = make_engine(parts, tier)
    started = time.monotonic()
    for i in range(4):
        cold.blocks.reset_prefix_cache()
        assert generate(cold, PROMPT, f"paused-{i}")[0] == expected
    assert time.monotonic() - started < 5, "a paused Redis must cost at most a few short timeouts"
    assert tier.breaker.opened_at is not None and tier.stats.bypassed >= 1
    server.resume()
