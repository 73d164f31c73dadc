"""The engine on a tiny random Mixtral checkpoint: batching, stops, limits, aborts."""

from __future__ import annotations

import pytest
import torch

from moemesh.worker.engine.engine import Engine
from tests.support.engine import request, run


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [torch.randint(3, 400, (5 + 3 * i,), generator=g).tolist() for i in range(n)]


class TestEngine:
    """The engine's basics; tests/model/test_cuda_engine.py runs them again on CUDA."""

    def test_a_sequence_gives_the_same_tokens_alone_or_in_a_batch(self, engine, model, tokenizer):
        batch = [request(f"r{i}", p, max_tokens=12) for i, p in enumerate(prompts(6))]
        together = run(engine, batch)
        for r in batch:
            alone = run(Engine(model, tokenizer, max_num_seqs=8, max_model_len=256), [r])
            assert together[r.request_id]["ids"] == alone[r.request_id]["ids"], f"{r.request_id} changed in a batch"

    def test_more_requests_than_slots_queue_and_all_finish(self, model, tokenizer):
        small = Engine(model, tokenizer, max_num_seqs=2, max_model_len=256)
        results = run(small, [request(f"r{i}", p, max_tokens=5) for i, p in enumerate(prompts(5))])
        assert all(r["finish"] == "length" and len(r["ids"]) == 5 for r in results.values())
        assert small.num_free_blocks == small.blocks.num_blocks, "finished sequences must free their blocks"

    def test_max_tokens_and_usage(self, engine):
        prompt = prompts(1)[0]
        result = run(engine, [request("a", prompt, max_tokens=7)])["a"]
        assert result["finish"] == "length" and len(result["ids"]) == 7
        assert result["usage"][:2] == (len(prompt), 7)

    def test_text_is_the_decoding_of_the_tokens(self, engine, tokenizer):
        result = run(engine, [request("a", prompts(1)[0], max_tokens=20)])["a"]
        assert result["text"] == tokenizer.decode(result["ids"])

    def test_stop_string_ends_the_text_before_it(self, engine, tokenizer):
        free = run(engine, [request("free", prompts(1)[0], max_tokens=30)])["free"]
        text = free["text"]
        stop = text[len(text) // 2: len(text) // 2 + 3]
        assert stop.strip(), f"need a visible stop string from {text!r}"
        stopped = run(engine, [request("s", prompts(1)[0], max_tokens=30, stop=(stop,))])["s"]
        assert stopped["finish"] == "stop"
        assert stopped["text"] == text[: text.index(stop)], "text must end right before the stop string"

    def test_seeded_sampling_is_reproducible_in_any_batch(self, engine, model, tokenizer):
        seeded = request("seeded", prompts(1)[0], max_tokens=10, temperature=1.0, seed=7)
        alone = run(engine, [seeded])["seeded"]["ids"]
        noise = [request(f"n{i}", p, max_tokens=10, temperature=1.0) for i, p in enumerate(prompts(4))]
        crowd = run(Engine(model, tokenizer, max_num_seqs=8, max_model_len=256), [*noise, seeded])
        assert crowd["seeded"]["ids"] == alone

    def test_abort_frees_the_slot_at_the_next_step(self, engine):
        engine.add(request("a", prompts(1)[0], max_tokens=100))
        engine.step()
        engine.abort("a")
        outs = engine.step()
        assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "abort")]
        assert not engine.has_work() and engine.num_free_blocks == engine.blocks.num_blocks

    def test_prompt_longer_than_the_context_is_refused(self, engine):
        from moemesh.services.core.errors import InvalidRequest

        with pytest.raises(InvalidRequest, match="prompt"):
            engine.add(request("long", [5] * 300))
