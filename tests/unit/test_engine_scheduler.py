"""The engine's scheduler on its own: plain sequences and a BlockManager, no model and no checkpoint.

A step is played by `step`, a stand-in for the model: the scheduler picks the
chunks, they count as computed, and every sequence whose chunk reached its
last token gains one generated token.
"""

from __future__ import annotations

import pytest

from moemesh.worker.engine.block_manager import BlockManager
from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.scheduler import SCORED_CHUNK_TOKENS, Scheduler
from moemesh.worker.engine.sequence import Sequence

BLOCK = 4
GENERATED_TOKEN = 999


def make_scheduler(num_blocks: int = 64, *, max_num_seqs: int = 4, budget: int = 64, **options) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **options)


def sequence(rid: str, prompt: list[int] | int, deadline: float | None = None) -> Sequence:
    """A sequence for a prompt of the given tokens (or of that many distinct ones, unique to `rid`)."""
    if isinstance(prompt, int):
        offset = 1000 * (sum(map(ord, rid)) % 97)
        prompt = list(range(offset, offset + prompt))
    request = GenerationRequest(rid, tuple(prompt), SamplingParams(), deadline=deadline)
    return Sequence.from_request(request, detokenizer=None)  # no resumed tokens: nothing to decode


def step(scheduler: Scheduler) -> list[tuple[str, int]]:
    """Schedule and 'run' one step; returns (request id, tokens computed) in batch order."""
    scheduled = scheduler.schedule()
    scheduler.advance(scheduled)
    for seq, _ in scheduled:
        if seq.num_computed == len(seq.token_ids):
            seq.token_ids.append(GENERATED_TOKEN)
            seq.num_generated += 1
    return [(seq.request_id, count) for seq, count in scheduled]


def ids(queue) -> list[str]:
    return [seq.request_id for seq in queue]


# ---- the token budget -------------------------------------------------------------------------


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_that_fill_it():
    scheduler = make_scheduler(budget=16)
    scheduler.add(sequence("long", 40))
    steps = [step(scheduler) for _ in range(4)]
    assert steps == [[("long", 16)], [("long", 16)], [("long", 8)], [("long", 1)]], \
        "40 prompt tokens under a budget of 16 must run as chunks of 16, 16 and 8, then decode one token per step"


def test_running_sequences_are_served_first_and_a_joining_prompt_gets_the_budget_left():
    scheduler = make_scheduler(budget=16)
    scheduler.add(sequence("decoding", 5))
    step(scheduler)
    scheduler.add(sequence("joining", 30))
    assert step(scheduler) == [("decoding", 1), ("joining", 15)], "the decode must come first, the prompt takes the rest"
    assert step(scheduler) == [("decoding", 1), ("joining", 15)]
    assert step(scheduler) == [("decoding", 1), ("joining", 1)], "the prompt's last token yields its first output"


def test_no_sequence_is_admitted_once_the_budget_is_spent():
    scheduler = make_scheduler(budget=8)
    scheduler.add(sequence("a", 8))
    scheduler.add(sequence("b", 3))
    assert step(scheduler) == [("a", 8)], "b must wait: a's prompt used the whole budget"
    assert ids(scheduler.waiting) == ["b"]
    assert step(scheduler) == [("a", 1), ("b", 3)]


def test_the_budget_must_cover_every_sequence_slot():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(max_num_seqs=8, budget=4)


# ---- admission ----------------------------------------------------------------------------------


def test_waiting_sequences_are_admitted_in_arrival_order():
    scheduler = make_scheduler()
    for rid, length in [("first", 9), ("second", 2), ("third", 5)]:
        scheduler.add(sequence(rid, length))
    assert step(scheduler) == [("first", 9), ("second", 2), ("third", 5)], "admission must follow arrival order"
    assert ids(scheduler.running) == ["first", "second", "third"]


