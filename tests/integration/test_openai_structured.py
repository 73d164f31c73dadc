"""Structured outputs, tools, n, echo and prompt logprobs through a real mesh with the official `openai` SDK.

The mesh serves a tiny random checkpoint whose chat template renders tools (Hermes style): its text is noise,
so every structured answer here parses because the grammar made it so, never because the model knew better.
"""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import openai
import pytest

from moemesh.local import start_mesh, stop_mesh
from moemesh.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from tests.support.checkpoints import build_tiny_tools_mixtral

MODEL = "tiny-tools"
NO_CACHE = {"Cache-Control": "no-cache"}  # a fresh generation, not the response cache's replay

INVOICE_SCHEMA = {
    "type": "object",
    "properties": {
        "number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$"},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "customer": {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                                                      "vat_id": {"type": "string", "maxLength": 12}},
                     "required": ["name"], "additionalProperties": False},
        "lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object",
            "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                           "unit_price": {"type": "number", "minimum": 0, "maximum": 1000}},
            "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}},
        "total": {"type": "number", "minimum": 0, "maximum": 100000},
        "paid": {"type": "boolean"},
    },
    "required": ["number", "date", "currency", "customer", "lines", "total"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "pattern": "^[A-Z][a-z]{1,9}$"},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
BOOK = {"type": "function", "function": {
    "name": "book_payment", "parameters": {"type": "object", "properties": {
        "invoice": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
        "amount": {"type": "integer", "minimum": 1, "maximum": 5000}}, "required": ["invoice", "amount"],
        "additionalProperties": False}}}
TOOLS = [WEATHER, BOOK]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    checkpoint = build_tiny_tools_mixtral(tmp_path_factory.mktemp("checkpoint") / MODEL, seed=5)
    running = start_mesh(tmp_path_factory.mktemp("structured"), "--model", str(checkpoint), "--no-embeddings")
    yield running
    if running.process.poll() is None:
        stop_mesh(running)


@pytest.fixture(scope="module")
def client(mesh):
    with openai.OpenAI(base_url=f"http://{mesh.http}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def assert_follows(schema: dict, text: str) -> dict:
    value = json.loads(text)
    jsonschema.validate(value, schema, cls=jsonschema.Draft202012Validator)
    return value


# ---- structured outputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1, "seed": 3}])
def test_json_schema_answer_parses_and_follows_the_schema(client, sampling):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Extract the invoice."}], max_tokens=400, **sampling,
        response_format={"type": "json_schema", "json_schema": {"name": "invoice", "schema": INVOICE_SCHEMA,
                                                                "strict": True}})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", f"the grammar's end ends the answer: {choice.message.content!r}"
    invoice = assert_follows(INVOICE_SCHEMA, choice.message.content)
    assert 1 <= len(invoice["lines"]) <= 3


def test_guided_regex_and_choice_outputs_match(client):
    regex = client.completions.create(model=MODEL, prompt="Invoice number:", max_tokens=20, temperature=1, seed=1,
                                      extra_body={"guided_regex": "INV-[0-9]{4}"})
    assert re.fullmatch("INV-[0-9]{4}", regex.choices[0].text), regex.choices[0].text
    options = ["approve", "reject", "escalate"]
    choice = client.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=1, seed=2,
                                            extra_body={"guided_choice": options})
    assert choice.choices[0].message.content in options and choice.choices[0].finish_reason == "stop"


def test_invalid_constraints_are_400_naming_the_parameter(client, mesh):
    bad_schema = {"type": "object", "properties": {"total": {"$ref": "#/$defs/missing"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=USER, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": bad_schema}})
    assert caught.value.param == "response_format", caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt="x", max_tokens=5, extra_body={"guided_regex": "(unclosed"})
    assert caught.value.param == "guided_regex", caught.value.body


# ---- tools -------------------------------------------------------------------------------------------------------
def test_named_function_arguments_follow_its_parameters(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice=NAMED,
                                           max_tokens=60, temperature=1, seed=4)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert_follows(PARAMETERS["get_weather"], call.function.arguments)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_tool_choice_gives_calls_to_declared_tools(client, parallel):
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=parallel, max_tokens=200, temperature=1, seed=6)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.tool_calls and (parallel or len(choice.message.tool_calls) == 1)
    for call in choice.message.tool_calls:
        assert_follows(PARAMETERS[call.function.name], call.function.arguments)


# A Hermes block that the free ("auto") answer is forced into: the parser, not the grammar, makes it a call.
HERMES_CALL = r'<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,6}", "unit": "C"\}\}</tool_call>'


def test_auto_reads_a_call_out_of_the_generated_text(client):
    reply = client.chat.completions.create(model=MODEL, messages=USER, tools=TOOLS, max_tokens=200, temperature=0,
                                           extra_body={"guided_regex": HERMES_CALL})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    assert_follows(PARAMETERS["get_weather"], choice.message.tool_calls[0].function.arguments)


@pytest.mark.parametrize(
    ("tool_choice", "extra"),
    [(NAMED, {}), ("required", {}), ("auto", {"guided_regex": HERMES_CALL})],
)
def test_streamed_tool_call_deltas_reassemble_to_the_whole_answer(client, tool_choice, extra):
    request = dict(model=MODEL, messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=200, temperature=0)
    whole = client.chat.completions.create(**request, extra_body=extra)
    with client.chat.completions.stream(**request, extra_body=extra, extra_headers=NO_CACHE) as stream:
        final = stream.get_final_completion()
    expected, streamed = whole.choices[0], final.choices[0]
    assert streamed.finish_reason == expected.finish_reason == "tool_calls"
    assert streamed.message.content == expected.message.content
    assert [(c.function.name, c.function.arguments) for c in streamed.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in expected.message.tool_calls]


def test_tools_reach_the_chat_template_unless_tool_choice_is_none(client):
    def prompt_tokens(messages, **tools) -> int:
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, temperature=0,
                                              **tools).usage.prompt_tokens

    bare = prompt_tokens(USER)
    assert prompt_tokens(USER, tools=TOOLS) > bare + 50, "the template writes the tools' JSON"
    assert prompt_tokens(USER, tools=TOOLS, tool_choice="none") == bare
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees and sunny"}]
    assert prompt_tokens(history, tools=TOOLS) > prompt_tokens(USER, tools=TOOLS) + 20, \
        "the assistant's call and the tool's answer are rendered"


# ---- n, prompt lists, echo ---------------------------------------------------------------------------------------
def test_n_choices_with_a_seed_are_reproducible(client):
    request = dict(model=MODEL, prompt="Dear customer,", n=4, seed=11, max_tokens=8, temperature=1)
    first = client.completions.create(**request)
    again = client.completions.create(**request, extra_headers=NO_CACHE)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert [c.text for c in again.choices] == texts, "each choice is reproducible from seed + index"
    assert len(set(texts)) > 1, "the choices sample with different seeds"
    assert first.usage.completion_tokens == sum(
        client.completions.create(**{**request, "n": 1, "seed": 11 + j}).usage.completion_tokens for j in range(4))


def test_a_list_of_prompts_gives_one_choice_each_in_order(client):
    prompts = ["Invoice", "Payment due", "Credit note"]
    reply = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
               for p in prompts]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.text for c in reply.choices] == singles


def test_echo_with_max_tokens_zero_scores_the_prompt(client):
    prompt = "Total amount due: 42 EUR"
    reply = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    choice, logprobs = reply.choices[0], reply.choices[0].logprobs
    assert choice.text == prompt and reply.usage.completion_tokens == 0
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.prompt_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(token in top and len(top) <= 3 for token, top in zip(logprobs.tokens[1:], logprobs.top_logprobs[1:]))
    assert "".join(logprobs.tokens).endswith(prompt), "tokens are their text"


