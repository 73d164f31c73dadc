"""Grammar-constrained decoding and prompt scoring in the engine, on a tiny random checkpoint.

The checkpoint's free output is noise, which makes these tests strict: every
constrained output must still parse and validate, whatever the weights say.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from moemesh.services.core.errors import InvalidRequest
from moemesh.v1 import common_pb2
from moemesh.worker.engine.grammar import allowed_tokens, unpack_by_shifts
from tests.support.checkpoints import FAMILIES
from tests.support.engine import random_prompt, request, run

INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "number": {"type": "string", "pattern": "^INV-[0-9]{3}$"},
        "status": {"enum": ["open", "paid", "void"]},
        # Decimals bounded by multipleOf: a random model would otherwise write digits until max_tokens.
        "total": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25},
        "discount": {"type": "number", "minimum": 0.125, "exclusiveMaximum": 0.5, "multipleOf": 0.125},
        "lines": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "maxLength": 6},
                               "quantity": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "quantity"], "additionalProperties": False,
            },
        },
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 8}, "vip": {"type": "boolean"}},
            "required": ["name"], "additionalProperties": False,
        },
        "note": {"type": "string", "maxLength": 5},
    },
    "required": ["number", "status", "total", "lines", "customer"],
    "additionalProperties": False,
}


def spec(**kind) -> common_pb2.StructuredOutput:
    return common_pb2.StructuredOutput(**kind)


# ---- prompt logprobs and max_tokens 0 ------------------------------------------------------------------------
def reference_prompt_logprobs(hf_model, prompt: list[int]) -> torch.Tensor:
    """transformers' log-probabilities [T - 1, V] of prompt tokens 1.. given the ones before."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt])).logits[0].float()
    return logits[:-1].log_softmax(dim=-1)


class TestStructuredOutputs:
    """Constrained decoding in the engine (rerun on CUDA by test_cuda_engine.py)."""

    @pytest.fixture
    def grammar(self, engine):
        """Compiles a structured-output field against the engine's tokenizer."""
        return lambda **kind: engine.grammars.compile_spec(spec(**kind))

    @pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=7),
                                          dict(temperature=1.3, top_p=0.9, seed=11)])
    def test_json_schema_outputs_parse_and_validate(self, engine, grammar, sampling):
        compiled = grammar(json_schema=json.dumps(INVOICE_SCHEMA))
        requests = [request(f"r{i}", random_prompt(12, i), max_tokens=250, grammar=compiled, **sampling)
                    for i in range(4)]
        results = run(engine, requests)
        for rid, result in results.items():
            assert result["finish"] == "stop", f"{rid} ended with {result['finish']}: {result['text']!r}"
            jsonschema.validate(json.loads(result["text"]), INVOICE_SCHEMA)


    def test_json_object_regex_choice_and_lark_outputs_match(self, engine, grammar):
        requests = [
            # An unconstrained key or string from a random model runs on for hundreds of tokens; this prompt's
            # greedy answer closes (the schema tests above check full objects).
            request("object", random_prompt(9, 6), max_tokens=200, grammar=grammar(json_object=True)),
            request("regex", random_prompt(9, 2), max_tokens=40, grammar=grammar(regex=r"[A-Z]{2}-[0-9]{2,4}")),
            request("choice", random_prompt(9, 3), max_tokens=40,
                    grammar=grammar(choice=common_pb2.Choices(options=["urgent", "normal", "low priority"]))),
            request("lark", random_prompt(9, 4), max_tokens=60, temperature=1.0, seed=5,
                    grammar=grammar(grammar='start: "total=" NUMBER ";"\nNUMBER: /[1-9][0-9]{0,3}/')),
            request("gbnf", random_prompt(9, 5), max_tokens=60, grammar=grammar(grammar='root ::= ("yes" | "no") "!"')),
        ]
        results = run(engine, requests)
        assert all(r["finish"] == "stop" for r in results.values()), results
        assert isinstance(json.loads(results["object"]["text"]), dict)
        assert re.fullmatch(r"[A-Z]{2}-[0-9]{2,4}", results["regex"]["text"])
        assert results["choice"]["text"] in ("urgent", "normal", "low priority")
        assert re.fullmatch(r"total=[1-9][0-9]{0,3};", results["lark"]["text"])
        assert results["gbnf"]["text"] in ("yes!", "no!")


    def test_free_requests_in_a_mixed_batch_get_what_they_get_alone(self, make_engine, grammar):
        free = [request("greedy", random_prompt(10, 20), max_tokens=12),
                request("seeded", random_prompt(10, 21), max_tokens=12, temperature=1.0, seed=4)]
        alone = run(make_engine(), free)
        constrained = [request(f"json{i}", random_prompt(10, 30 + i), max_tokens=80, temperature=1.0, seed=i,
                               grammar=grammar(json_schema=json.dumps(INVOICE_SCHEMA))) for i in range(2)]
        mixed = run(make_engine(), [*constrained, *free])
        for rid in ("greedy", "seeded"):
            assert mixed[rid]["ids"] == alone[rid]["ids"]


    def test_the_grammar_end_stops_even_a_request_that_ignores_eos(self, engine, grammar):
        result = run(engine, [request("r", random_prompt(8, 1), max_tokens=50, ignore_eos=True,
                                      grammar=grammar(choice=common_pb2.Choices(options=["ok"])))])["r"]
        assert (result["text"], result["finish"]) == ("ok", "stop")


    def test_seeded_constrained_output_is_reproducible(self, make_engine, grammar):
        def once():
            compiled = grammar(json_schema=json.dumps(INVOICE_SCHEMA))
            return run(make_engine(), [request("r", random_prompt(10, 3), max_tokens=250, temperature=1.0, seed=9,
                                               grammar=compiled)])["r"]["text"]

        assert once() == once()


    def test_a_grammar_is_compiled_once_per_distinct_text(self, engine, grammar):
        before = engine.grammars.compiled
        first = grammar(regex="[0-9]{3}")
        assert grammar(regex="[0-9]{3}") is first
        grammar(regex="[0-9]{4}")
        assert engine.grammars.compiled == before + 2


    @pytest.mark.parametrize(("kind", "field", "message"), [
        (dict(json_schema='{"type": "frob"}'), "sampling.structured.json_schema", "frob"),
        (dict(json_schema="{not json"), "sampling.structured.json_schema", "not valid JSON"),
        (dict(json_schema="[1, 2]"), "sampling.structured.json_schema", "must be a JSON object"),
        (dict(json_schema='{"type": "string", "format": "frob"}'), "sampling.structured.json_schema", "format"),
        (dict(regex="a(?=b)"), "sampling.structured.regex", "look-around"),
        (dict(regex="x" * 20000), "sampling.structured.regex", "bytes"),
        (dict(grammar="start: undefined_rule"), "sampling.structured.grammar", "undefined_rule"),
        (dict(grammar="root ::= ("), "sampling.structured.grammar", "Expected"),
        (dict(choice=common_pb2.Choices()), "sampling.structured.choice.options", "1..256"),
        (dict(choice=common_pb2.Choices(options=["ok", ""])), "sampling.structured.choice.options[1]", "bytes"),
        (dict(json_object=False), "sampling.structured.json_object", "true"),
        ({}, "sampling.structured", "must set one"),
    ])
    def test_invalid_or_unsupported_grammars_name_their_field(self, engine, kind, field, message):
        with pytest.raises(InvalidRequest) as raised:
            engine.grammars.compile_spec(spec(**kind))
        assert raised.value.field == field
        assert message in str(raised.value)


