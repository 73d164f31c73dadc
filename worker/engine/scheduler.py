"""Which sequences run each step: the queues, the token budget, admission with prefix hits, and preemption.

Each step is filled oldest request first within a token budget
(`max_num_batched_tokens`): every running sequence gets its next token (a
decode) or the next chunk of its prompt (chunked prefill), then waiting
sequences join while sequence slots, budget and cache blocks last. When a
running sequence needs a block and none is free, the newest running
sequences are preempted: their blocks are released and they go back to the
head of the queue, to be recomputed later (usually from the prefix cache,
since their full blocks stay registered). No sequence fails for lack of blocks.

On admission a prompt's longest cached prefix of full blocks is reused, so
only the rest is computed; a second prefix cache (the shared KV tier) may
extend the local hits through `ExternalPrefixCache`.

Plain Python: no torch, no redis (tests drive it with plain sequences and a
`BlockManager`, no model).
"""

from __future__ import annotations

import collections
import logging
from typing import Protocol

from moemesh.worker.engine.block_manager import BlockManager
from moemesh.worker.engine.sequence import EngineCounters, Sequence

log = logging.getLogger(__name__)

# A prompt being scored (prompt logprobs) is computed in chunks of at most this many tokens.
SCORED_CHUNK_TOKENS = 256

# One sequence's share of a step: the sequence and how many of its tokens the step computes.
ScheduledChunk = tuple[Sequence, int]


class ExternalPrefixCache(Protocol):
    """A second prefix cache behind the BlockManager's (the shared KV tier), as the scheduler sees it."""

    def match(self, seq: Sequence, hashes: list[bytes], first: int, max_blocks: int) -> list:
        """Entries for blocks `first`.. (below `max_blocks`) of `seq`'s tokens that it holds, leading ones only.

        `hashes` are the chained hashes of the local hits before them (the chain starts at `seq.prefix_root`).
        """

    def load(self, blocks: list[int], matched: list) -> list[bytes]:
        """Fill freshly allocated `blocks` with `matched` entries and register them; returns their hashes."""

    def reused(self, blocks: list[int], hashes: list[bytes], seq: Sequence) -> None:
        """`seq` was admitted onto these locally cached prefix blocks (they recur)."""

    def block_filled(self, seq: Sequence, index: int, parent: bytes, tokens: list[int]) -> None:
        """Block `index` of `seq` became full and is registered under `seq.block_hashes[index]`."""


