"""The shared prefix-KV tier against a real redis-server: reuse across engines, integrity, and faults."""

from __future__ import annotations

import json
import struct
import time

import pytest
import redis
import torch

from moemesh.cache.kv_tier import LAYOUT_VERSION, BlockSpec, RedisKVTier, decode_entry, encode_entry, entry_mac
from moemesh.worker.engine.block_manager import DEFAULT_ROOT, prefix_hashes
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
    """A tier with a Redis timeout a loaded test host cannot trip (the fault tests pass their own short one)."""
    model, _ = parts
    shape = model.make_cache(1, BLOCK).block_shape
    return RedisKVTier(url, "tiny", "rev1", BlockSpec("float32", shape), **{"timeout": 5.0, **kwargs})


def written(tier: RedisKVTier) -> None:
    """Wait for the tier's background writes (its writer thread runs at nice 19: a loaded host may take a while)."""
    assert tier.flush(60), "the background writes did not finish"


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
    written(writer_tier)
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
    written(tier)
    assert tier.stats.stored == 0, "a prompt seen once costs no writes"
    _, cached = generate(engine, PROMPT, "twice")  # a local prefix hit: it recurs, so it is shared
    written(tier)
    assert cached == 40 and tier.stats.stored == 5
    generate(engine, PROMPT, "thrice")
    written(tier)
    assert tier.stats.stored == 5, "blocks written lately are not written again"
    ids, cached = generate(make_engine(parts, make_tier(parts, server.url), writes="reused"), PROMPT)
    assert cached == 40


def test_a_prompt_sharing_only_a_prefix_gets_only_that_prefix(parts, server):
    tier = make_tier(parts, server.url)
    generate(make_engine(parts, tier), PROMPT)
    written(tier)
    other = PROMPT[:20] + [499] * 25  # the first 2 blocks agree
    expected, _ = generate(make_engine(parts, None), other)
    ids, cached = generate(make_engine(parts, make_tier(parts, server.url)), other)
    assert cached == 16 and ids == expected


def test_corrupt_and_mismatched_entries_are_ignored_and_counted(parts, server):
    tier = make_tier(parts, server.url)
    expected, _ = generate(make_engine(parts, tier), PROMPT)
    written(tier)
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
    assert other_model.fetch(hashes[:1], [DEFAULT_ROOT], [PROMPT[:BLOCK]]) == [], "a shape mismatch is never used"
    assert other_model.stats.rejected == 1


def test_entry_codec_checks_every_field():
    spec = BlockSpec("float32", (1, 2, 2, 1, 1))
    payload = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    signed = {"secret": b"s" * 32, "key": "k"}
    entry = encode_entry(spec, [1, 2], b"p" * 16, payload, **signed)
    assert decode_entry(entry, spec, [1, 2], b"p" * 16, **signed) == payload
    assert decode_entry(entry, spec, [1, 3], b"p" * 16, **signed) is None  # other tokens
    assert decode_entry(entry, spec, [1, 2], b"q" * 16, **signed) is None  # other parent
    assert decode_entry(entry, BlockSpec("bfloat16", spec.shape), [1, 2], b"p" * 16, **signed) is None
    assert decode_entry(b"garbage", spec, [1, 2], b"p" * 16, **signed) is None
    assert decode_entry(entry[:-4], spec, [1, 2], b"p" * 16, **signed) is None  # truncated
    assert decode_entry(entry, spec, [1, 2], b"p" * 16, secret=b"t" * 32, key="k") is None  # another secret
    assert decode_entry(entry, spec, [1, 2], b"p" * 16, secret=b"s" * 32, key="k2") is None  # moved to another key


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
    short = tier.client  # Redis is back: its reconnect and writes may take longer than 0.1 s on a loaded host
    tier.client = redis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=5)
    engine.blocks.reset_prefix_cache()
    assert generate(engine, PROMPT, "back")[0] == expected
    written(tier)
    assert tier.stats.stored >= 5, "the tier refills once Redis is back"

    tier.client.close()
    tier.client = short
    server.pause()  # alive but silent: every call times out, the breaker opens
    cold = make_engine(parts, tier)
    started = time.monotonic()
    for i in range(4):
        cold.blocks.reset_prefix_cache()
        assert generate(cold, PROMPT, f"paused-{i}")[0] == expected
    assert time.monotonic() - started < 5, "a paused Redis must cost at most a few short timeouts"
    assert tier.breaker.opened_at is not None and tier.stats.bypassed >= 1
    server.resume()