def test_no_more_sequences_run_than_the_slot_limit():
    scheduler = make_scheduler(max_num_seqs=2)
    for rid in ("a", "b", "c"):
        scheduler.add(sequence(rid, 3))
    assert [rid for rid, _ in step(scheduler)] == ["a", "b"], "only two sequence slots exist"
    assert ids(scheduler.waiting) == ["c"]
    scheduler.finish(scheduler.running[0])
    assert step(scheduler) == [("b", 1), ("c", 3)], "a freed slot must admit the next waiting sequence"


def test_a_waiting_sequence_that_does_not_fit_keeps_its_place_and_later_ones_wait_behind_it():
    scheduler = make_scheduler(num_blocks=4)
    scheduler.add(sequence("big", 11))  # 3 blocks
    step(scheduler)
    scheduler.add(sequence("next", 8))  # 2 blocks; 1 is free
    scheduler.add(sequence("small", 2))  # 1 block: it would fit, but must not jump the queue
    assert step(scheduler) == [("big", 1)]
    assert ids(scheduler.waiting) == ["next", "small"], "the head of the queue keeps its place"
    assert scheduler.counters.preemptions == 0, "admission never preempts a running sequence"


def test_a_prefix_cache_hit_is_counted_and_skips_its_computation():
    scheduler = make_scheduler()
    shared = list(range(100, 108))  # two full blocks
    first = sequence("first", shared + [1, 2, 3, 4, 5])
    scheduler.add(first)
    step(scheduler)
    scheduler.finish(first)
    assert scheduler.counters.prefix_hit_tokens == 0
    scheduler.add(sequence("second", shared + [7, 8]))
    assert step(scheduler) == [("second", 2)], "only the tokens after the cached prefix are computed"
    second = scheduler.running[0]
    assert second.cached_tokens == 8 and second.num_computed == 10
    assert scheduler.counters.prefix_hit_tokens == 8, "the two reused blocks count as prefix hits"
    assert scheduler.counters.prompt_tokens_computed == 13 + 2


def test_a_prompt_found_whole_in_the_cache_still_computes_its_last_token():
    scheduler = make_scheduler()
    prompt = list(range(200, 212))  # three full blocks
    first = sequence("first", prompt)
    scheduler.add(first)
    step(scheduler)
    scheduler.finish(first)
    scheduler.add(sequence("again", prompt))
    assert step(scheduler) == [("again", 4)], "the last block is recomputed: its last token's logits give the output"
    assert scheduler.running[0].cached_tokens == 8


# ---- preemption ---------------------------------------------------------------------------------


def test_the_newest_running_sequence_is_preempted_when_blocks_run_out():
    scheduler = make_scheduler(num_blocks=6)
    for rid in ("old", "middle", "new"):
        scheduler.add(sequence(rid, 8))  # 2 blocks each: the pool is full
    step(scheduler)
    assert scheduler.blocks.num_free == 0
    assert step(scheduler) == [("old", 1), ("middle", 1)], "the two older sequences keep running"
    assert ids(scheduler.waiting) == ["new"], "the newest goes back to the head of the queue"
    preempted = scheduler.waiting[0]
    assert preempted.block_table == [] and preempted.num_computed == 0 and preempted.num_preemptions == 1
    assert scheduler.counters.preemptions == 1


def test_the_newest_sequence_preempts_itself_and_waits_when_only_it_lacks_a_block():
    scheduler = make_scheduler(num_blocks=5)
    scheduler.add(sequence("older", 8))
    scheduler.add(sequence("newest", 8))
    step(scheduler)  # 4 of 5 blocks taken; both need a third block next
    assert step(scheduler) == [("older", 1)], "the older sequence takes the last block"
    assert ids(scheduler.running) == ["older"] and ids(scheduler.waiting) == ["newest"]
    assert step(scheduler) == [("older", 1)], "with no block to spare the newest keeps waiting"
    assert ids(scheduler.waiting) == ["newest"] and scheduler.counters.preemptions == 1


