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
import torch.nn.functional as F

from moemesh.worker.embeddings.sentence import EmbeddingModel
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk

POOLED_SUFFIX = "-pooled"
TOKENS_PER_FORWARD = 2048  # bounds the scratch cache and activations of one forward call
BLOCK_SIZE = 16


class PooledEmbedder(EmbeddingModel):
    """Embeds texts with the generation model; safe to call beside the engine thread."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, model_id: str, revision: str,
                 max_context_tokens: int) -> None:
        super().__init__(model, model_id + POOLED_SUFFIX, revision, min(max_context_tokens, TOKENS_PER_FORWARD))
        self._tokenizer = tokenizer

    @property
    def dimensions(self) -> int:
        return self._model.args.hidden_size

    def embed(self, texts: list[str], normalize: bool = True) -> tuple[torch.Tensor, list[int]]:
        """float32 vectors [N, H] for `texts`, in order, and each input's token count (after truncation)."""
        self.check_inputs(texts)
        token_ids = [self._tokenizer.encode(text)[: self._max_context_tokens] for text in texts]
        vectors = torch.empty(len(texts), self.dimensions, dtype=torch.float32)  # [N, H]
        batch: list[int] = []
        for index in range(len(texts)):
            if batch and sum(len(token_ids[i]) for i in batch) + len(token_ids[index]) > TOKENS_PER_FORWARD:
                vectors[batch] = self._pool([token_ids[i] for i in batch])
                batch = []
            batch.append(index)
        if batch:
            vectors[batch] = self._pool([token_ids[i] for i in batch])
        if normalize:
            vectors = F.normalize(vectors, p=2.0, dim=1)
        return vectors, [len(ids) for ids in token_ids]

    @torch.inference_mode()
    def _pool(self, sequences: list[list[int]]) -> torch.Tensor:
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
