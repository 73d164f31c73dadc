"""The generation engine: continuous batching over a paged KV cache.

Each `step` is one forward call. The scheduler fills it oldest request first
within a token budget (`max_num_batched_tokens`): every running sequence
gets its next token (a decode) or the next chunk of its prompt (chunked
prefill), then waiting requests join while sequence slots, budget and cache
blocks last. Requests join and leave between steps; nothing waits for a
batch to drain.

Cache blocks are taken as sequences grow. When a running sequence needs a
block and none is free, the newest running sequences are preempted: their
blocks are released and they go back to the head of the queue, to be
recomputed from their tokens later (usually from the prefix cache, since
their full blocks stay registered). No request fails for lack of blocks.

On admission a prompt's longest cached prefix of full blocks is reused
(verified token by token), so only the rest is computed.

This object is synchronous and owned by one thread (see ``runner.py``).
"""

from __future__ import annotations

import collections
import logging
import random
import time
from dataclasses import dataclass, field

import torch

from moemesh.cache.kv_tier import RedisKVTier
from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.engine.kv_cache import ROOT_HASH, BlockManager, block_hash
from moemesh.worker.engine.requests import GenerationRequest, RequestOutput
from moemesh.worker.engine.sampling import SamplingBatch, TokenLogprobs, sample_tokens
from moemesh.worker.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from moemesh.worker.models.batch import ForwardBatch, SequenceChunk

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 16
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048


@dataclass(eq=False)  # identity: a sequence is found in the queues by `is`
class Sequence:
    """A request being served: its tokens, cache blocks, detokenizer and stop state."""

    request: GenerationRequest
    seed: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]  # prompt + resumed + generated
    num_generated: int = 0  # including resumed tokens
    num_computed: int = 0  # leading tokens whose K/V is in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of the registered full blocks
    cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    num_preemptions: int = 0
    pending_text: str = ""  # decoded but held back: it may start a stop string
    finish_reason: str | None = None
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)

    @property
    def params(self):
        return self.request.params

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt(self) -> int:
        return len(self.request.prompt_token_ids)


