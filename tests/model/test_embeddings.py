"""The sentence embedder on the real packaged all-MiniLM-L6-v2 weights, on CPU."""

from __future__ import annotations

import pytest
import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.embeddings.sentence import FORWARD_TOKENS, EmbeddingJob, SentenceEmbedder, default_embedding_model_dir

CAT = "The cat sits on the mat."
CAT_PARAPHRASE = "A cat is sitting on a mat."
UNRELATED = "Quarterly revenue rose by four percent."


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return SentenceEmbedder.load(default_embedding_model_dir(), device="cpu", dtype=torch.float32)


def test_describes_the_packaged_model(embedder):
    assert embedder.model_id == "all-minilm-l6-v2"
    assert embedder.dimensions == 384
    assert embedder.max_context_tokens == 256
    assert embedder.max_batch_inputs >= 1
    assert len(embedder.revision) == 12 and embedder.revision == SentenceEmbedder.load().revision


def test_vectors_are_float32_unit_length_one_per_input(embedder):
    vectors, counts = embedder.embed([CAT, UNRELATED])
    assert vectors.shape == (2, 384) and vectors.dtype == torch.float32
    norms = vectors.norm(dim=1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-5), f"normalised vectors have norms {norms}"


def test_unnormalised_vectors_keep_their_length(embedder):
    vectors, _ = embedder.embed([CAT], normalize=False)
    assert abs(vectors.norm().item() - 1.0) > 1e-3, "normalize=False still returned a unit vector"


def test_paraphrases_are_closer_than_unrelated_text(embedder):
    vectors, _ = embedder.embed([CAT, CAT_PARAPHRASE, UNRELATED])
    paraphrase = (vectors[0] @ vectors[1]).item()
    unrelated = (vectors[0] @ vectors[2]).item()
    assert paraphrase > unrelated + 0.3, f"paraphrase cosine {paraphrase:.3f} vs unrelated {unrelated:.3f}"


def test_batching_and_padding_do_not_change_vectors(embedder):
    texts = [CAT, UNRELATED, "def main():\n    return 0", CAT_PARAPHRASE + " " + UNRELATED * 3]
    batched, batched_counts = embedder.embed(texts)
    for index, text in enumerate(texts):
        single, single_counts = embedder.embed([text])
        assert torch.allclose(batched[index], single[0], atol=1e-5), f"input {index} differs when batched"
        assert batched_counts[index] == single_counts[0]


def test_token_counts_include_special_tokens_and_stop_at_the_limit(embedder):
    _, counts = embedder.embed([CAT, "word " * 1000])
    assert 2 < counts[0] < 20, f"{CAT!r} counted as {counts[0]} tokens"
    assert counts[1] == embedder.max_context_tokens, "a long input was not truncated to the context limit"


def test_rejects_empty_inputs_and_oversized_batches(embedder):
    with pytest.raises(InvalidRequest, match=r"inputs\[1\]"):
        embedder.embed([CAT, ""])
    with pytest.raises(InvalidRequest, match="inputs"):
        embedder.embed([CAT] * (embedder.max_batch_inputs + 1))


def test_a_job_runs_one_forward_a_step_within_the_token_budget(embedder, monkeypatch):
    """The worker runs an embedding batch one step at a time between engine steps (see EmbeddingJob)."""
    texts = ["word " * 300, CAT, UNRELATED, "def main():\n    return 0", "word " * 60, CAT_PARAPHRASE]
    whole, whole_counts = embedder.embed(texts)
    forwards: list[list[int]] = []
    forward = embedder.forward
    monkeypatch.setattr(embedder, "forward", lambda ids: forwards.append([len(i) for i in ids]) or forward(ids))
    job = EmbeddingJob(embedder, texts, normalize=True)
    with pytest.raises(RuntimeError):
        job.result()
    steps = 1
    while job.step():
        steps += 1
    vectors, counts = job.result()
    assert steps == 1 + len(forwards), "the tokenization, then one forward a step"
    assert counts == whole_counts and torch.allclose(vectors, whole, atol=1e-5)
    assert sorted(n for lengths in forwards for n in lengths) == sorted(counts), "every input in exactly one forward"
    for lengths in forwards:
        assert len(lengths) == 1 or len(lengths) * max(lengths) <= FORWARD_TOKENS, lengths
    assert [256] in forwards, "the longest input (truncated to 256 tokens) alone"
    assert len(forwards) >= 2 and any(len(lengths) > 1 for lengths in forwards), forwards


def test_plan_groups_inputs_by_length_up_to_the_budget(embedder):
    counts = [300, 5, 7, 6, 100, 128, 129, 600, 1]
    batches = embedder.plan(counts)
    assert sorted(i for batch in batches for i in batch) == list(range(len(counts)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(counts[i] for i in batch) <= FORWARD_TOKENS
    assert batches == [[8, 1, 3, 2, 4], [5, 6], [0], [7]], "shortest first, as many as fit 512 padded tokens"