# ---- tenants and integrity: scope salts, MACs, malformed entries ------------------------------------------

SECRET = b"mesh-secret-for-the-tier-tests!!"


def generate_in(engine: Engine, prompt: list[int], rid: str, scope: str) -> tuple[list[int], int]:
    """Greedy tokens and cached_tokens of one request of cache scope `scope`."""
    engine.add(GenerationRequest(rid, tuple(prompt), SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                                 cache_scope=scope))
    ids, cached = [], None
    while engine.has_work():
        for out in engine.step():
            ids += out.token_ids
            cached = out.cached_tokens if out.finish_reason else cached
    return ids, cached


def plant(client: redis.Redis, tier: RedisKVTier, scope_root: bytes, payload: bytes, secret: bytes) -> None:
    """Write well-formed entries (right header, right size) for every full block of PROMPT, signed with `secret`."""
    hashes = prefix_hashes(PROMPT, BLOCK, root=scope_root)
    parents = [scope_root, *hashes[:-1]]
    for i, (digest, parent) in enumerate(zip(hashes, parents)):
        key = tier.key(digest)
        client.set(key, encode_entry(tier.spec, PROMPT[i * BLOCK : (i + 1) * BLOCK], parent, payload,
                                     secret=secret, key=key))


def test_kv_tier_blocks_are_salted_by_the_requests_cache_scope(parts, server):
    writer = make_tier(parts, server.url, secret=SECRET)
    expected, _ = generate_in(make_engine(parts, writer), PROMPT, "a1", "tenant:alpha")
    written(writer)
    assert writer.stats.stored >= 5

    other = make_tier(parts, server.url, secret=SECRET)
    ids, cached = generate_in(make_engine(parts, other), PROMPT, "b1", "tenant:beta")
    assert cached == 0 and other.stats.hits == 0, "tenant beta must not reuse (nor learn of) alpha's prompt"
    assert ids == expected
    same = make_tier(parts, server.url, secret=SECRET)
    _, cached = generate_in(make_engine(parts, same), PROMPT, "a2", "tenant:alpha")
    assert cached == 40 and same.stats.hits == 5, "alpha's own prompt is shared between alpha's workers"


def test_a_planted_entry_without_the_mesh_mac_changes_no_output_and_is_a_counted_miss(parts, server):
    expected, _ = generate(make_engine(parts, None), PROMPT)
    reader = make_tier(parts, server.url, secret=SECRET)
    client = redis.Redis.from_url(server.url)
    # Keys and values the attacker chose for the prefix: large, so that, used, they would surely change the output
    # (all-zero ones can leave a tiny model's greedy tokens as they were).
    chosen = torch.randn(reader.spec.nbytes // 4, generator=torch.Generator().manual_seed(7)) * 30  # float32
    chosen_kv = chosen.numpy().tobytes()
    plant(client, reader, DEFAULT_ROOT, chosen_kv, secret=b"an attacker's guess at the secret")

    engine = make_engine(parts, reader)
    ids, cached = generate(engine, PROMPT, "victim")
    assert ids == expected, "a planted block must not change the output"
    assert cached == 0 and engine.counters.tier_hit_tokens == 0
    assert reader.stats.rejected == 1 and reader.stats.unverified == 1 and reader.stats.hits == 0

    # The same entries under the real secret would have been used: only the MAC kept them out. The victim's engine
    # writes the blocks it computed in the background (replacing the rejected entries); those writes land first, so
    # that they cannot overwrite the entries planted next.
    written(reader)
    assert reader.stats.stored == 5, "the victim rewrote the five blocks it computed"
    plant(client, reader, DEFAULT_ROOT, chosen_kv, secret=SECRET)
    trusting = make_tier(parts, server.url, secret=SECRET)
    poisoned, cached = generate(make_engine(parts, trusting), PROMPT, "poisoned")
    assert cached == 40 and trusting.stats.hits == 5 and poisoned != expected


def test_rejected_entries_are_replaced_by_the_next_write_of_their_blocks(parts, server):
    tier = make_tier(parts, server.url, secret=SECRET)
    plant(redis.Redis.from_url(server.url), tier, DEFAULT_ROOT, bytes(tier.spec.nbytes), secret=b"x" * 32)
    expected, cached = generate(make_engine(parts, tier), PROMPT)  # "all": its computed blocks are written
    written(tier)
    assert cached == 0 and tier.stats.stored >= 5
    fresh = make_tier(parts, server.url, secret=SECRET)
    ids, cached = generate(make_engine(parts, fresh), PROMPT)
    assert cached == 40 and ids == expected, "SET NX must not keep a planted entry forever"


def signed(tier: RedisKVTier, key: str, header: bytes, payload: bytes) -> bytes:
    """An entry with any header bytes, validly signed (as a buggy or older writer holding the secret might)."""
    body = struct.pack("<4sI", b"MMKV", len(header)) + header + payload
    return body + entry_mac(tier.secret, key, body)


def test_malformed_entries_are_counted_misses_never_exceptions(parts, server):
    tier = make_tier(parts, server.url, secret=SECRET)
    client = redis.Redis.from_url(server.url)
    (digest,) = prefix_hashes(PROMPT, BLOCK, limit=1)
    key, tokens, size = tier.key(digest), PROMPT[:BLOCK], tier.spec.nbytes
    good = {"v": LAYOUT_VERSION, "dtype": "float32", "shape": list(tier.spec.shape), "tokens": tokens,
            "parent": DEFAULT_ROOT.hex()}
    authentic = encode_entry(tier.spec, tokens, DEFAULT_ROOT, bytes(size), secret=SECRET, key=key)
    cases = {
        "garbage": b"garbage",
        "empty": b"",
        "truncated": authentic[:-5],
        "header a list": signed(tier, key, b"[1, 2, 3]", bytes(size)),
        "header a string": signed(tier, key, b'"MMKV"', bytes(size)),
        "header null": signed(tier, key, b"null", bytes(size)),
        "header not utf-8": signed(tier, key, b"\xff\xfe{", bytes(size)),
        "header nested deep": signed(tier, key, b"[" * 100_000 + b"]" * 100_000, bytes(size)),
        "header length past the end": struct.pack("<4sI", b"MMKV", 1 << 30) + authentic[8:],
        "shape an int": signed(tier, key, json.dumps({**good, "shape": 7}).encode(), bytes(size)),
        "tokens a dict": signed(tier, key, json.dumps({**good, "tokens": {"a": 1}}).encode(), bytes(size)),
        "wrong dtype": signed(tier, key, json.dumps({**good, "dtype": "bfloat16"}).encode(), bytes(size)),
        "payload short": signed(tier, key, json.dumps(good).encode(), bytes(size - 4)),
        "payload long": signed(tier, key, json.dumps(good).encode(), bytes(size + 4)),
    }
    for name, raw in cases.items():
        client.set(key, raw)
        before = tier.stats.rejected
        assert tier.fetch([digest], [DEFAULT_ROOT], [tokens]) == [], name
        assert tier.stats.rejected == before + 1, f"{name}: must count as a rejected entry (a miss)"
    client.set(key, signed(tier, key, json.dumps(good).encode(), bytes(size)))
    assert tier.fetch([digest], [DEFAULT_ROOT], [tokens]) == [bytes(size)], "the well-formed control is used"


def test_the_engine_keeps_serving_through_malformed_entries(parts, server):
    expected, _ = generate(make_engine(parts, None), PROMPT)
    tier = make_tier(parts, server.url, secret=SECRET)
    client = redis.Redis.from_url(server.url)
    (digest,) = prefix_hashes(PROMPT, BLOCK, limit=1)
    key = tier.key(digest)
    engine = make_engine(parts, tier, writes="reused")
    for i, raw in enumerate([signed(tier, key, b"[]", bytes(tier.spec.nbytes)), b"\x00" * 3, b"MMKV"]):
        client.set(key, raw)
        engine.blocks.reset_prefix_cache()  # so the tier is asked again
        ids, cached = generate(engine, PROMPT, f"r{i}")
        assert ids == expected and cached == 0
    assert tier.stats.rejected == 3


def test_ids_holding_colons_never_share_a_tier_key(parts, server):
    one = make_tier(parts, server.url, secret=SECRET)  # model "tiny", revision "rev1"
    spec = one.spec
    pairs = [("a:b", "c", "s"), ("a", "b:c", "s"), ("a", "b", "c:s"), ("a:b:c", "", "s"), ("a", "b%3Ac", "s")]
    prefixes = {RedisKVTier(server.url, m, r, spec, scope=s, secret=SECRET).prefix for m, r, s in pairs}
    assert len(prefixes) == len(pairs), "two (model, revision, scope) triples share a key space"
    assert one.prefix != make_tier(parts, server.url, secret=b"another-secret-0123456789").prefix, \
        "entries of another secret (an earlier run's) live in another key space"
