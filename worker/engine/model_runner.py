"""Runs one scheduled step on the model: the forward call over the paged KV cache, then sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moemesh.worker.engine.grammar import MaskBuilder, allowed_tokens
from moemesh.worker.engine.sampling import SampleResult, SamplingBatch, sample_tokens, token_logprobs
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
        self.masks = MaskBuilder()  # grammar-constrained rows' allowed tokens (a thread pool only if ever needed)

    def forward(self, scheduled: list[ScheduledChunk]) -> tuple[torch.Tensor, list[Sequence]]:
        """Compute the chunks' keys and values into the cache; returns logits [S, V] and the S sequences they belong to.

        A sequence gets a logits row when its chunk reaches its last token (a
        decode, or a prompt's final chunk); earlier prompt chunks only fill the cache.
        A prompt being scored (prompt logprobs) gets logits for every position;
        they are turned into its prompt logprobs here.
        """
        chunks, sampling = [], []
        for seq, count in scheduled:
            start = seq.num_computed
            want_logits = start + count == len(seq.token_ids)
            chunks.append(SequenceChunk(seq.token_ids[start : start + count], start, seq.block_table, want_logits,
                                        every_logits=seq.scores_prompt))
            if want_logits:
                sampling.append(seq)
        if self.graphs is not None and self.graphs.serves(chunks):
            return self.graphs.run(chunks), sampling
        batch = ForwardBatch.build(chunks, self.block_size, self.layer_windows, self.device)
        with torch.inference_mode():
            logits = self.model(batch, self.cache)  # [S, V], one row per chunk that wants logits
        if any(chunk.every_logits for chunk in chunks):
            logits = self._score_prompts(scheduled, chunks, logits)
        return logits, sampling

    def _score_prompts(self, scheduled: list[ScheduledChunk], chunks: list[SequenceChunk],
                       logits: torch.Tensor) -> torch.Tensor:
        """Record the prompt logprobs of the scored chunks; returns the rows of the sequences that sample."""
        keep, row = [], 0
        for (seq, _), chunk in zip(scheduled, chunks):
            count = len(chunk.token_ids) if chunk.every_logits else int(chunk.want_logits)
            if chunk.every_logits:
                _score(seq, chunk.start, logits[row : row + count])
            if chunk.want_logits:
                keep.append(row + count - 1)
            row += count
        return logits[keep]

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
        constrained = [i for i, s in enumerate(seqs) if s.matcher is not None]
        if constrained:
            vocab = logits.shape[1]
            masks = self.masks.token_masks([seqs[i].matcher for i in constrained], vocab)
            batch.constrain(constrained, allowed_tokens(masks.to(self.device, non_blocking=True), vocab))
        return sample_tokens(logits, batch, params)


def _score(seq: Sequence, start: int, logits: torch.Tensor) -> None:
    """Append the logprobs of the prompt tokens that the rows `logits` [T, V] (positions start..) predict.

    Row k (position start + k) predicts token start + k + 1; rows past the prompt's
    end predict generated tokens and are not scored here. Positions recomputed after a
    preemption are not recorded twice.
    """
    targets = seq.token_ids[start + 1 : min(start + 1 + logits.shape[0], seq.num_prompt)]
    if not targets:
        return
    logprobs = logits[: len(targets)].float().log_softmax(dim=-1)  # [T, V]
    target = torch.tensor(targets, dtype=torch.long, device=logprobs.device)
    entries = token_logprobs(logprobs, target, targets, [seq.params.prompt_logprobs] * len(targets))
    for position, entry in enumerate(entries, start + 1):
        if position == len(seq.prompt_logprobs):  # the next one missing
            seq.prompt_logprobs.append(entry)
