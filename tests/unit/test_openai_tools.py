"""The OpenAI surface beyond plain text: tool calls read out of text, the schemas a tool_choice becomes, bodies
as GenerateRequests (structured outputs, n, seeds, echo), and the app against a scripted scheduler client (no
mesh): hostile bodies, several choices, echo, logprob tokens, and streamed tool calls that the SDK reassembles
into the whole answer."""

from __future__ import annotations

import asyncio
import json

import httpx2
import jsonschema
import openai
import pytest
from openai.lib.streaming._deltas import accumulate_delta

from moemesh.gateway.openai_bodies import ChatCompletionRequest, CompletionRequest
from moemesh.gateway.tools import Tool, ToolPolicy, calls_schema
from moemesh.services.core.errors import InvalidRequest, Overloaded
from moemesh.v1 import common_pb2, worker_pb2
from tests.support.scripted import scripted_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["C", "F"]}}, "required": ["city"]}}}
INVOICE = {"type": "function", "function": {
    "name": "find_invoice", "parameters": {"type": "object", "properties": {"number": {"$ref": "#/$defs/number"}},
                                           "required": ["number"], "$defs": {"number": {"type": "string"}}}}}
TOOLS = [WEATHER, INVOICE]
USER = [{"role": "user", "content": "Weather in Paris?"}]


def policy(tool_choice="auto", parallel=None, tools=TOOLS) -> ToolPolicy:
    return ToolPolicy.of([Tool.model_validate(t) for t in tools], tool_choice, parallel)


def calls(message) -> list[tuple[str, dict]]:
    return [(c.name, json.loads(c.arguments)) for c in message.tool_calls]


# ---- reading calls out of text -----------------------------------------------------------------------------------
PARIS = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ROME = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "C"}}'


@pytest.mark.parametrize(
    ("text", "content", "expected"),
    [
        (f"<tool_call>\n{PARIS}\n</tool_call>", None, [("get_weather", {"city": "Paris"})]),
        (f"Let me look.\n<tool_call>{PARIS}</tool_call>\n<tool_call>{ROME}</tool_call>", "Let me look.",
         [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "C"})]),
        (f"<tool_call>{PARIS}", None, [("get_weather", {"city": "Paris"})]),  # the stop cut the closing tag
        (f"[TOOL_CALLS] [{PARIS}, {ROME}]", None,
         [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome", "unit": "C"})]),
        (f"Sure. [TOOL_CALLS]{PARIS}", "Sure.", [("get_weather", {"city": "Paris"})]),
        ('<tool_call>{"name": "find_invoice", "arguments": "{\\"number\\": \\"A-1\\"}"}</tool_call>', None,
         [("find_invoice", {"number": "A-1"})]),  # arguments written as JSON text
    ],
)
def test_auto_reads_hermes_and_mistral_calls_whatever_the_model(text, content, expected):
    message = policy().parse(text)
    assert message.content == content
    assert calls(message) == expected
    assert all(c.id.startswith("call_") and len(c.id) > 10 for c in message.tool_calls)


@pytest.mark.parametrize(
    "text",
    [
        "No tools needed: it is sunny.",
        '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',  # not a declared tool
        '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # broken JSON
        '<tool_call>{"name": "get_weather", "arguments": [1, 2]}</tool_call>',  # arguments not an object
        "[TOOL_CALLS] not json at all",
    ],
)
def test_text_that_is_not_a_call_to_a_declared_tool_stays_the_content(text):
    message = policy().parse(text)
    assert message.content == text and message.tool_calls == []


def test_without_parallel_calls_auto_keeps_the_first_call():
    message = policy(parallel=False).parse(f"<tool_call>{PARIS}</tool_call><tool_call>{ROME}</tool_call>")
    assert calls(message) == [("get_weather", {"city": "Paris"})]


