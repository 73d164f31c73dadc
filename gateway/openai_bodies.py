"""The OpenAI request bodies (pydantic) and how each becomes the GenerateRequests or EmbedRequest the mesh takes.

Pydantic checks the ranges OpenAI documents; every other limit is the shared validation's (gateway/validation.py),
whose field names `param_names` translates back to the OpenAI parameter names.

A body with several choices (`n`, or a list of prompts) becomes one GenerateRequest per choice, in OpenAI's
choice order (prompt by prompt, `n` each); with a `seed`, choice j of a prompt samples with seed + j, so that the
choices differ and each is reproducible.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Annotated, Any, Literal

import pydantic

from moemesh.gateway.tools import Tool, ToolPolicy
from moemesh.services.core.errors import InvalidRequest
from moemesh.v1 import common_pb2, embeddings_pb2, generation_pb2

# OpenAI's default max_tokens for /v1/completions; chat leaves it to the model's default.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
MAX_N = 16  # choices per prompt
MAX_GENERATIONS = 64  # choices per request: prompts × n
MAX_MESSAGE_TOOL_CALLS = 64  # the contract's limit on an assistant turn's calls

INT32_MAX = 2**31 - 1
Int32 = Annotated[int, pydantic.Field(ge=-(2**31), le=INT32_MAX)]
NonNegInt32 = Annotated[int, pydantic.Field(ge=0, le=INT32_MAX)]
STRUCTURED_KINDS = ("choice.options", "choice", "json_schema", "json_object", "regex", "grammar")


# ---- field parsers ---------------------------------------------------------------------------------------------
def _string_list(value: Any) -> Any:
    """`stop`: a string, a list of strings, or null."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _prompts(value: Any) -> Any:
    """`prompt`: a string or a non-empty list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, list) and not value:
        raise ValueError("at least one prompt is required")
    raise ValueError("must be a string or a list of strings (token-id prompts are not supported)")


def _embedding_inputs(value: Any) -> Any:
    """`input`: a string or a list of strings."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a string or a list of strings (token ids are not supported)")


def _message_text(value: Any) -> Any:
    """A chat message's `content`: a string, a list of text parts (joined by newlines), or null."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(f"only text content parts are supported, got {kind!r}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("must be a string or a list of text parts")


def _arguments_text(value: Any) -> Any:
    """A call's `arguments`: JSON text (OpenAI's form), or an object, written as JSON text."""
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else value


def _schema_text(param: str, schema: Any) -> str:
    """A JSON schema (an object, or JSON text of one) as JSON text; InvalidRequest naming `param` otherwise."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise InvalidRequest(param, f"is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(param, f"must be a JSON schema object, got {type(schema).__name__}")
    return json.dumps(schema, ensure_ascii=False)


StopList = Annotated[list[str], pydantic.BeforeValidator(_string_list)]


class _Body(pydantic.BaseModel):
    # Unknown fields are ignored (as most OpenAI-compatible servers do); those that would change the answer
    # are declared below and refused when set.
    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    """Streaming options: `include_usage` adds a last chunk with the usage."""

    include_usage: bool = False


