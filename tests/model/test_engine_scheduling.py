"""Engine scheduling on a tiny random Mixtral: mixed batches, chunked prefill, prefix caching, preemption,
aborts and deadlines, penalties and logprobs, and limits.

The model's weights are drawn peaked (see tests/support/checkpoints.py), so greedy outputs do not depend on float
summation order: a sequence must give the same tokens however it is batched, chunked or recomputed.
"""

from __future__ import annotations

import time

import pytest
import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.worker.engine.engine import Engine
from tests.support.engine import random_prompt, record, request, run


def repeats(ids: list[int]) -> int:
    return len(ids) - len(set(ids))


PREEMPTION_PARAMS = {
    "greedy": {},
    "seeded": {"temperature": 1.0},
    "penalized": {"repetition_penalty": 1.5, "frequency_penalty": 0.5},
}


class TestEngineScheduling:
    """Scheduling through the engine; tests/model/test_cuda_engine.py runs it again on CUDA."""

    def test_sixteen_mixed_lengths_give_the_same_tokens_alone_or_together(self, make_engine):
        lengths = [3 + (57 * i) // 15 for i in range(16)]  # 3 .. 60
        assert min(lengths) == 3 and max(lengths) == 60 and len(set(lengths)) == 16
        order = [5, 12, 0, 9, 15, 3, 7, 1, 14, 10, 2, 8, 13, 4, 11, 6]  # not sorted by length
        batch = [request(f"r{i}", random_prompt(lengths[i], seed=i), max_tokens=10 + i % 7) for i in order]
        engine = make_engine(max_num_seqs=16)
        together = run(engine, batch)
        assert engine.counters.steps <= 17, "all 16 should run at once"
        for r in batch:
            alone = run(make_engine(max_num_seqs=16), [r])[r.request_id]
            got = together[r.request_id]
            assert got["finish"] == "length" and len(got["ids"]) == r.params.max_tokens
            assert got["ids"] == alone["ids"], f"{r.request_id} ({len(r.prompt_token_ids)} tokens) changed in the batch"
        assert engine.num_free_blocks == engine.blocks.num_blocks

    def test_a_long_prompt_is_prefilled_in_chunks_while_another_request_keeps_decoding(self, make_engine):
        budget = 16
        engine = make_engine(max_num_seqs=4, max_num_batched_tokens=budget)
        dec = request("dec", random_prompt(5, seed=1), max_tokens=14)
        long = request("long", random_prompt(60, seed=2), max_tokens=4)
        results: dict = {}
        engine.add(dec)
        for out in engine.step():
            record(results, out)
        assert len(results["dec"]["ids"]) == 1, "the short prompt is prefilled in one step"
        engine.add(long)
        steps = []  # per step: (tokens out for dec, tokens out for long, prompt tokens computed)
        while engine.has_work():
            before = engine.counters.prompt_tokens_computed
            outs = engine.step()
            for out in outs:
                record(results, out)
            by_id = {o.request_id: len(o.token_ids) for o in outs}
            steps.append((by_id.get("dec", 0), by_id.get("long", 0), engine.counters.prompt_tokens_computed - before))
            assert len(steps) < 100
        first_long = next(i for i, s in enumerate(steps) if s[1])
        # Each step the decode takes 1 token of the budget, the long prompt the other 15: ceil(60 / 15) = 4 steps.
        assert first_long == 3, f"the 60-token prompt gave its first token at step {first_long}: {steps}"
        assert [s[2] for s in steps[: first_long + 1]] == [15, 15, 15, 15]
        dec_steps = steps[: dec.params.max_tokens - 1]
        assert all(s[0] == 1 for s in dec_steps), f"the decoding request must get a token every step: {steps}"
        # Tokens computed per step: prompt chunks, plus the decodes (the long request's once its prompt is done).
        assert all(s[2] + s[0] + (s[1] if s[2] == 0 else 0) <= budget for s in steps), f"over the budget: {steps}"
        assert results["long"]["finish"] == "length" and results["dec"]["finish"] == "length"

        roomy = run(make_engine(max_num_seqs=4), [dec, long])
        assert results["dec"]["ids"] == roomy["dec"]["ids"]
        assert results["long"]["ids"] == roomy["long"]["ids"], "chunked prefill changed the output"
        assert engine.num_free_blocks == engine.blocks.num_blocks

    def test_a_prompt_alone_is_split_into_budget_sized_chunks(self, make_engine):
        engine = make_engine(max_num_seqs=2, max_num_batched_tokens=16)
        engine.add(request("long", random_prompt(60, seed=2), max_tokens=3))
        computed = []
        ids = []
        while engine.has_work():
            before = engine.counters.prompt_tokens_computed
            ids += [t for o in engine.step() for t in o.token_ids]
            computed.append(engine.counters.prompt_tokens_computed - before)
        assert computed[:4] == [16, 16, 16, 12] and sum(computed) == 60
        assert len(ids) == 3 and engine.counters.steps == 4 + 2
        assert ids == run(make_engine(), [request("long", random_prompt(60, seed=2), max_tokens=3)])["long"]["ids"]

    def test_a_shared_prefix_is_served_from_the_cache(self, make_engine):
        engine = make_engine()  # block size 16
        first = random_prompt(40, seed=7)
        run(engine, [request("first", first, max_tokens=6)])
        assert engine.counters.prompt_tokens_computed == 40 and engine.counters.prefix_hit_tokens == 0

        second = first[:32] + random_prompt(8, seed=8)
        assert second[32:] != first[32:40]
        hits, computed = engine.counters.prefix_hit_tokens, engine.counters.prompt_tokens_computed
        got = run(engine, [request("second", second, max_tokens=6)])["second"]
        assert got["usage"] == (40, 6, 32), "the 2 full shared blocks are cached"
        assert engine.counters.prefix_hit_tokens - hits == 32
        assert engine.counters.prompt_tokens_computed - computed == 8

        uncached = make_engine(enable_prefix_caching=False)
        expected = run(uncached, [request("second", second, max_tokens=6)])["second"]
        assert expected["usage"] == (40, 6, 0) and uncached.counters.prompt_tokens_computed == 40
        assert got["ids"] == expected["ids"], "a prefix-cache hit changed the output"
        assert engine.num_free_blocks == engine.blocks.num_blocks, "cached blocks count as free"

    @pytest.mark.parametrize(("length", "cached"), [(40, 32), (33, 32), (32, 16), (16, 0), (5, 0)])
    def test_a_repeated_prompt_hits_every_full_block_but_recomputes_at_least_one_token(self, make_engine, length, cached):
        engine = make_engine()
        prompt = random_prompt(length, seed=9)
        first = run(engine, [request("a", prompt, max_tokens=5)])["a"]
        computed = engine.counters.prompt_tokens_computed
        again = run(engine, [request("b", prompt, max_tokens=5)])["b"]
        assert again["usage"] == (length, 5, cached)
        assert engine.counters.prompt_tokens_computed - computed == length - cached >= 1
        assert again["ids"] == first["ids"]

    def test_a_continuation_reuses_the_blocks_of_generated_tokens(self, make_engine):
        engine = make_engine()
        prompt = random_prompt(20, seed=10)
        turn = run(engine, [request("turn", prompt, max_tokens=30)])["turn"]
        # 20 + 30 tokens, the last never computed: blocks 0..2 (48 tokens) are full and registered.
        follow = prompt + turn["ids"] + random_prompt(6, seed=11)
        got = run(engine, [request("follow", follow, max_tokens=5)])["follow"]
        assert got["usage"][2] == 48
        assert got["ids"] == run(make_engine(enable_prefix_caching=False), [request("f", follow, max_tokens=5)])["f"]["ids"]

    def test_a_request_joining_during_a_chunked_prefill_reuses_the_blocks_done_so_far(self, make_engine):
        engine = make_engine(max_num_batched_tokens=16)
        prompt = random_prompt(60, seed=12)
        engine.add(request("a", prompt, max_tokens=3))
        engine.step()
        engine.step()  # 32 tokens computed: 2 full blocks registered
        results = run(engine, [request("b", prompt[:40], max_tokens=3)])
        assert results["b"]["usage"][2] == 32
        assert results["b"]["ids"] == run(make_engine(), [request("b", prompt[:40], max_tokens=3)])["b"]["ids"]

    @pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
    @pytest.mark.parametrize("mode", list(PREEMPTION_PARAMS))
    def test_preempted_sequences_are_recomputed_and_give_the_same_output(self, make_engine, mode, caching):
        # 4 sequences of up to 20 + 40 = 60 positions need 4 x 15 blocks of 4; the pool has 20.
        max_tokens = 40
        params = dict(max_tokens=max_tokens, **PREEMPTION_PARAMS[mode])
        batch = [
            request(f"r{i}", random_prompt(length, seed=20 + i), seed=100 + i, **params)
            for i, length in enumerate([17, 20, 18, 19])
        ]
        tight = make_engine(max_num_seqs=4, max_model_len=80, block_size=4, num_blocks=20, enable_prefix_caching=caching)
        assert tight.max_model_len == 80
        got = run(tight, batch)
        assert tight.counters.preemptions > 0, "the pool was meant to run out"
        if caching:  # a preempted sequence's full blocks stay registered: its recompute starts from them
            assert tight.counters.prefix_hit_tokens > 0
        else:
            assert tight.counters.prefix_hit_tokens == 0
        assert tight.num_free_blocks == tight.blocks.num_blocks == 20, "blocks leaked"
        assert all(r["finish"] == "length" and len(r["ids"]) == max_tokens for r in got.values()), got
        expected = run(make_engine(max_num_seqs=4), batch)
        for rid in expected:
            assert got[rid]["ids"] == expected[rid]["ids"], f"{rid} changed after preemption ({mode})"
            assert got[rid]["text"] == expected[rid]["text"]
            assert got[rid]["usage"][:2] == expected[rid]["usage"][:2]

    def test_a_sequence_longer_than_half_the_pool_still_finishes(self, make_engine):
        # Two sequences that each need 12 of 16 blocks: they must take turns, never deadlock.
        tight = make_engine(max_num_seqs=2, max_model_len=64, block_size=4, num_blocks=16)
        batch = [request(f"r{i}", random_prompt(10, seed=30 + i), max_tokens=36) for i in range(2)]
        got = run(tight, batch)
        assert tight.counters.preemptions > 0
        assert all(len(r["ids"]) == 36 and r["finish"] == "length" for r in got.values())
        expected = run(make_engine(), batch)
        assert {k: v["ids"] for k, v in got.items()} == {k: v["ids"] for k, v in expected.items()}
        assert tight.num_free_blocks == 16

    def test_aborting_a_waiting_then_a_running_request_frees_their_blocks(self, make_engine):
        engine = make_engine(max_num_seqs=1)
        engine.add(request("running", random_prompt(20, seed=40), max_tokens=50))
        engine.add(request("waiting", random_prompt(20, seed=41), max_tokens=50))
        engine.step()
        assert engine.num_running == 1 and engine.num_waiting == 1
        assert engine.num_free_blocks < engine.blocks.num_blocks
        engine.abort("waiting")
        outs = engine.step()
        assert [(o.request_id, o.finish_reason) for o in outs] == [("waiting", "abort"), ("running", None)]
        assert engine.num_waiting == 0 and engine.num_running == 1
        engine.abort("running")
        outs = engine.step()
        assert [(o.request_id, o.finish_reason, o.token_ids) for o in outs] == [("running", "abort", [])]
        assert outs[0].completion_tokens == 2
        assert not engine.has_work() and engine.num_free_blocks == engine.blocks.num_blocks
        assert engine.blocks.ref_count == [0] * engine.blocks.num_blocks

    def test_aborting_a_request_mid_prefill_frees_its_blocks(self, make_engine):
        engine = make_engine(max_num_batched_tokens=16)
        engine.add(request("long", random_prompt(60, seed=42), max_tokens=5))
        assert engine.step() == []
        engine.abort("long")
        assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("long", "abort")]
        assert not engine.has_work() and engine.num_free_blocks == engine.blocks.num_blocks

    def test_a_past_deadline_ends_a_request_with_deadline(self, make_engine):
        engine = make_engine()
        engine.add(request("late", random_prompt(10, seed=43), max_tokens=5, deadline=time.time() - 1))
        outs = engine.step()
        assert [(o.request_id, o.finish_reason, o.token_ids) for o in outs] == [("late", "deadline", [])]
        assert not engine.has_work() and engine.num_free_blocks == engine.blocks.num_blocks

    def test_a_deadline_passing_while_running_ends_the_request(self, make_engine):
        engine = make_engine()
        engine.add(request("soon", random_prompt(10, seed=44), max_tokens=100, deadline=time.time() + 0.2))
        engine.add(request("other", random_prompt(10, seed=45), max_tokens=3))
        results: dict = {}
        for out in engine.step():
            record(results, out)
        assert results["soon"]["ids"] and results["soon"]["finish"] is None
        time.sleep(0.25)
        for _ in range(10):
            if not engine.has_work():
                break
            for out in engine.step():
                record(results, out)
        assert results["soon"]["finish"] == "deadline" and results["other"]["finish"] == "length"
        assert engine.num_free_blocks == engine.blocks.num_blocks

    def test_repetition_penalty_changes_the_output_and_repeats_fewer_tokens(self, make_engine):
        prompt = random_prompt(6, seed=5)
        plain = run(make_engine(), [request("plain", prompt, max_tokens=40)])["plain"]["ids"]
        penalized_request = request("pen", prompt, max_tokens=40, repetition_penalty=2.0)
        penalized = run(make_engine(), [penalized_request])["pen"]["ids"]
        assert penalized != plain
        assert repeats(plain) > 0, f"the unpenalized output should repeat itself: {plain}"
        assert repeats(penalized) < repeats(plain), (plain, penalized)
        # Penalties use the row's own history: batching with unpenalized requests changes nothing.
        noise = [request(f"n{i}", random_prompt(8 + i, seed=50 + i), max_tokens=40) for i in range(3)]
        crowd = run(make_engine(), [*noise, penalized_request])
        assert crowd["pen"]["ids"] == penalized

    def test_logprobs_come_with_every_token(self, make_engine):
        prompt = random_prompt(12, seed=60)
        batch = [
            request("top3", prompt, max_tokens=12, logprobs=3),
            request("chosen", prompt, max_tokens=12, logprobs=0),
            request("none", prompt, max_tokens=12),
            request("sampled", prompt, max_tokens=12, logprobs=3, temperature=1.0, seed=1),
            request("penalized", prompt, max_tokens=12, logprobs=3, repetition_penalty=2.0),
        ]
        results = run(make_engine(max_num_seqs=8), batch)
        assert results["none"]["logprobs"] == []
        assert results["chosen"]["ids"] == results["top3"]["ids"] == results["none"]["ids"]
        for rid in ("top3", "chosen", "sampled", "penalized"):
            ids, logprobs = results[rid]["ids"], results[rid]["logprobs"]
            assert len(logprobs) == len(ids) == 12, rid
            for token, lp in zip(ids, logprobs):
                assert lp.token_id == token and lp.logprob <= 0.0
                if rid == "chosen":
                    assert lp.top == []
                    continue
                values = [v for _, v in lp.top]
                assert len(lp.top) == 3 and values == sorted(values, reverse=True), lp
                assert sum(torch.tensor(values).exp().tolist()) <= 1.0 + 1e-5
                if rid == "sampled":
                    assert lp.logprob <= values[0] + 1e-6
                    if token in dict(lp.top):
                        assert dict(lp.top)[token] == pytest.approx(lp.logprob)
                else:  # greedy: the chosen token is the best one, under the penalized logits too
                    assert lp.top[0] == (token, pytest.approx(lp.logprob, abs=1e-6)), (rid, lp)
        for a, b in zip(results["top3"]["logprobs"], results["chosen"]["logprobs"]):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)

    def test_a_prompt_too_long_for_the_context_is_refused(self, make_engine):
        engine = make_engine(max_model_len=64)
        with pytest.raises(InvalidRequest, match="prompt") as error:
            engine.add(request("long", random_prompt(64, seed=70)))
        assert error.value.field == "prompt"
        with pytest.raises(InvalidRequest, match="prompt"):
            engine.add(request("empty", []))
        assert not engine.has_work()
        # The longest allowed prompt fits; it stops at the context limit.
        got = run(engine, [request("fits", random_prompt(63, seed=70), max_tokens=10)])["fits"]
        assert got["finish"] == "context" and len(got["ids"]) == 1

    def test_the_context_is_capped_by_the_cache_size(self, make_engine):
        engine = make_engine(max_model_len=256, num_blocks=4, block_size=16)
        assert engine.max_model_len == 64
        with pytest.raises(InvalidRequest, match="prompt"):
            engine.add(request("long", random_prompt(64, seed=71)))

    def test_a_token_budget_below_the_sequence_slots_is_refused(self, model, tokenizer):
        with pytest.raises(ValueError, match="max_num_batched_tokens"):
            Engine(model, tokenizer, max_num_seqs=8, max_model_len=128, max_num_batched_tokens=4)
        engine = Engine(model, tokenizer, max_num_seqs=8, max_model_len=128, max_num_batched_tokens=8)
        assert engine.max_num_batched_tokens == 8