def test_required_output_is_an_array_of_calls_and_a_named_output_is_the_arguments():
    required = policy("required").parse(f"[{PARIS}, {ROME}]")
    assert required.content is None and [name for name, _ in calls(required)] == ["get_weather", "get_weather"]
    assert policy("required").parse('[{"name": "get_weather"').content == '[{"name": "get_weather"', \
        "a cut-short array is returned as text"
    named = policy({"type": "function", "function": {"name": "find_invoice"}}).parse('{"number": "A-7"}')
    assert named.content is None and named.tool_calls[0].name == "find_invoice"
    assert named.tool_calls[0].arguments == '{"number": "A-7"}', "the generated text itself"


# ---- the schemas a tool_choice becomes --------------------------------------------------------------------------
def test_required_schema_accepts_arrays_of_calls_to_the_declared_tools_only():
    schema = policy("required").schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    valid = jsonschema.Draft202012Validator(schema)
    assert valid.is_valid([json.loads(PARIS), {"name": "find_invoice", "arguments": {"number": "A-1"}}])
    assert not valid.is_valid([]), "at least one call"
    assert not valid.is_valid([{"name": "rm", "arguments": {}}]), "only declared tools"
    assert not valid.is_valid([{"name": "get_weather", "arguments": {"unit": "C"}}]), "the tool's own schema"
    assert not valid.is_valid([{"name": "find_invoice", "arguments": {"number": 7}}]), "$refs still resolve"
    one = jsonschema.Draft202012Validator(policy("required", parallel=False).schema())
    assert one.is_valid([json.loads(PARIS)]) and not one.is_valid([json.loads(PARIS), json.loads(ROME)])


def test_required_schema_moves_defs_to_the_root_and_refuses_clashing_ones():
    schema = calls_schema([Tool.model_validate(INVOICE)], parallel=True)
    assert schema["$defs"] == {"number": {"type": "string"}}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["arguments"]
    clash = json.loads(json.dumps(WEATHER))
    clash["function"]["parameters"]["$defs"] = {"number": {"type": "integer"}}
    with pytest.raises(InvalidRequest) as caught:
        calls_schema([Tool.model_validate(INVOICE), Tool.model_validate(clash)], parallel=True)
    assert caught.value.field == "tools[1].function.parameters"


def test_named_schema_is_the_function_parameters_or_any_object():
    assert policy({"type": "function", "function": {"name": "get_weather"}}).schema() == \
        WEATHER["function"]["parameters"]
    bare = [{"type": "function", "function": {"name": "ping"}}]
    assert policy({"type": "function", "function": {"name": "ping"}}, tools=bare).schema() == {"type": "object"}
    assert policy("auto").schema() is None and policy("none").schema() is None


# ---- streaming deltas ----------------------------------------------------------------------------------------------
def streamed(tool_policy: ToolPolicy, text: str, step: int) -> dict:
    """The message the SDK accumulates from the stream of `text` fed `step` characters at a time."""
    stream = tool_policy.stream()
    message = accumulate_delta({}, stream.start())
    for i in range(0, len(text), step):
        message = accumulate_delta(message, stream.feed(text[i:i + step]))
    deltas, _ = stream.end()
    for delta in deltas:
        message = accumulate_delta(message, delta)
    return message


def as_sent(tool_policy: ToolPolicy, text: str) -> tuple:
    message = tool_policy.parse(text)
    return message.content, [(c.name, c.arguments) for c in message.tool_calls]


def from_stream(message: dict) -> tuple:
    return message["content"], [(c["function"]["name"], c["function"]["arguments"])
                                for c in message.get("tool_calls") or []]


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
@pytest.mark.parametrize(
    ("tool_choice", "text"),
    [
        ("auto", f"Checking the weather.  \n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>{ROME}</tool_call>"),
        ("auto", f"[TOOL_CALLS][{PARIS}]"),
        ("auto", "x = [1, 2]\nprint(x < 3)  "),  # brackets and angles that only look like a marker's start
        ("auto", "<tool_call>{broken"),
        ("auto", ""),
        ("required", f"[{PARIS}, {ROME}]"),
        ("required", "[{"),
        ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Paris"}'),
    ],
)
def test_streamed_deltas_add_up_to_the_whole_message(tool_choice, text, step):
    tool_policy = policy(tool_choice)
    assert from_stream(streamed(tool_policy, text, step)) == as_sent(tool_policy, text)


def test_text_that_may_start_a_call_is_held_back_and_the_rest_streams():
    stream = policy().stream()
    assert stream.feed("Hello <tool") == {"content": "Hello"}
    assert stream.feed("_call>{") == {}
    assert stream.feed("more") == {}
    plain = policy().stream()
    assert plain.feed("a [") == {"content": "a"} and plain.feed("1]") == {"content": " [1]"}


# ---- bodies as GenerateRequests ----------------------------------------------------------------------------------
def test_n_and_a_list_of_prompts_give_one_request_per_choice_each_with_its_seed():
    body = CompletionRequest.model_validate({"prompt": ["a", "b"], "n": 3, "seed": 2**64 - 2, "max_tokens": 5})
    requests = body.generate_requests(common_pb2.CACHE_MODE_DEFAULT)
    assert [r.prompt.text for r in requests] == ["a"] * 3 + ["b"] * 3, "OpenAI's order: prompt by prompt"
    assert [r.sampling.seed for r in requests] == [2**64 - 2, 2**64 - 1, 0] * 2, "seed + j, wrapping"
    unseeded = CompletionRequest.model_validate({"prompt": "a", "n": 2}).generate_requests(0)
    assert not any(r.sampling.HasField("seed") for r in unseeded), "each draws a fresh seed"


def test_echo_with_logprobs_asks_for_the_prompt_logprobs():
    body = CompletionRequest.model_validate({"prompt": "a", "echo": True, "logprobs": 2, "max_tokens": 0})
    sampling = body.generate_requests(0)[0].sampling
    assert sampling.prompt_logprobs == 2 and sampling.logprobs == 2 and sampling.max_tokens == 0
    assert not CompletionRequest.model_validate({"prompt": "a", "logprobs": 2}).sampling().HasField("prompt_logprobs")
    assert CompletionRequest.model_validate({"prompt": ["a", "b"], "echo": True, "n": 2}).echoes() == \
        ["a", "a", "b", "b"]


SCHEMA = {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, common_pb2.StructuredOutput(json_object=True)),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
         common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
        ({"guided_json": SCHEMA}, common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
        ({"guided_json": json.dumps(SCHEMA)}, common_pb2.StructuredOutput(json_schema=json.dumps(SCHEMA))),
        ({"guided_regex": r"\d{3}"}, common_pb2.StructuredOutput(regex=r"\d{3}")),
        ({"guided_choice": ["yes", "no"]},
         common_pb2.StructuredOutput(choice=common_pb2.Choices(options=["yes", "no"]))),
        ({"guided_grammar": 'start: "a"+'}, common_pb2.StructuredOutput(grammar='start: "a"+')),
    ],
)
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_response_format_and_guided_fields_become_the_structured_output(fields, expected, endpoint):
    if endpoint == "chat":
        body = ChatCompletionRequest.model_validate({"messages": USER, **fields})
    else:
        body = CompletionRequest.model_validate({"prompt": "x", **fields})
    body.check_supported()
    sampling = body.generate_requests(0)[0].sampling
    assert (sampling.structured if sampling.HasField("structured") else None) == expected


