"""Expert-parallel replicas: rank 0 plus expert shards over gRPC streams compute what the single process computes.

Shards are real gRPC servers on loopback: most run on a thread of this
process (fast to start), some as `python -m moemesh.worker.server.shard`
subprocesses (the stalled-shard test stops one with SIGSTOP).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moemesh.services.core import tensors
from moemesh.services.core.auth import ClusterAuthInterceptor, bearer_metadata
from moemesh.services.core.server import GrpcServer
from moemesh.v1 import experts_pb2, experts_pb2_grpc
from moemesh.worker.engine.engine import Engine
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk
from moemesh.worker.models.checkpoint import LoadRecord, iter_tensors, open_checkpoint
from moemesh.worker.models.layers import TopKRouter
from moemesh.worker.models.placement import ExpertPlacement
from moemesh.worker.models.qwen2_moe import Qwen2MoeSparseMoeBlock
from moemesh.worker.models.registry import build_expert_shard, build_model
from moemesh.worker.ops import remote
from moemesh.worker.ops.remote import (
    ExpertExchange,
    ExpertParallelConfig,
    ExpertShardFailed,
    ExpertShardTimeout,
    ShardLink,
    Watchdog,
)
from moemesh.worker.server.shard import (
    EXPERT_SHARD_ACCESS,
    EXPERT_SHARD_SERVICE,
    INLINE_ROWS,
    ExpertShardServicer,
    parse_placement,
)
from tests.support.checkpoints import FAMILIES
from tests.support.engine import random_prompt, request, run
from tests.support.mesh import Service

BLOCK_SIZE = 16
GREEDY_TOKENS = 64
EXPERT_NAME = re.compile(r"model\.layers\.(\d+)\..*experts\.(\d+)\.")  # a per-expert checkpoint tensor


# ---- shard servers ------------------------------------------------------------------------------------------------

class ThreadShard:
    """A shard's real gRPC server, on loopback, run by its own event loop on a thread of this process."""

    def __init__(self, ckpt, placement: ExpertPlacement, rank: int, token: str | None = None) -> None:
        self.record = LoadRecord()
        shard = build_expert_shard(ckpt, placement, rank, record=self.record)
        info = experts_pb2.ShardInfo(model_id=ckpt.model_id, revision=ckpt.revision, rank=rank,
                                     world_size=placement.world_size, placement=placement.to_json())
        self.servicer = ExpertShardServicer(shard, info)
        self.token = token
        started = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve(started)), daemon=True)
        self.thread.start()
        assert started.wait(30), "the shard server did not start"

    async def _serve(self, started: threading.Event) -> None:
        self.loop, self.stopped = asyncio.get_running_loop(), asyncio.Event()
        auth = ClusterAuthInterceptor(self.token, {EXPERT_SHARD_SERVICE: EXPERT_SHARD_ACCESS}, mutual_tls=False)
        server = GrpcServer("127.0.0.1", 0, grace=0.2, interceptors=[auth])
        server.add(experts_pb2_grpc.add_ExpertShardServicer_to_server, self.servicer, EXPERT_SHARD_SERVICE)
        await server.start()
        self.address = server.address
        started.set()
        await self.stopped.wait()
        await server.stop()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopped.set)
        self.thread.join(10)
        self.servicer.executor.shutdown(wait=False)


class Replica:
    """Rank 0 (a model whose MoE layers use the exchange) and its shards."""

    def __init__(self, ckpt, placement: ExpertPlacement, shards: list, timeout: float = 30.0) -> None:
        self.shards = shards
        addresses = tuple(s.address if isinstance(s, ThreadShard) else s.info["address"] for s in shards)
        config = ExpertParallelConfig(placement, addresses, exchange_timeout=timeout, connect_timeout=60)
        self.exchange = ExpertExchange.connect(config, ckpt.revision)
        self.record = LoadRecord()
        self.model = build_model(ckpt, expert_parallel=self.exchange, record=self.record)

    def close(self) -> None:
        self.exchange.close()
        for shard in self.shards:
            shard.stop()


def thread_replica(ckpt, placement: ExpertPlacement) -> Replica:
    return Replica(ckpt, placement, [ThreadShard(ckpt, placement, r) for r in range(1, placement.world_size)])


def process_shard(ckpt_dir: Path, rank: int, placement: ExpertPlacement, log: Path) -> Service:
    return Service("moemesh.worker.server.shard", "--model-dir", str(ckpt_dir), "--rank", str(rank),
                   "--world-size", str(placement.world_size), "--placement", placement.to_json(),
                   "--num-threads", "1", log=log)


# ---- model helpers ------------------------------------------------------------------------------------------------

def mixed_batch_logits(model) -> torch.Tensor:
    """Every row's logits of one forward mixing two prompts of different lengths: [N, V]."""
    chunks = [SequenceChunk(random_prompt(37, seed=1), 0, [0, 1, 2]), SequenceChunk(random_prompt(5, seed=2), 0, [3])]
    batch = ForwardBatch.build(chunks, BLOCK_SIZE, model.layer_windows, all_logits=True)
    return model(batch, model.make_cache(8, BLOCK_SIZE))


def greedy(model, tokenizer) -> dict[str, list[int]]:
    """64 greedy tokens for each of two prompts, run together by the engine."""
    engine = Engine(model, tokenizer, max_num_seqs=4, max_model_len=128)
    requests = [request(f"r{i}", random_prompt(length, seed=10 + i), max_tokens=GREEDY_TOKENS)
                for i, length in enumerate((11, 29))]
    return {rid: result["ids"] for rid, result in run(engine, requests).items()}


def expert_tensor_names(ckpt) -> dict[str, tuple[int, int] | None]:
    """Every checkpoint name -> (layer, expert) of a per-expert tensor, None for the others (read headers only)."""
    from safetensors import safe_open

    names = {}
    for file in ckpt.weight_files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                found = EXPERT_NAME.match(name)
                names[name] = (int(found[1]), int(found[2])) if found else None
    return names


def expected_reads(ckpt, placement: ExpertPlacement, rank: int) -> set[str]:
    """What `rank` must read: a shard its experts' tensors only; rank 0 everything but the other ranks' experts."""
    owners = placement.owners_of
    return {name for name, where in expert_tensor_names(ckpt).items()
            if (where is None and rank == 0) or (where is not None and owners(where[0])[where[1]] == rank)}


# ---- fixtures -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's tiny random checkpoint, built on first use."""
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = FAMILIES[family].build(tmp_path_factory.mktemp(f"ep-{family}"), seed=0)
        return built[family]

    return get


@pytest.fixture(scope="module")
def single_process(checkpoints):
    """Each family's single-process model, with its mixed-batch logits and greedy tokens (computed once)."""
    done = {}

    def get(family: str):
        if family not in done:
            ckpt_dir = checkpoints(family)
            model = build_model(open_checkpoint(ckpt_dir))
            done[family] = (model, mixed_batch_logits(model), greedy(model, Tokenizer.from_dir(ckpt_dir)))
        return done[family]

    return get


# (family, world size, placement text): contiguous maps, uneven ones, rank 0 holding none, a per-layer map.
CASES = [
    ("mixtral", 2, "contiguous"),
    ("mixtral", 4, "contiguous"),  # one expert per rank
    ("mixtral", 2, "1,0,1,1"),  # uneven: rank 0 holds one expert of four
    ("qwen2_moe", 2, "contiguous"),  # the shared expert stays on rank 0
    ("qwen2_moe", 4, "[1, 1, 2, 3]"),  # rank 0 holds no routed expert, only the shared one
    ("qwen3_moe", 4, "contiguous"),  # 8 experts, 2 per rank
    ("qwen3_moe", 2, '{"experts": [0, 0, 0, 0, 0, 0, 0, 1], "layers": {"1": [1, 1, 1, 1, 1, 1, 1, 1]}}'),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: f"{case[0]}-{case[1]}ranks-{case[2]}")