# ---- the same features over gRPC -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.gateway) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def grpc_request(prompt: str, cache_mode=common_pb2.CACHE_MODE_NO_CACHE, **sampling) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(model=MODEL, prompt=common_pb2.Prompt(text=prompt), cache_mode=cache_mode,
                                          sampling=common_pb2.SamplingParams(**sampling))


def test_grpc_callers_get_structured_outputs_too(stub):
    schema = common_pb2.StructuredOutput(json_schema=json.dumps(INVOICE_SCHEMA))
    answer = stub.Complete(grpc_request("Extract the invoice:", max_tokens=400, temperature=0.0, structured=schema),
                           timeout=120)
    assert answer.finish_reason == common_pb2.FINISH_REASON_STOP
    assert_follows(INVOICE_SCHEMA, answer.text)
    # Streamed, the events join to the same text.
    events = list(stub.Generate(grpc_request("Extract the invoice:", max_tokens=400, temperature=0.0,
                                             structured=schema), timeout=120))
    assert "".join(e.text for e in events) == answer.text


def test_grpc_grammar_errors_are_invalid_argument_naming_the_field(stub, mesh):
    cases = [(common_pb2.StructuredOutput(json_schema='{"type": "frob"}'), "sampling.structured.json_schema"),
             (common_pb2.StructuredOutput(regex="(?<=a)b"), "sampling.structured.regex"),
             (common_pb2.StructuredOutput(grammar="start: missing"), "sampling.structured.grammar"),
             (common_pb2.StructuredOutput(), "sampling.structured")]
    for spec, field in cases:
        with pytest.raises(grpc.RpcError) as raised:
            stub.Complete(grpc_request("x", max_tokens=4, structured=spec), timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details().startswith(f"{field}: "), raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Complete(grpc_request("x", max_tokens=4, prompt_logprobs=21), timeout=30)
    assert raised.value.details().startswith("sampling.prompt_logprobs: ")
    assert mesh.process.poll() is None


def test_grpc_prompt_scoring_with_token_texts(stub):
    answer = stub.Complete(grpc_request("Invoice INV-1234 is paid.", max_tokens=0, prompt_logprobs=2,
                                        cache_mode=common_pb2.CACHE_MODE_NO_STORE), timeout=60)
    assert answer.finish_reason == common_pb2.FINISH_REASON_LENGTH and not answer.token_ids
    entries = answer.prompt_logprobs
    assert len(entries) == answer.usage.prompt_tokens > 3
    assert entries[0].logprob == 0.0 and not entries[0].top
    assert all(e.logprob <= 0.0 and len(e.top) == 2 for e in entries[1:])
    # Token texts, joined, spell the prompt after BOS (the tiny tokenizer's pieces are byte-level BPE).
    assert "".join(e.token for e in entries[1:]) == "Invoice INV-1234 is paid."
    sampled = stub.Complete(grpc_request("Invoice", max_tokens=3, temperature=0.0, logprobs=1), timeout=60)
    assert [lp.token for lp in sampled.logprobs] != [] and all(lp.token and lp.top[0].token for lp in sampled.logprobs)


def test_the_response_cache_tells_grammars_apart(stub):
    """Same prompt and sampling, another grammar: another answer, never the cached one of the first."""
    digits = common_pb2.StructuredOutput(regex="[0-9]{3}")
    letters = common_pb2.StructuredOutput(regex="[a-z]{3}")
    first = [stub.Complete(grpc_request("Code:", max_tokens=8, temperature=0.0, structured=spec,
                                        cache_mode=common_pb2.CACHE_MODE_DEFAULT), timeout=60) for spec in
             (digits, letters)]
    again = [stub.Complete(grpc_request("Code:", max_tokens=8, temperature=0.0, structured=spec,
                                        cache_mode=common_pb2.CACHE_MODE_DEFAULT), timeout=60) for spec in
             (digits, letters)]
    assert re.fullmatch("[0-9]{3}", first[0].text) and re.fullmatch("[a-z]{3}", first[1].text)
    assert [a.text for a in again] == [f.text for f in first]
    assert again[1].usage.from_response_cache