def test_tools_go_to_the_template_and_the_history_maps_into_the_contract():
    history = [*USER,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                     "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    body = ChatCompletionRequest.model_validate({"messages": history, "tools": TOOLS})
    body.check_supported()
    request = body.generate_requests(0)[0]
    chat = request.prompt.chat
    assert [t["function"]["name"] for t in json.loads(chat.tools)] == ["get_weather", "find_invoice"]
    assert chat.messages[1].content == "" and chat.messages[1].tool_calls[0] == common_pb2.ToolCall(
        id="call_1", name="get_weather", arguments='{"city": "Paris"}')
    assert chat.messages[2].role == "tool" and chat.messages[2].tool_call_id == "call_1"
    assert not request.sampling.HasField("structured"), "auto leaves the output free"
    hidden = ChatCompletionRequest.model_validate({"messages": USER, "tools": TOOLS, "tool_choice": "none"})
    assert hidden.generate_requests(0)[0].prompt.chat.tools == "", "tool_choice none hides the tools"
    named = ChatCompletionRequest.model_validate(
        {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert json.loads(named.generate_requests(0)[0].sampling.structured.json_schema) == WEATHER["function"]["parameters"]


# ---- through the app, against a scripted scheduler client --------------------------------------------------------
def lp(token: str, logprob: float, *top: tuple[str, float]) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(token_id=len(token), token=token, logprob=logprob,
                                   top=[common_pb2.TopLogprob(token=t, logprob=p, token_id=len(t)) for t, p in top])


def replying(text_of, finish: int = common_pb2.FINISH_REASON_STOP, step: int = 3, prompt_logprobs=()):
    """A script that writes `text_of(work)` `step` characters per event, each character a token with a logprob."""

    async def script(work):
        text = text_of(work)
        pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
        for k, piece in enumerate(pieces):
            last = k == len(pieces) - 1
            yield worker_pb2.RequestEvent(
                request_id=work.request_id, text=piece, token_ids=[ord(c) for c in piece],
                logprobs=[lp(c, -0.5, (c, -0.5), ("?", -1.5)) for c in piece],
                prompt_logprobs=prompt_logprobs if k == 0 else (),
                finish_reason=finish if last else 0,
                usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=len(text)) if last else None)
            await asyncio.sleep(0)

    return script


def app_for(script):
    return scripted_app(script)


def sdk(app) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://gateway/v1", api_key="unused", max_retries=0,
                              http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app)))


async def post(app, path: str, body: dict) -> httpx2.Response:
    async with httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://gateway") as http:
        return await http.post(path, json=body)


NAMED = {"type": "function", "function": {"name": "get_weather"}}
BAD_BODIES = [
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "get weather"}}]},
     "tools[0].function.name"),
    ("/v1/chat/completions", {"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
    ("/v1/chat/completions", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"tools": "get_weather"}, "tools"),
    ("/v1/chat/completions", {"tools": []}, "tools"),
    ("/v1/chat/completions", {"tools": [WEATHER] * 2}, "tools[1].function.name"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]},
     "tools"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "rm"}}},
     "tool_choice.function.name"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice.function.name"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
     "tool_choice"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/chat/completions", {"response_format": "json"}, "response_format"),
    ("/v1/chat/completions", {"guided_json": SCHEMA, "guided_regex": "a+"}, "guided_regex"),
    ("/v1/chat/completions", {"guided_json": "{not json"}, "guided_json"),
    ("/v1/chat/completions", {"guided_json": [1]}, "guided_json"),
    ("/v1/chat/completions", {"guided_choice": "yes"}, "guided_choice"),
    ("/v1/chat/completions", {"n": 17}, "n"),
    ("/v1/chat/completions", {"messages": [*USER, {"role": "tool", "content": "21 C"}]}, "messages[1].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]}, "messages[0].tool_calls"),
    ("/v1/chat/completions", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ("/v1/chat/completions", {"messages": [*USER, {"role": "assistant", "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": "{}"}}] * 65}]}, "messages[1].tool_calls"),
    ("/v1/completions", {"prompt": [[1, 2, 3]]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * 5, "n": 16}, "n"),
    ("/v1/completions", {"prompt": ["a"] * 65}, "prompt"),
    ("/v1/completions", {"prompt": "a", "n": 2, "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "a", "guided_choice": ["x"], "response_format": {"type": "json_object"}},
     "guided_choice"),
    ("/v1/completions", {"prompt": "a", "guided_regex": 7}, "guided_regex"),
]


