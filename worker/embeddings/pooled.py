"""A second embedding mode: mean-pooled final hidden states of the served MoE model.

Served under the generation model's id plus `POOLED_SUFFIX`. Each text is
tokenized as a prompt, run through the decoder (its own KV blocks in a
scratch cache, so the engine's cache is never touched), and the final-norm
hidden states of its tokens are averaged. The vectors are as good as the
model's representations: a chat model's are not tuned for retrieval the way
a sentence-embedding model's are, but they need no second model in memory.
"""

from __future__ import annotations

import torch

from moemesh.worker.embeddings.sentence import EmbeddingModel
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk

POOLED_SUFFIX = "-pooled"
MAX_INPUT_TOKENS = 2048  # inputs are truncated here: bounds the scratch cache and activations of a forward call
# Tokens of the inputs one forward call groups (a longer input runs alone): about one engine step's prefill, since
# the worker runs one forward call between two engine steps.
BATCH_TOKENS = 512
BLOCK_SIZE = 16


class PooledEmbedder(EmbeddingModel):
    """Embeds texts with the generation model, on its own scratch KV cache."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, model_id: str, revision: str,
                 max_context_tokens: int) -> None:
        super().__init__(model, model_id + POOLED_SUFFIX, revision, min(max_context_tokens, MAX_INPUT_TOKENS))
        self._tokenizer = tokenizer

    @property
    def dimensions(self) -> int:
        return self._model.args.hidden_size

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [self._tokenizer.encode(text)[: self._max_context_tokens] for text in texts]

    def plan(self, counts: list[int]) -> list[list[int]]:
        """Inputs in order, as many to a forward as fit BATCH_TOKENS (one at least)."""
        batches: list[list[int]] = []
        total = 0
        for index, count in enumerate(counts):
            if batches and total + count <= BATCH_TOKENS:
                batches[-1].append(index)
                total += count
            else:
                batches.append([index])
                total = count
        return batches

    @torch.inference_mode()
    def forward(self, sequences: list[list[int]]) -> torch.Tensor:
        """Mean of each sequence's final hidden states, one forward call: [B, H] float32."""
        tables, chunks, next_block = [], [], 0
        for ids in sequences:
            count = -(-len(ids) // BLOCK_SIZE)
            table = list(range(next_block, next_block + count))
            next_block += count
            tables.append(table)
            chunks.append(SequenceChunk(ids, 0, table))
        cache = self._model.make_cache(next_block, BLOCK_SIZE)
        batch = ForwardBatch.build(chunks, BLOCK_SIZE, self._model.layer_windows, self._device, all_logits=True)
        hidden = self._model.hidden_states(batch, cache).float()  # [N, H]
        return torch.stack([hidden[rows].mean(dim=0) for rows in batch.chunk_rows]).cpu()
