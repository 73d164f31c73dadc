"""Runs one scheduled step on the model: the forward call over the paged KV cache, then sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moemesh.worker.engine.sampling import SampleResult, SamplingBatch, sample_tokens
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk

if TYPE_CHECKING:
    from moemesh.worker.engine.cuda_graphs import DecodeGraphs
    from moemesh.worker.engine.kv_cache import PagedKVCache
    from moemesh.worker.engine.scheduler import ScheduledChunk
    from moemesh.worker.engine.sequence import Sequence


class ModelRunner:
    """Turns scheduled chunks into one forward batch, runs the model, and samples the sequences' next tokens."""

    def __init__(self, model: torch.nn.Module, cache: PagedKVCache, block_size: int,
                 graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.cache = cache
        self.block_size = block_size
        self.graphs = graphs  # decode steps that fit replay a captured CUDA graph
        self.device = next(model.parameters()).device
        self.layer_windows = model.layer_windows

    def forward(self, scheduled: list[ScheduledChunk]) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the chunks' keys and values into the cache; returns logits [S, V] and the S sequences they belong to.

        A sequence gets a logits row when its chunk reaches its last token (a
        decode, or a prompt's final chunk); earlier prompt chunks only fill the cache.
        """
        chunks, sampling = [], []
        for seq, count in scheduled:
            start = seq.num_computed
            want_logits = start + count == len(seq.token_ids)
            chunks.append(SequenceChunk(seq.token_ids[start : start + count], start, seq.block_table, want_logits))
            if want_logits:
                sampling.append(seq)
        if self.graphs is not None and self.graphs.serves(chunks):
            return self.graphs.run(chunks), sampling
        batch = ForwardBatch.build(chunks, self.block_size, self.layer_windows, self.device)
        with torch.inference_mode():
            logits = self.model(batch, self.cache)  # [S, V], one row per chunk that wants logits
        return logits, sampling

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        """The next token (and logprobs, where asked) of each sequence, from its row of `logits` [S, V]."""
        params = [s.params for s in seqs]
        history = {}
        if any(p.needs_history for p in params):  # penalties: each row's own prompt and output
            history = dict(
                prompt_token_ids=[s.token_ids[: s.num_prompt] for s in seqs],
                output_token_ids=[s.token_ids[s.num_prompt :] for s in seqs],
            )
        batch = SamplingBatch.build(params, [s.seed for s in seqs], [s.num_generated for s in seqs], self.device,
                                    **history)
        return sample_tokens(logits, batch, params)
