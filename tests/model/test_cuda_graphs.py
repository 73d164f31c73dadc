"""CUDA graphs of decode steps: the bucketing and the padded static batch (here, eagerly), and the replay (on a GPU).

The capture itself needs a GPU; what a graph replays does not: the static
batch it is recorded over, filled for a step and padded to its bucket, must
give each sequence the logits the step's own batch gives. On CPU machines
that is checked by running the static batch eagerly; the `gpu` tests in
test_cuda_engine.py check that replayed steps give the eager engine's tokens.
"""

from __future__ import annotations

import torch

from moemesh.worker.engine.cuda_graphs import DecodeGraphs, graph_buckets, is_decode_step
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk

BLOCK = 4


def test_buckets_are_small_powers_of_two_then_every_eight_up_to_the_sequence_limit():
    assert graph_buckets(1) == [1]
    assert graph_buckets(6) == [1, 2, 4, 6]
    assert graph_buckets(16) == [1, 2, 4, 8, 16]
    assert graph_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


def test_only_steps_of_one_token_per_sequence_are_decode_steps():
    decode = [SequenceChunk([5], 7, [0, 1]), SequenceChunk([6], 3, [2])]
    assert is_decode_step(decode)
    assert not is_decode_step(decode + [SequenceChunk([1, 2, 3], 0, [3])]), "a prompt chunk runs eagerly"
    assert not is_decode_step([SequenceChunk([5], 7, [0, 1], want_logits=False)])


def prefill_sequences(model, cache, prompts, tables):
    for prompt, table in zip(prompts, tables):
        model(ForwardBatch.build([SequenceChunk(prompt, 0, table)], BLOCK, model.layer_windows), cache)


def test_a_padded_static_decode_batch_gives_each_sequence_its_own_logits(model):
    num_blocks = 12
    prompts = [[5, 9, 13, 2, 7], [8, 3, 3], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
    tables = [[3, 0], [5], [2, 7, 4]]
    chunks = [SequenceChunk([17 + i], len(p), t) for i, (p, t) in enumerate(zip(prompts, tables))]
    cache = model.make_cache(num_blocks + 1, BLOCK)  # the last block is the padding rows' scratch
    prefill_sequences(model, cache, prompts, tables)
    own = model.make_cache(num_blocks + 1, BLOCK)
    prefill_sequences(model, own, prompts, tables)
    expected = model(ForwardBatch.build(chunks, BLOCK, model.layer_windows), own)  # [3, V]

    graphs = DecodeGraphs(model, cache, BLOCK, max_num_seqs=6, max_model_len=48, scratch_block=num_blocks)
    rows = graphs.bucket(len(chunks))
    assert rows == 4, "three sequences replay the graph of four"
    graphs.fill(chunks, rows)
    got = model(graphs.batch(rows, chunks), cache)
    assert got.shape[0] == rows
    torch.testing.assert_close(got[:3], expected, rtol=1e-5, atol=1e-5)
    for layer in range(model.num_layers):  # the sequences' keys landed in their own slots, as the eager step's did
        torch.testing.assert_close(cache.k[layer][:num_blocks], own.k[layer][:num_blocks], rtol=1e-5, atol=1e-6)
    assert graphs.inputs.block_tables[3].eq(num_blocks).all(), "the padding row reads the scratch block only"


def test_graphs_serve_only_captured_decode_steps_that_fit(model):
    cache = model.make_cache(9, BLOCK)
    graphs = DecodeGraphs(model, cache, BLOCK, max_num_seqs=4, max_model_len=16, scratch_block=8)
    decode = [SequenceChunk([5], 7, [0, 1])]
    assert not graphs.serves(decode), "nothing is served before the capture"
    graphs.graphs = {size: None for size in graphs.buckets}  # as after a capture (no GPU here)
    assert graphs.serves(decode)
    assert not graphs.serves(decode * 5), "more sequences than the largest bucket"
    assert not graphs.serves([SequenceChunk([5, 6], 7, [0, 1])]), "a prompt chunk"
    assert not graphs.serves([SequenceChunk([5], 20, [0, 1, 2, 3, 4, 5])]), "a block table past max_model_len"


def test_an_engine_on_the_cpu_captures_nothing(engine):
    assert engine.graphs is None and engine.runner.graphs is None


def test_no_graph_is_captured_once_a_triton_kernel_fell_back_to_pytorch(model, monkeypatch, caplog):
    # The warm-up step is where kernels compile; one that could not run leaves its operation to PyTorch, whose
    # path may read sizes on the host, so the steps run eagerly. (No GPU here: the CUDA calls are stood in for.)
    from moemesh.worker.ops import gpu

    cache = model.make_cache(9, BLOCK)
    graphs = DecodeGraphs(model, cache, BLOCK, max_num_seqs=4, max_model_len=16, scratch_block=8)
    warmed = []

    def warm_up(batch, cache):
        warmed.append(batch.num_tokens)
        gpu._failures["decode attention"] = "CompilationError: unsupported on this device"

    def no_capture():
        raise AssertionError("a graph was captured although a kernel fell back")

    monkeypatch.setattr(gpu, "_failures", {})
    monkeypatch.setattr(graphs, "model", warm_up)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", no_capture)
    with caplog.at_level("WARNING"):
        graphs.capture()
    assert warmed == [4] and graphs.graphs == {}, "one warm-up, then no graph"
    assert not graphs.serves([SequenceChunk([5], 7, [0, 1])]), "decode steps run eagerly"
    assert "decode attention" in caplog.text and "without CUDA graphs" in caplog.text