def replica(request, checkpoints, one_thread):
    family, world_size, text = request.param
    ckpt = open_checkpoint(checkpoints(family))
    placement = parse_placement(ckpt, text, world_size)
    built = thread_replica(ckpt, placement)
    built.family, built.ckpt, built.placement = family, ckpt, placement
    yield built
    built.close()


# ---- placement ----------------------------------------------------------------------------------------------------

def test_contiguous_placement_gives_each_rank_a_range_and_spreads_the_remainder():
    assert ExpertPlacement.contiguous(8, 3).owners == (0, 0, 0, 1, 1, 1, 2, 2)
    assert ExpertPlacement.contiguous(4, 4).owners == (0, 1, 2, 3)
    assert ExpertPlacement.parse("", 8, 2) == ExpertPlacement.parse("contiguous", 8, 2)


def test_placement_text_forms_parse_to_the_same_map_and_per_layer_maps_override():
    assert ExpertPlacement.parse("1,0,1,1", 4, 2).owners == ExpertPlacement.parse("[1, 0, 1, 1]", 4, 2).owners
    placement = ExpertPlacement.parse('{"experts": [0, 1, 1, 1], "layers": {"2": [1, 1, 1, 1]}}', 4, 2)
    assert placement.experts_of(0, 0) == (0,) and placement.experts_of(0, 2) == ()
    assert ExpertPlacement.parse(placement.to_json(), 4, 2) == placement


@pytest.mark.parametrize("text, world_size, message", [
    ("0,1,2,2", 2, "rank(s) [2] outside 0..1"),
    ("0,1,1", 2, "lists 3 ranks, the model has 4 experts"),
    ("0,0,0,1", 3, "rank(s) [2] would hold no expert"),
    ("zero", 2, "not a placement"),
    ('{"experts": [0, 1, 1, 1], "layers": {"x": [0]}}', 2, "layers must map layer numbers"),
])
def test_invalid_placements_are_refused_naming_the_setting(text, world_size, message):
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        ExpertPlacement.parse(text, 4, world_size)
    assert str(raised.value).startswith("ep_placement:")


# ---- parity -------------------------------------------------------------------------------------------------------

def test_replica_logits_match_the_single_process_model(replica, single_process):
    _, expected, _ = single_process(replica.family)
    logits = mixed_batch_logits(replica.model)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    stats = replica.exchange.stats
    assert stats.messages > 0 and stats.bytes_sent > 0 and stats.bytes_received > 0, "no exchange took place"


def test_replica_generates_the_same_64_greedy_tokens(replica, single_process):
    _, _, expected = single_process(replica.family)
    ours = greedy(replica.model, Tokenizer.from_dir(replica.ckpt.path))
    assert ours == expected, f"{replica.family} over {replica.placement.world_size} ranks diverged"
    assert all(len(ids) == GREEDY_TOKENS for ids in ours.values())


def test_each_rank_reads_only_its_own_tensors(replica):
    assert replica.record.names == expected_reads(replica.ckpt, replica.placement, 0)
    for shard in replica.shards:
        rank = shard.servicer.shard.rank
        assert shard.record.names == expected_reads(replica.ckpt, replica.placement, rank), f"rank {rank}"
        assert all(EXPERT_NAME.match(name) for name in shard.record.names), "a shard read a non-expert tensor"


def test_a_shard_with_no_token_in_a_layer_gets_no_message(checkpoints, single_process, one_thread):
    # Mixtral on 4 ranks holds one expert per rank; one decoded token picks 2 experts per layer, so in every
    # layer at least one shard has no token: it must get no message, and the sum must still be exact.
    ckpt = open_checkpoint(checkpoints("mixtral"))
    placement = parse_placement(ckpt, "contiguous", 4)
    reference, _, _ = single_process("mixtral")
    replica = thread_replica(ckpt, placement)
    try:
        chosen = []
        hooks = [m.register_forward_hook(lambda _m, _x, out: chosen.append(out[0].flatten().tolist()))
                 for m in reference.modules() if isinstance(m, TopKRouter)]
        chunk = [SequenceChunk([42], 0, [0])]
        logits = [m(ForwardBatch.build(chunk, BLOCK_SIZE, m.layer_windows), m.make_cache(2, BLOCK_SIZE))
                  for m in (reference, replica.model)]
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5)
        expected = {rank: sum(rank in {placement.owners[e] for e in experts} for experts in chosen)
                    for rank in (1, 2, 3)}
        sent = {rank: link.messages for rank, link in replica.exchange.links.items()}
        assert sent == expected, "each shard gets exactly one message per layer where it has a token"
        assert min(sent.values()) < len(chosen), "this routing should leave some shard without a token"
    finally:
        replica.close()


def test_a_share_over_the_part_size_goes_in_several_messages_and_the_sum_is_exact(
        checkpoints, single_process, one_thread, monkeypatch):
    # A step's share can exceed what one message may hold (a wide model's prefill chunk): it goes in parts, each
    # answered in turn on the same stream. Here every row is its own message.
    ckpt = open_checkpoint(checkpoints("mixtral"))
    placement = parse_placement(ckpt, "1,0,1,1", 2)  # rank 1 holds three experts of four: most rows go there
    _, expected, _ = single_process("mixtral")
    monkeypatch.setattr(remote, "MESSAGE_PART_BYTES", 1)
    replica = thread_replica(ckpt, placement)
    try:
        torch.testing.assert_close(mixed_batch_logits(replica.model), expected, rtol=0, atol=1e-5)
        stats = replica.exchange.stats
        assert stats.messages == stats.rows_sent > stats.exchanges, "one message per row"
        assert replica.exchange.links[1].messages == stats.messages
    finally:
        replica.close()


def test_rank_0_computes_the_shared_expert_while_the_shards_compute(checkpoints, single_process, one_thread):
    # Qwen2-MoE keeps its shared expert on rank 0: it must run after the layer's messages went out and before
    # their answers were read, and the logits must not change.
    ckpt = open_checkpoint(checkpoints("qwen2_moe"))
    replica = thread_replica(ckpt, parse_placement(ckpt, "contiguous", 2))
    _, expected_logits, _ = single_process("qwen2_moe")
    try:
        stats = replica.exchange.stats
        seen = []
        for block in (m for m in replica.model.modules() if isinstance(m, Qwen2MoeSparseMoeBlock)):
            def shared(hidden, original=block.run_shared_expert):
                seen.append((stats.messages, stats.exchanges))  # sent so far, exchanges whose answers were read
                return original(hidden)
            block.run_shared_expert = shared
        torch.testing.assert_close(mixed_batch_logits(replica.model), expected_logits, rtol=0, atol=1e-5)
        layers = sum(isinstance(m, Qwen2MoeSparseMoeBlock) for m in replica.model.modules())
        assert layers > 0 and stats.exchanges == layers, "every MoE layer sent its shard rows"
        assert seen == [(layer + 1, layer) for layer in range(layers)], \
            "each layer's shared expert ran after its message went out and before its answer was read"
    finally:
        replica.close()


# ---- shards as processes ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def process_replica(checkpoints, tmp_path_factory, one_thread):
    """Mixtral over 3 ranks, uneven (rank 0: 1 expert, rank 1: 1, rank 2: 2), shards as subprocesses."""
    ckpt_dir = checkpoints("mixtral")
    ckpt = open_checkpoint(ckpt_dir)
    placement = parse_placement(ckpt, "0,1,2,2", 3)
    logs = tmp_path_factory.mktemp("shard-logs")
    shards = [process_shard(ckpt_dir, rank, placement, logs / f"rank{rank}.log") for rank in (1, 2)]
    built = Replica(ckpt, placement, shards, timeout=2.0)
    built.ckpt, built.placement = ckpt, placement
    yield built
    for shard in shards:
        if shard.process.poll() is None:
            os.kill(shard.process.pid, signal.SIGCONT)
    built.close()