class JsonSchemaFormat(_Body):
    """`response_format.json_schema`: the schema the answer follows (`strict` or not: it always does)."""

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = pydantic.Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    """`response_format`: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured(self) -> common_pb2.StructuredOutput | None:
        """The constraint (None for text)."""
        if self.type == "json_object" or (self.type == "json_schema" and self.json_schema
                                          and self.json_schema.schema_ is None):
            return common_pb2.StructuredOutput(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequest("response_format.json_schema", "is required when type is 'json_schema'")
            return common_pb2.StructuredOutput(json_schema=json.dumps(self.json_schema.schema_, ensure_ascii=False))
        return None


# ---- the shared body ---------------------------------------------------------------------------------------------
class SamplingBody(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions; ranges as OpenAI documents them."""

    model: str | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = pydantic.Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = pydantic.Field(default=None, ge=0.0, le=1.0)
    n: int | None = pydantic.Field(default=None, ge=1, le=MAX_N)
    stop: StopList = []
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**64 - 1)
    presence_penalty: float | None = pydantic.Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = pydantic.Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    # Not in OpenAI's API (vLLM's names): limits checked by the shared validation.
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[Int32] | None = None
    guided_json: Any = None  # a JSON schema: an object or JSON text
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None  # Lark or GBNF

    def check_supported(self) -> None:
        """Refuse (InvalidRequest) the OpenAI features the gateway does not implement, and contradictions."""
        if self.logit_bias:
            raise InvalidRequest("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options", "is only allowed when stream is true")
        self.structured()

    # -- choices
    @property
    def choices_per_prompt(self) -> int:
        return self.n or 1

    def generate_requests(self, cache_mode: int) -> list[generation_pb2.GenerateRequest]:
        """One GenerateRequest per choice, in choice order: prompt by prompt, n each (see the module's doc)."""
        requests, base = [], self.sampling()
        for prompt in self.prompt_messages():
            for j in range(self.choices_per_prompt):
                sampling = common_pb2.SamplingParams()
                sampling.CopyFrom(base)
                if self.seed is not None:
                    sampling.seed = (self.seed + j) % 2**64
                requests.append(generation_pb2.GenerateRequest(model=self.model or "", prompt=prompt,
                                                               sampling=sampling, cache_mode=cache_mode))
        return requests

    def sampling(self) -> common_pb2.SamplingParams:
        """The sampling parameters the body sets (unset ones stay unset: the model's defaults)."""
        s = common_pb2.SamplingParams(stop=self.stop, stop_token_ids=self.stop_token_ids or [],
                                      ignore_eos=bool(self.ignore_eos))
        values = {"max_tokens": self.output_limit(), "logprobs": self.logprobs_count(),
                  "prompt_logprobs": self.prompt_logprobs_count(),
                  "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "seed": self.seed, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty}
        for name, value in values.items():
            if value is not None:
                setattr(s, name, value)
        structured = self.structured()
        if structured is not None:
            s.structured.CopyFrom(structured[1])
        return s

    # -- structured outputs
    def constraints(self) -> list[tuple[str, common_pb2.StructuredOutput]]:
        """Every output constraint the body sets, with the parameter that sets it."""
        found = []
        if self.response_format is not None and (structured := self.response_format.structured()) is not None:
            found.append(("response_format", structured))
        if self.guided_json is not None:
            found.append(("guided_json", common_pb2.StructuredOutput(
                json_schema=_schema_text("guided_json", self.guided_json))))
        if self.guided_regex is not None:
            found.append(("guided_regex", common_pb2.StructuredOutput(regex=self.guided_regex)))
        if self.guided_choice is not None:
            found.append(("guided_choice", common_pb2.StructuredOutput(
                choice=common_pb2.Choices(options=self.guided_choice))))
        if self.guided_grammar is not None:
            found.append(("guided_grammar", common_pb2.StructuredOutput(grammar=self.guided_grammar)))
        return found

    def structured(self) -> tuple[str, common_pb2.StructuredOutput] | None:
        """The one output constraint and the OpenAI parameter its errors name (None: free text); InvalidRequest
        when more than one parameter sets a constraint."""
        found = self.constraints()
        if len(found) > 1:
            names = [name for name, _ in found]
            raise InvalidRequest(names[-1], f"only one of {' and '.join(names)} may constrain the output")
        return found[0] if found else None

    def structured_names(self) -> list[tuple[str, str]]:
        """Renames of the shared validation's `sampling.structured.<kind>` to the parameter that set it."""
        structured = self.structured()
        if structured is None:
            return []
        param = structured[0]
        return [(f"sampling.structured.{kind}", param) for kind in STRUCTURED_KINDS] + [("sampling.structured", param)]

    # -- per endpoint
    def prompt_messages(self) -> list[common_pb2.Prompt]:
        """The endpoint's prompts (texts, or one list of chat messages)."""
        raise NotImplementedError

    def output_limit(self) -> int | None:
        """The sampling's max_tokens (None: the model's default)."""
        raise NotImplementedError

    def logprobs_count(self) -> int | None:
        """How many alternatives each token's logprob carries (None: no logprobs)."""
        raise NotImplementedError

    def prompt_logprobs_count(self) -> int | None:
        """How many alternatives each prompt token's logprob carries (None: no prompt logprobs)."""
        return None

    def param_names(self) -> list[tuple[str, str]]:
        """(shared-validation field prefix, OpenAI parameter name) pairs, the first match renaming an error."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


# ---- /v1/completions ------------------------------------------------------------------------------------------
class CompletionRequest(SamplingBody):
    """The body of /v1/completions: one text prompt or a list of them."""

    prompt: Annotated[list[str], pydantic.BeforeValidator(_prompts)]
    logprobs: int | None = pydantic.Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise InvalidRequest("suffix", "is not supported")
        if self.best_of is not None and self.best_of != self.choices_per_prompt:
            raise InvalidRequest("best_of", f"must equal n ({self.choices_per_prompt}): choosing the best of more "
                                            "candidates is not supported")
        total = len(self.prompt) * self.choices_per_prompt
        if total > MAX_GENERATIONS:
            raise InvalidRequest("n" if self.choices_per_prompt > 1 else "prompt",
                                 f"at most {MAX_GENERATIONS} choices per request (prompts × n), got {total}")

    def prompt_messages(self) -> list[common_pb2.Prompt]:
        return [common_pb2.Prompt(text=text) for text in self.prompt]

    def output_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_count(self) -> int | None:
        """With `echo`, the prompt's tokens lead the logprobs."""
        return self.logprobs if self.echo else None

    def echoes(self) -> list[str]:
        """Each choice's echoed prompt ("" without `echo`), in choice order."""
        return [text if self.echo else "" for text in self.prompt for _ in range(self.choices_per_prompt)]

    def param_names(self) -> list[tuple[str, str]]:
        return [*self.structured_names(), ("sampling.prompt_logprobs", "logprobs"), ("sampling.", ""),
                ("prompt.text", "prompt"), ("prompt", "prompt")]


# ---- /v1/chat/completions ---------------------------------------------------------------------------------------
class FunctionCall(_Body):
    """A call's function: its name and its arguments as JSON text."""

    name: str
    arguments: Annotated[str, pydantic.BeforeValidator(_arguments_text)]


class MessageToolCall(_Body):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    def to_pb(self) -> common_pb2.ToolCall:
        return common_pb2.ToolCall(id=self.id, name=self.function.name, arguments=self.function.arguments)


class ChatMessage(_Body):
    """One chat message; its content parts joined as text; an assistant's tool calls; a tool result's call id."""

    role: str
    content: Annotated[str, pydantic.BeforeValidator(_message_text)] = ""
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = pydantic.Field(default=None, max_length=MAX_MESSAGE_TOOL_CALLS)
    tool_call_id: str | None = None

    def check(self, i: int) -> None:
        """The tool fields fit the role: calls only from the assistant, as JSON objects; a tool result names its
        call."""
        if self.role == "tool" and not self.tool_call_id:
            raise InvalidRequest(f"messages[{i}].tool_call_id", "is required for a tool message")
        if self.tool_calls and self.role != "assistant":
            raise InvalidRequest(f"messages[{i}].tool_calls", "only assistant messages carry tool calls")
        for j, call in enumerate(self.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments)
            except ValueError:
                arguments = None
            if not isinstance(arguments, dict):
                raise InvalidRequest(f"messages[{i}].tool_calls[{j}].function.arguments", "must be a JSON object")

    def to_pb(self) -> common_pb2.ChatMessage:
        return common_pb2.ChatMessage(role="system" if self.role == "developer" else self.role, content=self.content,
                                      name=self.name or "", tool_calls=[c.to_pb() for c in self.tool_calls or []],
                                      tool_call_id=(self.tool_call_id or "") if self.role == "tool" else "")


class ChatCompletionRequest(SamplingBody):
    """The body of /v1/chat/completions: chat messages, and the tools the model may call."""

    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, off in (("functions", ([], None)), ("function_call", ("none", None))):
            if getattr(self, name) not in off:
                raise InvalidRequest(name, "the legacy function-calling parameters are not supported; "
                                           "use tools and tool_choice")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "requires logprobs to be true")
        for i, message in enumerate(self.messages):
            message.check(i)

    @cached_property
    def tool_policy(self) -> ToolPolicy:
        """How this request uses tools (validated)."""
        return ToolPolicy.of(self.tools, self.tool_choice, self.parallel_tool_calls)

    def constraints(self) -> list[tuple[str, common_pb2.StructuredOutput]]:
        found = super().constraints()
        schema = self.tool_policy.schema()
        if schema is not None:
            found.append(("tool_choice", common_pb2.StructuredOutput(json_schema=json.dumps(schema, ensure_ascii=False))))
        return found

    def structured_names(self) -> list[tuple[str, str]]:
        names = super().structured_names()
        if self.tool_policy.constrained:  # a grammar error is about the tools' schemas
            names = [(prefix, self.tool_policy.schema_param()) for prefix, _ in names]
        return names

    def prompt_messages(self) -> list[common_pb2.Prompt]:
        chat = common_pb2.ChatMessages(messages=[m.to_pb() for m in self.messages],
                                       tools=self.tool_policy.template_tools())
        return [common_pb2.Prompt(chat=chat)]

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def param_names(self) -> list[tuple[str, str]]:
        max_tokens = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return [*self.structured_names(), ("sampling.logprobs", "top_logprobs"), ("sampling.max_tokens", max_tokens),
                ("sampling.", ""), ("prompt.chat.tools", "tools"), ("prompt.chat.messages", "messages"),
                ("prompt.chat", "messages"), ("prompt", "messages")]


# ---- /v1/embeddings ---------------------------------------------------------------------------------------------
class EmbeddingRequest(_Body):
    """The body of /v1/embeddings: one text or a list of texts."""

    input: Annotated[list[str], pydantic.BeforeValidator(_embedding_inputs)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = pydantic.Field(default=None, ge=1)
    user: str | None = None

    def embed_request(self, cache_mode: int) -> embeddings_pb2.EmbedRequest:
        """The body as the mesh's EmbedRequest."""
        return embeddings_pb2.EmbedRequest(model=self.model or "", inputs=self.input, cache_mode=cache_mode)

    def param_names(self) -> list[tuple[str, str]]:
        return [("inputs", "input")]