class Scheduler:
    """Waiting and running queues; picks each step's (sequence, token count) pairs and frees what leaves."""

    def __init__(
        self,
        blocks: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        counters: EngineCounters | None = None,
        external: ExternalPrefixCache | None = None,
    ) -> None:
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_num_batched_tokens}) must be at least max_num_seqs ({max_num_seqs})"
            )
        self.blocks = blocks
        self.block_size = blocks.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.counters = counters if counters is not None else EngineCounters()
        self.external = external
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # oldest admission first
        self.aborted: dict[str, str] = {}  # request id -> finish reason, applied at the next step

    # ---- queues ------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a sequence at the back; it is admitted at a coming step."""
        self.waiting.append(seq)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Mark a request to leave at the next `retire_aborted` (waiting or running)."""
        self.aborted[request_id] = reason

    def has_work(self) -> bool:
        """True while any sequence waits or runs, or an abort is pending."""
        return bool(self.waiting or self.running or self.aborted)

    def retire_aborted(self, now: float) -> list[Sequence]:
        """Take aborted sequences and those past their deadline out of the queues, freeing their blocks.

        Each gets its finish reason ("deadline" or the abort's reason); they are returned oldest first.
        """
        for seq in [*self.running, *self.waiting]:
            deadline = seq.request.deadline
            if deadline is not None and now > deadline:
                self.aborted.setdefault(seq.request_id, "deadline")
        if not self.aborted:
            return []
        leaving = [s for s in [*self.running, *self.waiting] if s.request_id in self.aborted]
        for seq in leaving:
            seq.finish_reason = self.aborted[seq.request_id]
            self.counters.aborts += 1
            self.finish(seq)
        self.aborted.clear()
        return leaving

    def finish(self, seq: Sequence) -> None:
        """Release a sequence that has finished: it leaves its queue and its blocks are freed."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table = []

    # ---- one step ------------------------------------------------------------
    def schedule(self) -> list[ScheduledChunk]:
        """This step's (sequence, new token count) pairs within the budget, preempting if blocks run out."""
        scheduled: list[ScheduledChunk] = []
        budget, preempted = self._schedule_running(scheduled)
        if not preempted:  # blocks ran short: nobody new joins until the running ones have room
            self._admit_waiting(scheduled, budget)
        return scheduled

    def advance(self, scheduled: list[ScheduledChunk]) -> None:
        """Record that a step computed its chunks: count prompt tokens, register blocks that became full."""
        for seq, count in scheduled:
            if seq.num_computed < seq.num_prompt:
                self.counters.prompt_tokens_computed += min(count, seq.num_prompt - seq.num_computed)
            seq.num_computed += count
            self._register_full_blocks(seq)

    def _schedule_running(self, scheduled: list[ScheduledChunk]) -> tuple[int, bool]:
        """Give each running sequence its next chunk, oldest first; returns (budget left, whether any was preempted)."""
        budget = self.max_num_batched_tokens
        preempted = False
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(len(seq.token_ids) - seq.num_computed, budget, self._chunk_limit(seq))
            need = self.blocks.blocks_for(seq.num_computed + count) - len(seq.block_table)
            while need > self.blocks.num_free and self.running[-1] is not seq:
                self._preempt(self.running[-1])
                preempted = True
            if need > self.blocks.num_free:  # it is the newest itself: it waits for older ones to finish
                self._preempt(seq)
                return budget, True
            seq.block_table += self.blocks.allocate(need)
            scheduled.append((seq, count))
            budget -= count
            index += 1
        return budget, preempted

    def _admit_waiting(self, scheduled: list[ScheduledChunk], budget: int) -> None:
        """Move waiting sequences into the running batch, in queue order, while slots, budget and blocks last."""
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            count = self._admit(seq, budget)
            if count == 0:
                break  # not enough free blocks for the head of the queue: it keeps its place
            self.waiting.popleft()
            self.running.append(seq)
            scheduled.append((seq, count))
            budget -= count

    def _admit(self, seq: Sequence, budget: int) -> int:
        """Give a waiting sequence its prefix-cache hits and the blocks for its first chunk; 0 if they don't fit."""
        # Leave at least one token to compute: its logits give the next token. A prompt being scored
        # computes every position.
        max_blocks = (len(seq.token_ids) - 1) // self.block_size if not seq.scores_prompt else 0
        hits, hashes = self.blocks.match_prefix(seq.token_ids, max_blocks, seq.prefix_root)
        matched = self.external.match(seq, hashes, len(hits), max_blocks) if self.external is not None else []
        computed = (len(hits) + len(matched)) * self.block_size
        count = min(len(seq.token_ids) - computed, budget, self._chunk_limit(seq))
        need = self.blocks.blocks_for(computed + count) - len(hits)
        hits_now_free = sum(1 for block in hits if self.blocks.ref_count[block] == 0)
        if need > self.blocks.num_free - hits_now_free:
            return 0
        self.blocks.take(hits)
        if self.external is not None and hits:
            self.external.reused(hits, hashes, seq)
        fresh = self.blocks.allocate(need)
        if matched:
            hashes += self.external.load(fresh[: len(matched)], matched)
        seq.block_table = hits + fresh
        seq.block_hashes = hashes
        seq.num_computed = computed
        if seq.cached_tokens is None:
            seq.cached_tokens = min(computed, seq.num_prompt)
        self.counters.prefix_hit_tokens += computed
        return count

    @staticmethod
    def _chunk_limit(seq: Sequence) -> int:
        """At most this many of the sequence's tokens in one step: a prompt being scored returns float32
        logits for every position ([T, vocab]: 600 MB for 1,024 tokens of a 150k vocabulary), so its chunks
        are kept small."""
        return SCORED_CHUNK_TOKENS if seq.scores_prompt else len(seq.token_ids)

    def _preempt(self, seq: Sequence) -> None:
        """Release a running sequence's blocks and requeue it at the front, to recompute later."""
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.block_table, seq.block_hashes, seq.num_computed = [], [], 0
        seq.num_preemptions += 1
        self.counters.preemptions += 1
        self.waiting.appendleft(seq)
        log.debug("preempted %s (%d tokens) for lack of KV blocks", seq.request_id, len(seq.token_ids))

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Make the sequence's newly completed blocks findable by later prompts (and tell the external cache)."""
        full = seq.num_computed // self.block_size
        for i in range(len(seq.block_hashes), full):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.prefix_root
            tokens = seq.token_ids[i * self.block_size : (i + 1) * self.block_size]
            seq.block_hashes.append(self.blocks.register(seq.block_table[i], parent, tokens))
            if self.external is not None:
                self.external.block_filled(seq, i, parent, tokens)