def test_process_shards_generate_the_single_process_tokens(process_replica, single_process):
    _, expected_logits, expected = single_process("mixtral")
    torch.testing.assert_close(mixed_batch_logits(process_replica.model), expected_logits, rtol=0, atol=1e-5)
    assert greedy(process_replica.model, Tokenizer.from_dir(process_replica.ckpt.path)) == expected
    stats = process_replica.exchange.stats
    assert stats.exchanges == len(stats.durations) == len(stats.overheads) == len(stats.shard_seconds) \
        == len(stats.peers) > 0
    shards = len(process_replica.exchange.links)
    assert all(1 <= peers <= shards for peers in stats.peers), "each exchange messages 1 to all of the shards"
    assert sum(stats.peers) <= stats.messages, "a shard messaged in an exchange gets at least one message"
    assert stats.shard_compute_seconds > 0, "the shards report their own work"
    assert all(0 <= extra <= whole for extra, whole in zip(stats.overheads, stats.durations)), \
        "what an exchange adds beyond its compute is part of it"
    assert all(0 < shard <= whole for shard, whole in zip(stats.shard_seconds, stats.durations)), \
        "a shard's compute in an exchange is part of it"
    assert sum(stats.shard_seconds) <= stats.shard_compute_seconds + 1e-9, "the slowest shard of each exchange"


def test_process_shards_report_loading_only_their_experts(process_replica):
    for rank, shard in enumerate(process_replica.shards, start=1):
        with grpc.insecure_channel(shard.info["address"]) as channel:
            info = experts_pb2_grpc.ExpertShardStub(channel).Describe(experts_pb2.DescribeShardRequest(), timeout=10)
        assert set(info.loaded_tensors) == expected_reads(process_replica.ckpt, process_replica.placement, rank)
        assert info.rank == rank and info.revision == process_replica.ckpt.revision