def test_a_preempted_sequence_resumes_from_its_blocks_still_cached():
    scheduler = make_scheduler(num_blocks=6)
    scheduler.add(sequence("old", 8))  # 2 full blocks: it needs a third next step
    scheduler.add(sequence("middle", 6))  # room to grow in its second block
    scheduler.add(sequence("new", 8))
    step(scheduler)
    step(scheduler)  # "new" is preempted; "old" takes one of its blocks (a freed sequence's tail goes first)
    scheduler.finish(scheduler.running[0])
    assert step(scheduler) == [("middle", 1), ("new", 5)], "new's first block is still cached: 4 of 9 tokens are reused"
    assert scheduler.counters.prefix_hit_tokens == 4


# ---- leaving ------------------------------------------------------------------------------------


def test_aborted_sequences_leave_their_queues_and_free_their_blocks():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add(sequence("running", 6))
    scheduler.add(sequence("waiting", 6))
    step(scheduler)
    scheduler.abort("waiting")
    scheduler.abort("running", "cancelled")
    leaving = scheduler.retire_aborted(now=0.0)
    assert [(s.request_id, s.finish_reason) for s in leaving] == [("running", "cancelled"), ("waiting", "abort")]
    assert not scheduler.running and not scheduler.waiting and not scheduler.has_work()
    assert scheduler.blocks.num_free == scheduler.blocks.num_blocks, "an aborted sequence's blocks must be freed"
    assert scheduler.blocks.ref_count == [0] * scheduler.blocks.num_blocks
    assert scheduler.counters.aborts == 2


def test_an_abort_is_pending_work_until_it_is_retired():
    scheduler = make_scheduler()
    scheduler.abort("unknown")
    assert scheduler.has_work(), "a pending abort must get a step"
    assert scheduler.retire_aborted(now=0.0) == [] and not scheduler.has_work()


def test_a_sequence_past_its_deadline_leaves_with_reason_deadline():
    scheduler = make_scheduler()
    scheduler.add(sequence("late", 5, deadline=100.0))
    scheduler.add(sequence("timely", 5, deadline=300.0))
    step(scheduler)
    leaving = scheduler.retire_aborted(now=200.0)
    assert [(s.request_id, s.finish_reason) for s in leaving] == [("late", "deadline")]
    assert ids(scheduler.running) == ["timely"]


# ---- an external prefix cache -------------------------------------------------------------------


class ExternalCache:
    """Holds the first `held` blocks of every prompt; loads them as made-up hashes and records what it is told."""

    def __init__(self, held: int) -> None:
        self.held = held
        self.loaded: list[int] = []
        self.reused_blocks: list[int] = []
        self.filled: list[tuple[str, int]] = []

    def match(self, token_ids, hashes, first, max_blocks):
        return list(range(first, min(self.held, max_blocks)))

    def load(self, blocks, matched):
        self.loaded += blocks
        return [bytes([index]) * 16 for index in matched]

    def reused(self, blocks, hashes, token_ids):
        self.reused_blocks += blocks

    def block_filled(self, seq, index, parent, tokens):
        self.filled.append((seq.request_id, index))


def test_an_external_prefix_cache_extends_the_local_hits():
    external = ExternalCache(held=2)
    scheduler = make_scheduler(external=external)
    scheduler.add(sequence("a", 13))
    assert step(scheduler) == [("a", 5)], "8 of 13 tokens come from the external cache"
    seq = scheduler.running[0]
    assert external.loaded == seq.block_table[:2], "the fetched blocks are the sequence's first two"
    assert seq.cached_tokens == 8 and scheduler.counters.prefix_hit_tokens == 8
    assert external.filled == [("a", 2)], "only the computed block that became full is reported"


def test_a_prompt_being_scored_is_computed_in_bounded_chunks():
    scheduler = make_scheduler(num_blocks=256, budget=2048)
    scored, other = sequence("scored", 600), sequence("other", 600)
    scored.prompt_logprobs = []  # asked for; the model runner appends one entry per position computed
    for seq in (scored, other):
        scheduler.add(seq)
    first = dict(step(scheduler))
    assert first == {"scored": SCORED_CHUNK_TOKENS, "other": 600}  # the budget went to the unscored prompt
    scored.prompt_logprobs += [None] * SCORED_CHUNK_TOKENS
    assert dict(step(scheduler))["scored"] == SCORED_CHUNK_TOKENS