class TestPromptScoring:
    """Prompt logprobs and max_tokens 0 (rerun on CUDA by test_cuda_engine.py)."""

    @pytest.fixture(scope="class")
    def hf_model(self, checkpoint_dir):
        """transformers' model of the same checkpoint, float32 on the CPU: the reference."""
        return FAMILIES["mixtral"].reference(checkpoint_dir)

    @pytest.mark.parametrize("chunk", [None, 16])
    def test_prompt_logprobs_equal_transformers_log_softmax(self, make_engine, hf_model, chunk):
        prompt = random_prompt(40, 8)
        engine = make_engine(max_num_batched_tokens=chunk) if chunk else make_engine()
        result = run(engine, [request("r", prompt, max_tokens=2, prompt_logprobs=3)])["r"]
        entries = result["prompt_logprobs"]
        assert [e.token_id for e in entries] == prompt
        assert (entries[0].logprob, entries[0].top) == (0.0, [])
        reference = reference_prompt_logprobs(hf_model, prompt)
        ours = torch.tensor([e.logprob for e in entries[1:]])
        expected = reference.gather(1, torch.tensor(prompt[1:]).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)
        top_values, top_ids = reference.topk(3, dim=-1)
        for entry, ids, values in zip(entries[1:], top_ids.tolist(), top_values.tolist()):
            assert [t for t, _ in entry.top] == ids
            torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), torch.tensor(values), atol=1e-4, rtol=0)


    def test_a_cached_prefix_still_gets_its_prompt_scored(self, engine):
        prompt = random_prompt(48, 9)
        first = run(engine, [request("a", prompt, max_tokens=1)])["a"]
        assert first["prompt_logprobs"] == []  # not asked for
        scored = run(engine, [request("b", prompt, max_tokens=1, prompt_logprobs=0)])["b"]
        assert len(scored["prompt_logprobs"]) == len(prompt)
        assert scored["usage"][2] == 0  # nothing reused: a cached position has no logits
        again = run(engine, [request("c", prompt, max_tokens=1)])["c"]
        assert again["usage"][2] > 0  # the scored prompt's blocks serve later prompts as usual


    def test_max_tokens_zero_scores_the_prompt_and_generates_nothing(self, engine, hf_model):
        prompt = random_prompt(20, 10)
        result = run(engine, [request("r", prompt, max_tokens=0, prompt_logprobs=0)])["r"]
        assert (result["ids"], result["text"], result["finish"]) == ([], "", "length")
        assert result["usage"][:2] == (20, 0)
        expected = reference_prompt_logprobs(hf_model, prompt).gather(1, torch.tensor(prompt[1:]).unsqueeze(1))
        torch.testing.assert_close(torch.tensor([e.logprob for e in result["prompt_logprobs"][1:]]),
                                   expected.squeeze(1), atol=1e-4, rtol=0)


def test_bitmasks_unpack_alike_on_the_host_and_on_a_device():
    masks = torch.randint(-(2**31), 2**31 - 1, (5, 7), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    host = allowed_tokens(masks, 200)
    assert host.shape == (5, 200) and host.dtype == torch.bool
    assert torch.equal(host, unpack_by_shifts(masks, 200))
    # Bit t of word w is token 32 w + t.
    assert bool(host[2, 37]) == bool((int(masks[2, 1]) >> 5) & 1)