def test_a_stalled_shard_makes_the_exchange_fail_within_its_timeout(process_replica):
    # Runs last among the process tests: a failed exchange breaks the replica for good.
    stalled = process_replica.shards[1]
    os.kill(stalled.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(ExpertShardTimeout, match="rank 2 .* did not answer layer 0 within 2 s"):
            mixed_batch_logits(process_replica.model)
        elapsed = time.monotonic() - started
    finally:
        os.kill(stalled.process.pid, signal.SIGCONT)
    assert 2.0 <= elapsed < 5.0, f"the exchange gave up after {elapsed:.1f} s, its timeout is 2 s"
    with pytest.raises(ExpertShardFailed, match="broken"):  # and the replica stays failed: nothing hangs
        mixed_batch_logits(process_replica.model)


# ---- the shard's edge ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded_shard(checkpoints):
    """Rank 1 of a 2-rank Mixtral replica that requires a cluster token."""
    ckpt = open_checkpoint(checkpoints("mixtral"))
    shard = ThreadShard(ckpt, parse_placement(ckpt, "contiguous", 2), 1, token="cluster-secret")
    yield shard
    shard.stop()


def exchange_once(address: str, work: experts_pb2.LayerWork, metadata=()) -> experts_pb2.LayerResult:
    with grpc.insecure_channel(address) as channel:
        return next(experts_pb2_grpc.ExpertShardStub(channel).Exchange(iter([work]), metadata=metadata, timeout=10))


def layer_work(expert_ids: list[list[int]]) -> experts_pb2.LayerWork:
    ids = torch.tensor(expert_ids, dtype=torch.int32)
    return experts_pb2.LayerWork(step=1, layer=0, sequence=1, hidden=tensors.to_pb(torch.randn(ids.shape[0], 64)),
                                 expert_ids=tensors.to_pb(ids), weights=tensors.to_pb(torch.full(ids.shape, 0.5)))


def test_a_shard_refuses_work_for_experts_it_does_not_hold(guarded_shard):
    with pytest.raises(grpc.RpcError) as raised:
        exchange_once(guarded_shard.address, layer_work([[2, 0]]), bearer_metadata("cluster-secret"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expert_ids" in raised.value.details() and "[0]" in raised.value.details()
    answer = exchange_once(guarded_shard.address, layer_work([[2, 3], [3, -1]]), bearer_metadata("cluster-secret"))
    assert list(answer.partial.shape) == [2, 64] and answer.sequence == 1


def test_small_and_large_messages_on_one_stream_are_answered_in_order_and_agree(guarded_shard):
    # Small messages are answered on the shard's event loop, larger ones on its compute thread: one stream
    # mixing both gets its answers in order, and a row gets the same partial sum either way.
    rows = INLINE_ROWS + 36
    ids = torch.tensor([[2, 3], [3, -1]] * (rows // 2), dtype=torch.int32)
    hidden = torch.randn(rows, 64)
    large = experts_pb2.LayerWork(step=1, layer=0, sequence=1, hidden=tensors.to_pb(hidden),
                                  expert_ids=tensors.to_pb(ids), weights=tensors.to_pb(torch.full(ids.shape, 0.5)))
    small = [experts_pb2.LayerWork(step=1, layer=0, sequence=2 + i, hidden=tensors.to_pb(hidden[i : i + 1]),
                                   expert_ids=tensors.to_pb(ids[i : i + 1]),
                                   weights=tensors.to_pb(torch.full((1, 2), 0.5))) for i in range(2)]
    with grpc.insecure_channel(guarded_shard.address) as channel:
        answers = list(experts_pb2_grpc.ExpertShardStub(channel).Exchange(
            iter([large, *small]), metadata=bearer_metadata("cluster-secret"), timeout=30))
    assert [a.sequence for a in answers] == [1, 2, 3]
    whole = tensors.from_pb(answers[0].partial)
    assert list(whole.shape) == [rows, 64]
    for i, answer in enumerate(answers[1:]):
        torch.testing.assert_close(tensors.from_pb(answer.partial)[0], whole[i], rtol=0, atol=1e-6)


@pytest.mark.parametrize("expert_ids, field, message", [
    ([[-1, 2]], "expert_ids", "valid ones before any -1"),
    ([[2, -1], [-1, -1]], "expert_ids", "at least one expert"),
    ([[2, 9]], "expert_ids", "does not hold experts [9]"),
    ([[2, -7]], "expert_ids", "-1 marks padding"),
])
def test_a_shard_refuses_malformed_choices_naming_the_field(guarded_shard, expert_ids, field, message):
    with pytest.raises(grpc.RpcError) as raised:
        exchange_once(guarded_shard.address, layer_work(expert_ids), bearer_metadata("cluster-secret"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details() and message in raised.value.details()
    answer = exchange_once(guarded_shard.address, layer_work([[3, 2]]), bearer_metadata("cluster-secret"))
    assert list(answer.partial.shape) == [1, 64], "the shard keeps serving after refusing"


def test_a_shard_refuses_work_without_choices(guarded_shard):
    work = layer_work([[2]])
    work.expert_ids.CopyFrom(tensors.to_pb(torch.empty(1, 0, dtype=torch.int32)))
    work.weights.CopyFrom(tensors.to_pb(torch.empty(1, 0)))
    with pytest.raises(grpc.RpcError) as raised:
        exchange_once(guarded_shard.address, work, bearer_metadata("cluster-secret"))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "k' >= 1" in raised.value.details()


def test_a_shard_refuses_ids_and_weights_of_the_wrong_kind_or_size_and_takes_int64_ids(guarded_shard):
    metadata = bearer_metadata("cluster-secret")
    float_ids = layer_work([[2, 3]])
    float_ids.expert_ids.CopyFrom(tensors.to_pb(torch.tensor([[2.0, 3.0]])))
    integer_weights = layer_work([[2, 3]])
    integer_weights.weights.CopyFrom(tensors.to_pb(torch.tensor([[1, 1]], dtype=torch.int32)))
    short_ids = layer_work([[2, 3]])
    short_ids.expert_ids.data = short_ids.expert_ids.data[:-2]
    unknown_dtype = layer_work([[2, 3]])
    unknown_dtype.weights.dtype = "complex64"
    for work, field, message in [(float_ids, "expert_ids", "expected integer"), (integer_weights, "weights", "float"),
                                 (short_ids, "expert_ids", "bytes"), (unknown_dtype, "weights", "dtype")]:
        with pytest.raises(grpc.RpcError) as raised:
            exchange_once(guarded_shard.address, work, metadata)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert field in raised.value.details() and message in raised.value.details()
    wide = layer_work([[2, 3], [3, -1]])
    wide.expert_ids.CopyFrom(tensors.to_pb(torch.tensor([[2, 3], [3, -1]], dtype=torch.int64)))
    narrow = layer_work([[2, 3], [3, -1]])
    narrow.hidden.CopyFrom(wide.hidden)
    answers = [tensors.from_pb(exchange_once(guarded_shard.address, w, metadata).partial) for w in (wide, narrow)]
    torch.testing.assert_close(answers[0], answers[1], rtol=0, atol=0)  # int64 ids go through numpy, as well


def test_a_shard_refuses_callers_without_the_cluster_token(guarded_shard):
    with pytest.raises(grpc.RpcError) as raised:
        exchange_once(guarded_shard.address, layer_work([[2, 3]]))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_rank_0_refuses_a_shard_started_with_another_placement(checkpoints, guarded_shard):
    ckpt = open_checkpoint(checkpoints("mixtral"))
    other = ExpertPlacement.parse("0,0,0,1", 4, 2)
    config = ExpertParallelConfig(other, (guarded_shard.address,), connect_timeout=10, cluster_token="cluster-secret")
    with pytest.raises(ValueError, match="has placement"):
        ExpertExchange.connect(config, ckpt.revision)


# ---- fused expert stacks ------------------------------------------------------------------------------------------

def test_a_shard_reads_only_its_rows_of_a_fused_expert_stack(checkpoints, single_process, tmp_path, one_thread):
    # transformers 5 state dicts hold each layer's experts as one stack (mlp.experts.gate_up_proj [E, 2I, H]);
    # a shard slices its experts' rows out of the file and never reads the others'.
    source = open_checkpoint(checkpoints("qwen3_moe"))
    fused_dir = tmp_path / "fused"
    fused_dir.mkdir()
    (fused_dir / "config.json").write_bytes((source.path / "config.json").read_bytes())
    save_file(fused_state(dict(iter_tensors(source))), fused_dir / "model.safetensors")
    ckpt = open_checkpoint(fused_dir)
    placement = parse_placement(ckpt, "[0, 0, 1, 1, 1, 1, 2, 2]", 3)
    record = LoadRecord()
    build_expert_shard(ckpt, placement, 1, record=record)
    stacks = {name: t for name, t in iter_tensors(ckpt) if name.endswith(("gate_up_proj", "down_proj"))
              and ".experts." in name}
    assert record.names == set(stacks)
    assert record.bytes_read == sum(t.numel() * t.element_size() for t in stacks.values()) // 2  # 4 experts of 8
    replica = thread_replica(ckpt, placement)
    try:
        _, expected, _ = single_process("qwen3_moe")
        torch.testing.assert_close(mixed_batch_logits(replica.model), expected, rtol=0, atol=1e-5)
    finally:
        replica.close()


def fused_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen MoE state dict with each layer's per-expert matrices stacked under transformers 5's names."""
    fused, experts = {}, {}
    for name, tensor in state.items():
        found = re.fullmatch(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)_proj\.weight", name)
        if found:
            experts.setdefault(found[1], {})[(int(found[2]), found[3])] = tensor
        else:
            fused[name] = tensor
    for prefix, parts in experts.items():
        count = 1 + max(e for e, _ in parts)
        fused[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]])
                                                       for e in range(count)])
        fused[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(count)])
    return fused


# ---- rank 0's edge: what a shard answers --------------------------------------------------------------------------

@pytest.mark.parametrize("answer, message", [
    (b"\xff\xff\xff\xff", "not a LayerResult"),
    (experts_pb2.LayerResult(step=1, layer=0, sequence=7).SerializeToString(), r"answered message 7 \(layer 0\)"),
    (experts_pb2.LayerResult(step=1, layer=3, sequence=1).SerializeToString(), r"answered message 1 \(layer 3\)"),
])
def test_rank_0_fails_the_exchange_on_an_answer_that_is_not_the_one_it_waits_for(answer, message):
    """A peer on the shard's address answering bytes that do not parse, or another message's answer: the link
    raises ExpertShardFailed naming the shard (the replica then fails over), rather than adding wrong sums."""
    from concurrent import futures

    def exchange(requests, context):
        for _ in requests:
            yield answer

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.stream_stream_rpc_method_handler(exchange)  # raw bytes both ways
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(EXPERT_SHARD_SERVICE,
                                                                          {"Exchange": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    watchdog = Watchdog()
    link = ShardLink(1, f"127.0.0.1:{port}", grpc.insecure_channel(f"127.0.0.1:{port}"), (), watchdog)
    try:
        sequence, size = link.send(1, 0, torch.randn(2, 64), np.array([[1, -1], [0, 1]], dtype=np.int32),
                                   np.array([[1.0, 0.0], [0.5, 0.5]], dtype=np.float32))
        assert sequence == 1 and size > 2 * 64 * 4
        with pytest.raises(ExpertShardFailed, match=f"expert shard rank 1 at 127.0.0.1:{port}.*{message}"):
            link.receive(sequence, 0, time.monotonic() + 10, 10)
    finally:
        link.close()
        watchdog.stop()
        server.stop(None)


def test_rank_0_adds_a_shards_partial_sums_into_its_rows_and_refuses_the_wrong_shape():
    """An answer's sums go into the token rows the message carried: all of them in one add, or a subset (the
    host path of a float32 rank 0, numpy over the message's bytes), or through torch for another dtype; a
    partial of another shape or of integers is a ValueError naming it (the exchange then fails), nothing added."""
    torch.manual_seed(0)
    base = torch.randn(5, 8)
    sums = torch.randn(5, 8)

    def message(values: torch.Tensor) -> experts_pb2.LayerResult:
        result = experts_pb2.LayerResult()
        tensors.fill_pb(result.partial, values)
        return result

    out = base.clone()
    remote.add_partial(out, out.numpy(), torch.arange(5), None, message(sums).partial)
    torch.testing.assert_close(out, base + sums, rtol=0, atol=0)

    rows = np.array([0, 3, 4])
    out = base.clone()
    remote.add_partial(out, out.numpy(), torch.from_numpy(rows), rows, message(sums[:3]).partial)
    expected = base.clone()
    expected[rows] += sums[:3]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    half = base.to(torch.bfloat16)
    out = half.clone()
    remote.add_partial(out, None, torch.from_numpy(rows), rows, message(sums[:3].to(torch.bfloat16)).partial)
    expected = half.clone()
    expected.index_add_(0, torch.from_numpy(rows), sums[:3].to(torch.bfloat16))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    for wrong, host in ((sums[:2], True), (sums[:3, :4], True), (sums[:3, :4], False),
                        (torch.ones(3, 8, dtype=torch.int32), False)):
        out = base.clone()
        with pytest.raises(ValueError, match="partial sums of .*expected .*\\[3, 8\\]"):
            remote.add_partial(out, out.numpy() if host else None, torch.from_numpy(rows), rows,
                               message(wrong).partial)
        torch.testing.assert_close(out, base, rtol=0, atol=0)