@dataclass
class EngineCounters:
    """Running totals, for metrics and tests."""

    steps: int = 0
    prompt_tokens_computed: int = 0
    prefix_hit_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    aborts: int = 0
    tier_hit_tokens: int = 0  # prompt tokens whose KV came from the shared Redis tier


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
        kv_tier: RedisKVTier | None = None,
        kv_tier_writes: str = "reused",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        max_model_len = min(max_model_len, model.max_context_tokens)
        if num_blocks is None:  # room for every sequence slot at full length
            num_blocks = max_num_seqs * -(-max_model_len // block_size)
        self.max_model_len = min(max_model_len, num_blocks * block_size)
        self.max_num_batched_tokens = max_num_batched_tokens or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, max_num_seqs)
        if self.max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs ({max_num_seqs})"
            )
        self.block_size = block_size
        self.cache = model.make_cache(num_blocks, block_size)
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.device = next(model.parameters()).device
        self.layer_windows = model.layer_windows
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest admission first
        self.aborted: dict[str, str] = {}
        self.counters = EngineCounters()
        # The shared prefix-KV tier (Redis): consulted when the local prefix cache misses.
        self.kv_tier = kv_tier if enable_prefix_caching else None
        # Which prompt blocks go to the tier: "reused" ones (a local prefix hit showed they recur; no write
        # cost for one-off prompts) or "all" (every prompt block once computed).
        if kv_tier_writes not in ("reused", "all"):
            raise ValueError(f"kv_tier_writes must be 'reused' or 'all', got {kv_tier_writes!r}")
        self.kv_tier_writes = kv_tier_writes
        self._export: list[tuple[int, bytes, bytes, list[int]]] = []  # blocks to write: (block, hash, parent, tokens)
        self._exported: collections.OrderedDict[bytes, None] = collections.OrderedDict()  # recently written hashes

    # ---- admission -------------------------------------------------------
    def check(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest when the request cannot fit this engine's context."""
        total = len(request.prompt_token_ids) + len(request.resume_token_ids)
        if not request.prompt_token_ids:
            raise InvalidRequest("prompt", "is empty after tokenization")
        if total >= self.max_model_len:
            raise InvalidRequest("prompt", f"{total} tokens; the limit is {self.max_model_len - 1}")

    def add(self, request: GenerationRequest) -> None:
        """Queue a request (after `check`); it joins the batch at a coming step."""
        self.check(request)
        resumed = list(request.resume_token_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids=list(request.prompt_token_ids))
        # Text of the resumed tokens that the client has not received yet goes out first.
        pending = detokenizer.push(resumed)[request.resume_text_chars :] if resumed else ""
        self.waiting.append(Sequence(
            request=request,
            seed=request.params.seed if request.params.seed is not None else random.getrandbits(31),
            detokenizer=detokenizer,
            token_ids=[*request.prompt_token_ids, *resumed],
            num_generated=len(resumed),
            pending_text=pending,
        ))

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Mark a request to leave at the next step (waiting or running), freeing its blocks."""
        self.aborted[request_id] = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free

    # ---- one step ----------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Retire aborted/expired requests, schedule one batch, run it, sample, and report."""
        outputs = self._retire_aborted()
        scheduled = self._schedule()
        if scheduled:
            self._run(scheduled)
        self.counters.steps += 1
        return outputs + [self._collect(seq) for seq, _ in scheduled if seq.new_token_ids or seq.finish_reason]

    def _retire_aborted(self) -> list[RequestOutput]:
        now = time.time()
        for seq in [*self.running, *self.waiting]:
            deadline = seq.request.deadline
            if deadline is not None and now > deadline:
                self.aborted.setdefault(seq.request_id, "deadline")
        if not self.aborted:
            return []
        outputs = []
        for seq in [s for s in [*self.running, *self.waiting] if s.request_id in self.aborted]:
            seq.finish_reason = self.aborted[seq.request_id]
            self.counters.aborts += 1
            outputs.append(self._collect(seq))
        self.aborted.clear()
        return outputs

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, new token count) pairs for this step within the budget, preempting if blocks run out."""
        budget = self.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(len(seq.token_ids) - seq.num_computed, budget)
            need = self.blocks.blocks_for(seq.num_computed + count) - len(seq.block_table)
            while need > self.blocks.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
            if need > self.blocks.num_free:  # it is the newest itself: it waits for older ones to finish
                self._preempt(seq)
                preempted = True
                break
            seq.block_table += self.blocks.allocate(need)
            scheduled.append((seq, count))
            budget -= count
            index += 1
        while not preempted and self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            count = self._admit(seq, budget)
            if count == 0:
                break  # not enough free blocks for the head of the queue: it keeps its place
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, count))
            budget -= count
        return scheduled

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its prefix-cache hits and the blocks for its first chunk; 0 if they don't fit."""
        # Leave at least one token to compute: its logits give the next token.
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        hits, hashes = self.blocks.match_prefix(seq.token_ids, max_blocks)
        fetched = self._fetch_from_tier(seq.token_ids, hashes, len(hits), max_blocks)
        computed = (len(hits) + len(fetched)) * self.block_size
        count = min(len(seq.token_ids) - computed, budget)
        need = self.blocks.blocks_for(computed + count) - len(hits)
        hits_now_free = sum(1 for block in hits if self.blocks.ref_count[block] == 0)
        if need > self.blocks.num_free - hits_now_free:
            return 0
        self.blocks.take(hits)
        if self.kv_tier is not None and self.kv_tier_writes == "reused" and hits:
            self._queue_export(hits, hashes, seq.token_ids)
        fresh = self.blocks.allocate(need)
        if fetched:
            self.cache.write_blocks(fresh[: len(fetched)], [payload for *_, payload in fetched])
            for block, (digest, parent, tokens, _) in zip(fresh, fetched):
                self.blocks.register(block, parent, tokens)
                hashes.append(digest)
                self._exported[digest] = None  # it is in the tier already
            self.counters.tier_hit_tokens += len(fetched) * self.block_size
        seq.block_table = hits + fresh
        seq.block_hashes = hashes
        seq.num_computed = computed
        if seq.cached_tokens is None:
            seq.cached_tokens = min(computed, seq.num_prompt)
        self.counters.prefix_hit_tokens += computed
        return count

    def _fetch_from_tier(self, token_ids: list[int], hashes: list[bytes], first: int,
                         max_blocks: int) -> list[tuple[bytes, bytes, list[int], bytes]]:
        """Blocks `first`.. of the prompt found in the shared tier: (hash, parent, tokens, payload), in order."""
        if self.kv_tier is None or first >= max_blocks:
            return []
        bs = self.block_size
        wanted, parent = [], hashes[-1] if hashes else ROOT_HASH
        for i in range(first, max_blocks):
            tokens = token_ids[i * bs : (i + 1) * bs]
            digest = block_hash(parent, tokens)
            wanted.append((digest, parent, tokens))
            parent = digest
        payloads = self.kv_tier.fetch([w[0] for w in wanted], [w[1] for w in wanted], [w[2] for w in wanted])
        return [(*w, payload) for w, payload in zip(wanted, payloads)]

    def _preempt(self, seq: Sequence) -> None:
        """Release a running sequence's blocks and requeue it at the front, to recompute later."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
        seq.num_preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted %s (%d tokens) for lack of KV blocks", seq.request_id, len(seq.token_ids))

    def _run(self, scheduled: list[tuple[Sequence, int]]) -> None:
        chunks = []
        for seq, count in scheduled:
            start = seq.num_computed
            chunks.append(SequenceChunk(seq.token_ids[start : start + count], start, seq.block_table,
                                        want_logits=start + count == len(seq.token_ids)))
        batch = ForwardBatch.build(chunks, self.block_size, self.layer_windows, self.device)
        with torch.inference_mode():
            logits = self.model(batch, self.cache)  # [S, V], one row per chunk that wants logits
        sampling = []
        for (seq, count), chunk in zip(scheduled, chunks):
            if seq.num_computed < seq.num_prompt:
                self.counters.prompt_tokens_computed += min(count, seq.num_prompt - seq.num_computed)
            seq.num_computed += count
            self._register_full_blocks(seq)
            if chunk.want_logits:
                sampling.append(seq)
        if sampling:
            result = self._sample(logits, sampling)
            for i, seq in enumerate(sampling):
                self._append(seq, result.token_ids[i], result.logprobs[i])
        if self._export:
            self._export_blocks()

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Make the sequence's newly completed blocks findable by later prompts (and other workers)."""
        full = seq.num_computed // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else ROOT_HASH
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            digest = self.blocks.register(seq.block_table[i], parent, tokens)
            seq.block_hashes.append(digest)
            if self.kv_tier is not None and self.kv_tier_writes == "all" and (i + 1) * self.block_size <= seq.num_prompt:
                # Prompt blocks only: those are what other requests share (system prompts, documents);
                # generated text rarely repeats, and writing it would cost every request.
                self._export.append((seq.block_table[i], digest, parent, tokens))

    def _queue_export(self, blocks: list[int], hashes: list[bytes], token_ids: list[int]) -> None:
        """Queue the tier write of local prefix-hit blocks not written lately."""
        bs = self.block_size
        for i, (block, digest) in enumerate(zip(blocks, hashes)):
            if digest in self._exported:
                self._exported.move_to_end(digest)
                continue
            parent = hashes[i - 1] if i else ROOT_HASH
            self._export.append((block, digest, parent, token_ids[i * bs : (i + 1) * bs]))

    def _export_blocks(self) -> None:
        """Copy this step's new full blocks out of the cache and hand them to the tier's background writer."""
        export, self._export = self._export, []
        for _, digest, _, _ in export:
            self._exported[digest] = None
        while len(self._exported) > 4 * self.blocks.num_blocks:
            self._exported.popitem(last=False)
        payloads = self.cache.read_blocks([block for block, *_ in export])
        self.kv_tier.store([(digest, parent, tokens, payload)
                            for (_, digest, parent, tokens), payload in zip(export, payloads)])

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        history = {}
        if any(p.needs_history for p in params):
            history = dict(
                prompt_token_ids=[s.token_ids[: s.num_prompt] for s in seqs],
                output_token_ids=[s.token_ids[s.num_prompt :] for s in seqs],
            )
        batch = SamplingBatch.build(params, [s.seed for s in seqs], [s.num_generated for s in seqs], self.device,
                                    **history)
        return sample_tokens(logits, batch, params)

    # ---- outputs -----------------------------------------------------------
    def _append(self, seq: Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        seq.token_ids.append(token)
        seq.new_token_ids.append(token)
        if logprobs is not None:
            seq.new_logprobs.append(logprobs)
        seq.num_generated += 1
        self.counters.generated_tokens += 1
        params = seq.params
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids or token in params.stop_token_ids:
            seq.finish_reason = "stop"
            seq.pending_text += seq.detokenizer.flush()
            return
        seq.pending_text += seq.detokenizer.push([token])
        if params.stop and self._cut_at_stop(seq):
            seq.finish_reason = "stop"
        elif seq.num_generated >= params.max_tokens:
            seq.finish_reason = "length"
        elif len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "context"
        if seq.finish_reason:
            seq.pending_text += seq.detokenizer.flush()
            if params.stop:
                self._cut_at_stop(seq)

    @staticmethod
    def _cut_at_stop(seq: Sequence) -> bool:
        """Truncate pending text at the first stop string; True if one was found."""
        hits = [i for i in (seq.pending_text.find(s) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.pending_text = seq.pending_text[: min(hits)]
        return True

    def _collect(self, seq: Sequence) -> RequestOutput:
        """Take the sequence's new output; release it if it finished."""
        text = seq.pending_text
        if seq.finish_reason is None and seq.params.stop:
            # Hold back a tail that could still grow into a stop string.
            keep = max(len(s) for s in seq.params.stop) - 1
            cut = max(0, len(text) - keep)
            text, seq.pending_text = text[:cut], text[cut:]
        else:
            seq.pending_text = ""
        output = RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=seq.new_token_ids,
            logprobs=seq.new_logprobs,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt,
            completion_tokens=seq.num_generated,
            cached_tokens=seq.cached_tokens or 0,
        )
        seq.new_token_ids, seq.new_logprobs = [], []
        if seq.finish_reason is not None:
            self._release(seq)
        return output

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []
