"""The generation engine: continuous batching over a paged KV cache, one forward call per step.

It composes single-purpose parts: the `Scheduler` picks each step's chunks
(admission, prefix hits, chunked prefill, preemption), the `ModelRunner` runs
and samples them, `stops` ends sequences and holds back text that may become
a stop string, and `TierExchange` shares prefix blocks with a KV tier behind
the `KVTier` protocol. Requests join and leave between steps; nothing waits
for a batch to drain.

This object is synchronous and owned by one thread (see ``runner.py``).
"""

from __future__ import annotations

import time
from collections import deque

import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.engine.block_manager import BlockManager
from moemesh.worker.engine.cuda_graphs import DecodeGraphs
from moemesh.worker.engine.grammar import GrammarCompiler, advance
from moemesh.worker.engine.model_runner import ModelRunner
from moemesh.worker.engine.prefix_tier import KVTier, TierExchange
from moemesh.worker.engine.requests import GenerationRequest, RequestOutput
from moemesh.worker.engine.sampling import TokenLogprobs
from moemesh.worker.engine.scheduler import ScheduledChunk, Scheduler
from moemesh.worker.engine.sequence import EngineCounters, Sequence
from moemesh.worker.engine.stops import append_token, finish_now, take_output
from moemesh.worker.engine.tokenizer import IncrementalDetokenizer, Tokenizer

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


class Engine:
    """Admits, schedules, steps and retires sequences; one forward call per step."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        *,
        max_num_seqs: int,
        max_model_len: int,
        num_blocks: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        kv_tier: KVTier | None = None,
        kv_tier_writes: str = "reused",
        cuda_graphs: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        max_model_len = min(max_model_len, model.max_context_tokens)
        if num_blocks is None:  # room for every sequence slot at full length
            num_blocks = max_num_seqs * -(-max_model_len // block_size)
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        self.block_size = block_size
        self.counters = EngineCounters()
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(
            self.blocks,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_num_seqs),
            counters=self.counters,
        )
        self.device = next(model.parameters()).device
        # Decode steps replay CUDA graphs where every operation allows it; their padding rows write to one
        # extra block that the block manager never hands out.
        graphs = cuda_graphs and self.device.type == "cuda" and model.graph_safe
        self.cache = model.make_cache(num_blocks + (1 if graphs else 0), block_size)
        self.graphs = None
        if graphs:
            self.graphs = DecodeGraphs(model, self.cache, block_size, max_num_seqs, self.max_model_len,
                                       scratch_block=num_blocks)
            self.graphs.capture()
        self.runner = ModelRunner(model, self.cache, block_size, self.graphs)
        # The shared prefix-KV tier, consulted when the local prefix cache misses (see prefix_tier.py). Its
        # exchange needs the cache, made once the scheduler has checked its limits.
        self.tier_exchange = TierExchange(self.cache, self.blocks, self.counters, writes=kv_tier_writes)
        self.kv_tier = kv_tier if enable_prefix_caching else None
        # Structured outputs: grammars compiled against this tokenizer (by the caller's thread, see grammar.py).
        self.grammars = GrammarCompiler(tokenizer, model.vocab_size)

    # ---- configuration and load ---------------------------------------------
    @property
    def kv_tier(self) -> KVTier | None:
        """The shared prefix-KV tier, or None; settable after construction (the worker wires it in)."""
        return self.tier_exchange.tier

    @kv_tier.setter
    def kv_tier(self, tier: KVTier | None) -> None:
        self.tier_exchange.tier = tier
        # Without a tier the scheduler calls no hooks at all: admission and block fills cost what they did before.
        self.scheduler.external = self.tier_exchange if tier is not None else None

    @property
    def kv_tier_writes(self) -> str:
        """Which prompt blocks go to the tier: "reused" ones or "all" (see prefix_tier.py)."""
        return self.tier_exchange.writes

    @kv_tier_writes.setter
    def kv_tier_writes(self, writes: str) -> None:
        self.tier_exchange.writes = writes

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @property
    def max_num_batched_tokens(self) -> int:
        return self.scheduler.max_num_batched_tokens

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self) -> deque[Sequence]:
        return self.scheduler.waiting

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    # ---- admission -------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest when the request cannot fit this engine's context or names a token the model lacks."""
        total = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if not request.prompt_token_ids:
            raise InvalidRequest("prompt", "is empty after tokenization")
        check_vocabulary("prompt_token_ids", request.prompt_token_ids, self.model.vocab_size)
        check_vocabulary("resume_token_ids", request.resume_token_ids, self.model.vocab_size)
        if total >= self.max_model_len:
            raise InvalidRequest("prompt", f"{total} tokens; the limit is {self.max_model_len - 1}")

    def add(self, request: GenerationRequest) -> None:
        """Queue a request (after `check`); it joins the batch at a coming step."""
        self.check(request)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids=list(request.prompt_token_ids))
        seq = Sequence.from_request(request, detokenizer)
        if request.grammar is not None:
            seq.matcher = request.grammar.matcher()
            if request.resume_token_ids:  # failover: the delivered tokens followed the grammar
                seq.matcher.consume_tokens(list(request.resume_token_ids))
        if request.params.prompt_logprobs is not None and not request.resume_token_ids:  # resumed: sent already
            seq.prompt_logprobs = [TokenLogprobs(request.prompt_token_ids[0], 0.0)]
        self.scheduler.add(seq)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Mark a request to leave at the next step (waiting or running), freeing its blocks."""
        self.scheduler.abort(request_id, reason)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- one step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Retire aborted/expired requests, schedule one batch, run it, sample, and report."""
        outputs = [take_output(seq) for seq in self.scheduler.retire_aborted(time.time())]
        scheduled = self.scheduler.schedule()
        finished = self._run(scheduled) if scheduled else []
        self.counters.steps += 1
        outputs += [take_output(seq) for seq, _ in scheduled if seq.new_token_ids or seq.finish_reason]
        for seq in finished:
            self.scheduler.finish(seq)
        return outputs

    def _run(self, scheduled: list[ScheduledChunk]) -> list[Sequence]:
        """Forward the scheduled chunks, then sample and append a token to each sequence that reached its end.

        Returns the sequences that finished with this token.
        """
        logits, sampling = self.runner.forward(scheduled)
        self.scheduler.advance(scheduled)
        finished = []
        if any(seq.params.max_tokens == 0 for seq in sampling):  # a prompt scored, nothing generated
            keep = [i for i, seq in enumerate(sampling) if seq.params.max_tokens > 0]
            finished = [finish_now(seq, "length") for seq in sampling if seq.params.max_tokens == 0]
            logits, sampling = logits[keep], [sampling[i] for i in keep]
        if sampling:
            result = self.runner.sample(logits, sampling)
            eos_token_ids, max_model_len = self.tokenizer.eos_token_ids, self.max_model_len
            for seq, token, logprobs in zip(sampling, result.token_ids, result.logprobs):
                grammar_ended = seq.matcher is not None and advance(seq.matcher, token)
                if append_token(seq, token, logprobs, eos_token_ids, max_model_len, grammar_ended=grammar_ended):
                    finished.append(seq)
            self.counters.generated_tokens += len(sampling)
        self.tier_exchange.flush()
        return finished


def check_vocabulary(field: str, token_ids: tuple[int, ...], vocab_size: int) -> None:
    """InvalidRequest naming `field` when an id is outside 0 <= id < vocab_size (it would index past the
    embedding table on the engine thread)."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidRequest(field, f"token id {bad} is outside the vocabulary (0 <= id < {vocab_size})")