@pytest.mark.parametrize(("path", "fields", "param"), BAD_BODIES)
async def test_hostile_bodies_are_400_in_openai_shape_naming_the_parameter(path, fields, param):
    app, fake = app_for(replying(lambda work: "x"))
    body = {"messages": USER, **fields} if path.endswith("chat/completions") else fields
    response = await post(app, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert fake.works == [], "nothing reached the scheduler"


def refusing(field: str):
    async def script(work):
        raise InvalidRequest(field, "unsupported keyword")
        yield  # an async generator

    return script


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                                                            "schema": SCHEMA}}},
         "response_format"),
        ("/v1/completions", {"guided_json": SCHEMA}, "guided_json"),
        ("/v1/completions", {"guided_regex": "a+"}, "guided_regex"),
        ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function",
                                                                 "function": {"name": "find_invoice"}}},
         "tools[1].function.parameters"),
        ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required"}, "tools"),
    ],
)
async def test_a_refused_grammar_names_the_parameter_that_set_it(path, fields, param):
    kind = "regex" if "guided_regex" in fields else "json_schema"
    app, _ = app_for(refusing(f"sampling.structured.{kind}"))
    body = {"messages": USER, **fields} if path.endswith("chat/completions") else {"prompt": "x", **fields}
    response = await post(app, path, body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def by_seed(work) -> str:
    return f"{work.prompt.text}:{work.sampling.seed}"


async def test_n_choices_of_each_prompt_come_in_order_with_the_usage_summed():
    app, fake = app_for(replying(by_seed))
    reply = await sdk(app).completions.create(model="m", prompt=["p", "q"], n=2, seed=10, max_tokens=8)
    assert [(c.index, c.text) for c in reply.choices] == [(0, "p:10"), (1, "p:11"), (2, "q:10"), (3, "q:11")]
    assert reply.usage.prompt_tokens == 4 * 4, "each generation counts its prompt"
    assert reply.usage.completion_tokens == sum(len(c.text) for c in reply.choices)
    assert reply.id == f"cmpl-{fake.works[0].request_id}"


async def test_streamed_choices_interleave_and_reassemble_to_the_whole_answer():
    app, _ = app_for(replying(lambda work: f"choice with seed {work.sampling.seed} " * 3, step=2))
    client = sdk(app)
    whole = await client.chat.completions.create(model="m", messages=USER, n=3, seed=1)
    chunks = [c async for c in await client.chat.completions.create(model="m", messages=USER, n=3, seed=1,
                                                                    stream=True)]
    indexes = [c.choices[0].index for c in chunks]
    assert indexes[:3] == [0, 1, 2], "every choice's role first, in order"
    assert indexes[3:] != sorted(indexes[3:]), "the choices' deltas interleave"
    async with client.chat.completions.stream(model="m", messages=USER, n=3, seed=1) as stream:
        final = await stream.get_final_completion()
    assert [c.message.content for c in final.choices] == [c.message.content for c in whole.choices]
    assert len({c.message.content for c in whole.choices}) == 3


async def test_one_refused_choice_fails_the_request_and_closes_the_others():
    async def script(work):
        if work.sampling.seed == 1:
            raise Overloaded("queue full", retry_after=2)
        async for event in replying(by_seed)(work):
            yield event

    for stream in (False, True):
        app, fake = app_for(script)
        response = await post(app, "/v1/completions", {"prompt": "p", "n": 3, "seed": 0, "stream": stream})
        assert response.status_code == 429 and response.json()["error"]["type"] == "rate_limit_error"
        assert sorted(fake.closed) == sorted(w.request_id for w in fake.works) and len(fake.works) == 3


PROMPT_LOGPROBS = [lp("<s>", 0.0), lp("def", -2.0, ("class", -1.0)), lp(" f", -0.25, (" f", -0.25))]


async def test_echo_prepends_the_prompt_and_its_logprobs_lead_the_first_null():
    app, fake = app_for(replying(lambda work: "():", prompt_logprobs=PROMPT_LOGPROBS))
    reply = await sdk(app).completions.create(model="m", prompt="def f", echo=True, logprobs=1, max_tokens=3)
    choice = reply.choices[0]
    assert choice.text == "def f():"
    assert fake.works[0].sampling.prompt_logprobs == 1
    assert choice.logprobs.tokens == ["<s>", "def", " f", "(", ")", ":"]
    assert choice.logprobs.token_logprobs[:3] == [None, -2.0, -0.25]
    assert choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.top_logprobs[1] == {"class": -1.0, "def": -2.0}, "the token itself joins its top"
    chunks = [c async for c in await sdk(app).completions.create(model="m", prompt="def f", echo=True, logprobs=1,
                                                                 max_tokens=3, stream=True)]
    assert chunks[0].choices[0].text == "def f" and chunks[0].choices[0].logprobs.tokens == ["<s>", "def", " f"]
    assert "".join(c.choices[0].text for c in chunks) == "def f():"


async def test_echo_of_max_tokens_zero_scores_the_prompt():
    app, _ = app_for(replying(lambda work: "", finish=common_pb2.FINISH_REASON_LENGTH,
                              prompt_logprobs=PROMPT_LOGPROBS))
    reply = await sdk(app).completions.create(model="m", prompt="def f", echo=True, logprobs=0, max_tokens=0)
    assert reply.choices[0].text == "def f" and reply.choices[0].finish_reason == "length"
    assert reply.choices[0].logprobs.token_logprobs == [None, -2.0, -0.25]


async def test_completion_top_logprobs_are_keyed_by_text_keeping_the_best():
    async def script(work):
        yield worker_pb2.RequestEvent(
            request_id=work.request_id, text="a", token_ids=[5], finish_reason=common_pb2.FINISH_REASON_STOP,
            logprobs=[lp("a", -0.5, ("a", -0.5), ("b", -1.0), ("b", -2.0))],
            usage=common_pb2.Usage(prompt_tokens=1, completion_tokens=1))

    app, _ = app_for(script)
    reply = await sdk(app).completions.create(model="m", prompt="x", logprobs=3)
    assert reply.choices[0].logprobs.top_logprobs == [{"a": -0.5, "b": -1.0}]


async def test_chat_logprobs_carry_the_token_text_and_its_bytes():
    app, _ = app_for(replying(lambda work: "é!"))
    reply = await sdk(app).chat.completions.create(model="m", messages=USER, logprobs=True, top_logprobs=2)
    first = reply.choices[0].logprobs.content[0]
    assert first.token == "é" and first.bytes == [0xC3, 0xA9]
    assert [t.token for t in first.top_logprobs] == ["é", "?"] and first.top_logprobs[1].bytes == [0x3F]


TOOL_REPLIES = {
    "auto": f"I will look it up.\n<tool_call>\n{PARIS}\n</tool_call>\n<tool_call>{ROME}</tool_call>",
    "required": f"[{PARIS}, {ROME}]",
    "named": '{"city": "Paris", "unit": "C"}',
}


@pytest.mark.parametrize("mode", ["auto", "required", "named"])
async def test_streamed_tool_calls_reassemble_to_the_whole_answer(mode):
    app, _ = app_for(replying(lambda work: TOOL_REPLIES[mode]))
    tool_choice = NAMED if mode == "named" else mode
    client = sdk(app)
    whole = await client.chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice=tool_choice)
    async with client.chat.completions.stream(model="m", messages=USER, tools=TOOLS, tool_choice=tool_choice) as s:
        final = await s.get_final_completion()
    for reply in (whole, final):
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == ("I will look it up." if mode == "auto" else None)
        assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
    assert [(c.function.name, c.function.arguments) for c in final.choices[0].message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert whole.choices[0].message.tool_calls[0].function.name == "get_weather"


async def test_a_named_call_cut_short_keeps_finish_reason_length():
    app, _ = app_for(replying(lambda work: '{"city": "Par', finish=common_pb2.FINISH_REASON_LENGTH))
    reply = await sdk(app).chat.completions.create(model="m", messages=USER, tools=TOOLS, tool_choice=NAMED)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls[0].function.arguments == '{"city": "Par'


async def test_auto_text_without_calls_is_the_content_streamed_or_not():
    text = "It is sunny in Paris; no tool needed. x[0] < y"
    app, _ = app_for(replying(lambda work: text))
    client = sdk(app)
    whole = await client.chat.completions.create(model="m", messages=USER, tools=TOOLS)
    async with client.chat.completions.stream(model="m", messages=USER, tools=TOOLS) as stream:
        final = await stream.get_final_completion()
    for reply in (whole, final):
        assert reply.choices[0].message.content == text and not reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "stop"
