"""The OpenAI request bodies (pydantic) and how each becomes the GenerateRequest or EmbedRequest the mesh takes.

Pydantic checks the ranges OpenAI documents; every other limit is the shared validation's (gateway/validation.py),
whose field names `param_names` translates back to the OpenAI parameter names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic

from moemesh.services.core.errors import InvalidRequest
from moemesh.v1 import common_pb2, embeddings_pb2, generation_pb2

# OpenAI's default max_tokens for /v1/completions; chat leaves it to the model's default.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

INT32_MAX = 2**31 - 1
Int32 = Annotated[int, pydantic.Field(ge=-(2**31), le=INT32_MAX)]
NonNegInt32 = Annotated[int, pydantic.Field(ge=0, le=INT32_MAX)]


# ---- request bodies --------------------------------------------------------------------------------------------
def _string_list(value: Any) -> Any:
    """`stop`: a string, a list of strings, or null."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _one_prompt(value: Any) -> Any:
    """`prompt`: a string or a list of one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if len(value) == 1:
            return value[0]
        raise ValueError(f"exactly one prompt per request is supported, got {len(value)}")
    raise ValueError("must be a string or a list of one string (token ids are not supported)")


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


StopList = Annotated[list[str], pydantic.BeforeValidator(_string_list)]


class _Body(pydantic.BaseModel):
    # Unknown fields are ignored (as most OpenAI-compatible servers do); those that would change the answer
    # are declared below and refused when set.
    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    """Streaming options: `include_usage` adds a last chunk with the usage."""

    include_usage: bool = False


class SamplingBody(_Body):
    """Fields shared by /v1/completions and /v1/chat/completions; ranges as OpenAI documents them."""

    model: str | None = None
    max_tokens: Int32 | None = None
    temperature: float | None = pydantic.Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = pydantic.Field(default=None, ge=0.0, le=1.0)
    n: int | None = pydantic.Field(default=None, ge=1, le=128)
    stop: StopList = []
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**64 - 1)
    presence_penalty: float | None = pydantic.Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = pydantic.Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Not in OpenAI's API (vLLM's names): limits checked by the shared validation.
    top_k: Int32 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[Int32] | None = None

    def check_supported(self) -> None:
        """Refuse (InvalidRequest) the OpenAI features the gateway does not implement."""
        if self.n not in (None, 1):
            raise InvalidRequest("n", f"only n=1 is supported, got {self.n}")
        if self.logit_bias:
            raise InvalidRequest("logit_bias", "is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options", "is only allowed when stream is true")

    def generate_request(self, cache_mode: int) -> generation_pb2.GenerateRequest:
        """The body as the mesh's GenerateRequest: the endpoint's prompt, the shared sampling parameters."""
        return generation_pb2.GenerateRequest(model=self.model or "", prompt=self.prompt_message(),
                                              sampling=self.sampling(), cache_mode=cache_mode)

    def sampling(self) -> common_pb2.SamplingParams:
        """The sampling parameters the body sets (unset ones stay unset: the model's defaults)."""
        s = common_pb2.SamplingParams(stop=self.stop, stop_token_ids=self.stop_token_ids or [],
                                      ignore_eos=bool(self.ignore_eos))
        values = {"max_tokens": self.output_limit(), "logprobs": self.logprobs_count(),
                  "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "seed": self.seed, "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty}
        for name, value in values.items():
            if value is not None:
                setattr(s, name, value)
        return s

    def prompt_message(self) -> common_pb2.Prompt:
        """The endpoint's prompt (a text, or chat messages)."""
        raise NotImplementedError

    def output_limit(self) -> int | None:
        """The sampling's max_tokens (None: the model's default)."""
        raise NotImplementedError

    def logprobs_count(self) -> int | None:
        """How many alternatives each token's logprob carries (None: no logprobs)."""
        raise NotImplementedError

    def param_names(self) -> list[tuple[str, str]]:
        """(shared-validation field prefix, OpenAI parameter name) pairs, the first match renaming an error."""
        raise NotImplementedError

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingBody):
    """The body of /v1/completions: one text prompt."""

    prompt: Annotated[str, pydantic.BeforeValidator(_one_prompt)]
    logprobs: int | None = pydantic.Field(default=None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise InvalidRequest("echo", "is not supported")
        if self.suffix:
            raise InvalidRequest("suffix", "is not supported")
        if self.best_of not in (None, 1):
            raise InvalidRequest("best_of", "only best_of=1 is supported")

    def prompt_message(self) -> common_pb2.Prompt:
        return common_pb2.Prompt(text=self.prompt)

    def output_limit(self) -> int:
        return self.max_tokens if self.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS

    def logprobs_count(self) -> int | None:
        return self.logprobs

    def param_names(self) -> list[tuple[str, str]]:
        return [("sampling.", ""), ("prompt.text", "prompt"), ("prompt", "prompt")]


class ChatMessage(_Body):
    """One chat message; its content parts joined as text."""

    role: str
    content: Annotated[str, pydantic.BeforeValidator(_message_text)] = ""
    name: str | None = None


class ChatCompletionRequest(SamplingBody):
    """The body of /v1/chat/completions: chat messages, no tools."""

    messages: list[ChatMessage]
    max_completion_tokens: Int32 | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = pydantic.Field(default=None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise InvalidRequest(name, "tool and function calling are not supported")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise InvalidRequest(name, "tool and function calling are not supported")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise InvalidRequest("response_format", "only {'type': 'text'} is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "requires logprobs to be true")

    def prompt_message(self) -> common_pb2.Prompt:
        messages = [common_pb2.ChatMessage(role="system" if m.role == "developer" else m.role,
                                           content=m.content, name=m.name or "") for m in self.messages]
        return common_pb2.Prompt(chat=common_pb2.ChatMessages(messages=messages))

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def param_names(self) -> list[tuple[str, str]]:
        max_tokens = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return [("sampling.logprobs", "top_logprobs"), ("sampling.max_tokens", max_tokens), ("sampling.", ""),
                ("prompt.chat.messages", "messages"), ("prompt.chat", "messages"), ("prompt", "messages")]


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
