"""Pooled hidden-state embeddings of the served MoE model."""

from __future__ import annotations

import pytest
import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.embeddings.pooled import BATCH_TOKENS, PooledEmbedder
from moemesh.worker.embeddings.sentence import EmbeddingJob
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk
from moemesh.worker.models.checkpoint import open_checkpoint
from moemesh.worker.models.registry import build_model
from tests.support.checkpoints import build_tiny_mixtral


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    ckpt = build_tiny_mixtral(tmp_path_factory.mktemp("pooled"), seed=5)
    return build_model(open_checkpoint(ckpt)), Tokenizer.from_dir(ckpt)


def test_vector_is_the_mean_of_the_final_hidden_states(parts):
    model, tokenizer = parts
    embedder = PooledEmbedder(model, tokenizer, "tiny", "rev", max_context_tokens=64)
    text = "the quick brown fox"
    ids = tokenizer.encode(text)
    cache = model.make_cache(8, 16)
    batch = ForwardBatch.build([SequenceChunk(ids, 0, list(range(8)))], 16, model.layer_windows, all_logits=True)
    expected = model.hidden_states(batch, cache).mean(dim=0)
    vectors, counts = embedder.embed([text], normalize=False)
    assert counts == [len(ids)] and vectors.shape == (1, model.args.hidden_size)
    torch.testing.assert_close(vectors[0], expected, rtol=1e-5, atol=1e-6)
    assert embedder.model_id == "tiny-pooled" and embedder.dimensions == model.args.hidden_size


def test_batch_equals_one_by_one_and_vectors_are_unit_length(parts):
    embedder = PooledEmbedder(*parts, "tiny", "rev", max_context_tokens=64)
    texts = ["a", "invoice number 42 is overdue", "a much longer text " * 3]
    together, _ = embedder.embed(texts)
    for i, text in enumerate(texts):
        alone, _ = embedder.embed([text])
        torch.testing.assert_close(together[i], alone[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(3))


def test_long_inputs_are_truncated_and_empty_ones_refused(parts):
    embedder = PooledEmbedder(*parts, "tiny", "rev", max_context_tokens=8)
    _, counts = embedder.embed(["word " * 50])
    assert counts == [8]
    with pytest.raises(InvalidRequest, match=r"inputs\[1\]"):
        embedder.embed(["fine", ""])


def test_forward_calls_group_inputs_in_order_up_to_the_batch_budget(parts):
    embedder = PooledEmbedder(*parts, "tiny", "rev", max_context_tokens=2048)
    assert embedder.plan([100, 300, 112, 1, 600, 2048, 5]) == [[0, 1, 2], [3], [4], [5], [6]]
    assert BATCH_TOKENS == 512, "the plan above is for 512"
    texts = ["word " * 400, "a", "word " * 200, "b c", "word " * 300]
    job = EmbeddingJob(embedder, texts, normalize=True)
    steps = 1
    while job.step():
        steps += 1
    vectors, counts = job.result()
    assert steps == 1 + len(embedder.plan(counts)) > 2
    torch.testing.assert_close(vectors, embedder.embed(texts)[0])
