"""OpenAI tool calling on /v1/chat/completions: the `tools` and `tool_choice` a body may carry, the grammar a
forced choice becomes, and the tool calls read back out of the generated text, whole or as a stream of deltas.

`tool_choice` decides how a call is obtained:

- "none": the model writes a message; the tools are not shown to it (see `ToolPolicy.template_tools`).
- "auto": the model writes freely; calls are parsed out of its text afterwards, in either family's format,
  whatever the served model: Hermes/Qwen `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or
  Mistral's `[TOOL_CALLS]` followed by a JSON array of {"name", "arguments"} objects. Text that does not parse
  as calls to the declared tools stays the message's content.
- "required": the output is constrained to a JSON array of calls to the declared tools (one at most when
  `parallel_tool_calls` is false).
- a named function: the output is constrained to that function's `parameters` schema: it is the arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pydantic

from moemesh.services.core.errors import InvalidRequest

MAX_TOOLS = 128
MARKERS = ("<tool_call>", "[TOOL_CALLS]")  # where a call may start in free text ("auto")
HERMES_END = "</tool_call>"
ANY_OBJECT = {"type": "object"}

FunctionName = Annotated[str, pydantic.StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# ---- what a body declares ------------------------------------------------------------------------------------
class FunctionDefinition(pydantic.BaseModel):
    """A callable function: its name, what it does, and its arguments' JSON schema."""

    model_config = pydantic.ConfigDict(extra="ignore")

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted; a forced call always follows the schema, strict or not


class Tool(pydantic.BaseModel):
    """One entry of `tools`: only functions exist."""

    model_config = pydantic.ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition

    @property
    def schema(self) -> dict[str, Any]:
        """The arguments' JSON schema (any object when the function declares none)."""
        return self.function.parameters or ANY_OBJECT


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made; `arguments` is JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_object(self) -> dict:
        """OpenAI's `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def header_delta(self, index: int, arguments: str = "") -> dict:
        """The stream delta that opens the call (its id and name); argument pieces follow with the same index."""
        return {"index": index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": arguments}}


@dataclass(frozen=True)
class Message:
    """An assistant message read out of the generated text: content (None when there is none) and calls."""

    content: str | None
    tool_calls: list[ToolCall]


def _choice_mode(tool_choice: Any) -> tuple[str, str | None]:
    """`tool_choice` as (mode, function name); InvalidRequest naming it when it is none of OpenAI's forms."""
    if tool_choice in ("none", "auto", "required"):
        return tool_choice, None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return "function", function["name"]
        raise InvalidRequest("tool_choice.function.name", "is required: {'type': 'function', 'function': "
                                                          "{'name': <one of tools>}}")
    raise InvalidRequest("tool_choice", "must be 'none', 'auto', 'required' or {'type': 'function', "
                                        f"'function': {{'name': ...}}}}, got {json.dumps(tool_choice)[:100]}")


def _check_unique(tools: list[Tool]) -> None:
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise InvalidRequest(f"tools[{i}].function.name", f"duplicate function name {tool.function.name!r}")
        seen.add(tool.function.name)


# ---- the policy of one request -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolPolicy:
    """How one chat request uses tools: mode "none", "auto", "required" or "function" (one named function)."""

    tools: list[Tool]
    mode: str
    function: str | None = None
    parallel: bool = True

    @classmethod
    def of(cls, tools: list[Tool] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPolicy:
        """The validated policy of a body's `tools`, `tool_choice` and `parallel_tool_calls`."""
        if tools is not None and not tools:
            raise InvalidRequest("tools", "must not be empty (leave it out for no tools)")
        tools = tools or []
        if len(tools) > MAX_TOOLS:
            raise InvalidRequest("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
        _check_unique(tools)
        mode, name = _choice_mode(tool_choice if tool_choice is not None else ("auto" if tools else "none"))
        if mode != "none" and not tools:
            raise InvalidRequest("tool_choice", f"{json.dumps(tool_choice)} needs `tools`")
        if name is not None and name not in {t.function.name for t in tools}:
            raise InvalidRequest("tool_choice.function.name", f"{name!r} is not one of the declared tools")
        return cls(tools, mode, name, parallel_tool_calls is not False)

    @property
    def constrained(self) -> bool:
        """Whether the output is forced into calls by a grammar ("required" or a named function)."""
        return self.mode in ("required", "function")

    @property
    def parses_calls(self) -> bool:
        """Whether the answer is read for tool calls at all."""
        return self.mode != "none"

    def template_tools(self) -> str:
        """The tools as JSON for the chat template ("" for none). With tool_choice "none" the template does not
        see them (vLLM shows them anyway): a model shown tools may write a call, which "none" would return as
        plain text in the content."""
        if self.mode == "none":
            return ""
        return json.dumps([tool.model_dump(exclude_none=True) for tool in self.tools], ensure_ascii=False)

    def _named(self) -> tuple[int, Tool]:
        return next((i, t) for i, t in enumerate(self.tools) if t.function.name == self.function)

    def schema(self) -> dict | None:
        """The JSON schema the output must follow (None: free text)."""
        if self.mode == "function":
            return self._named()[1].schema
        if self.mode == "required":
            return calls_schema(self.tools, self.parallel)
        return None

    def schema_param(self) -> str:
        """The OpenAI parameter a grammar error is about."""
        return f"tools[{self._named()[0]}].function.parameters" if self.mode == "function" else "tools"

    def parse(self, text: str) -> Message:
        """The message of a whole generated text."""
        if self.mode == "function":
            return Message(None, [ToolCall(self.function, text)])
        calls = None
        if self.mode == "required":
            calls = _calls_of(_json_or_none(text), self._names())
        elif self.mode == "auto":
            start = first_marker(text)
            calls = _parse_marked(text[start:], self._names()) if start is not None else None
            if calls:
                calls = calls if self.parallel else calls[:1]
                return Message(text[:start].rstrip() or None, calls)
        return Message(None, calls) if calls else Message(text, [])

    def _names(self) -> set[str]:
        return {t.function.name for t in self.tools}

    def stream(self) -> ToolCallStream:
        """A stream of one choice's deltas."""
        return ToolCallStream(self)


def calls_schema(tools: list[Tool], parallel: bool) -> dict:
    """A JSON array of calls, each {"name": <a tool's name>, "arguments": <its parameters>}, at least one (at
    most one without parallel calls). `$defs` move to the root, where the tools' `#/$defs/...` refs point."""
    defs: dict[str, Any] = {}
    variants = []
    for i, tool in enumerate(tools):
        schema = dict(tool.schema)
        for key in ("$defs", "definitions"):
            for name, definition in (schema.pop(key, None) or {}).items():
                if defs.setdefault(f"{key}/{name}", definition) != definition:
                    raise InvalidRequest(f"tools[{i}].function.parameters",
                                         f"{key}/{name} differs from another tool's; rename one")
        variants.append({"type": "object", "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                                                          "arguments": schema},
                         "required": ["name", "arguments"], "additionalProperties": False})
    result: dict[str, Any] = {"type": "array", "items": {"anyOf": variants}, "minItems": 1}
    if not parallel:
        result["maxItems"] = 1
    for path, definition in defs.items():
        key, name = path.split("/", 1)
        result.setdefault(key, {})[name] = definition
    return result


# ---- reading calls out of text -------------------------------------------------------------------------------
def first_marker(text: str) -> int | None:
    """Where the first call marker starts (None: none in the text)."""
    found = [i for i in (text.find(m) for m in MARKERS) if i >= 0]
    return min(found) if found else None


def _partial_marker(text: str) -> int:
    """Where a suffix of `text` that may grow into a marker starts (len(text): none)."""
    longest = max(len(m) for m in MARKERS)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        if any(m.startswith(text[start:]) for m in MARKERS):
            return start
    return len(text)


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(item: Any, names: set[str]) -> ToolCall | None:
    """One {"name", "arguments"} object as a call to a declared tool (None: it is not one)."""
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        arguments = _json_or_none(arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False))


def _calls_of(value: Any, names: set[str]) -> list[ToolCall] | None:
    """A JSON array (or a single object) of calls; None when any item is not a call to a declared tool."""
    items = value if isinstance(value, list) else [value]
    calls = [_call(item, names) for item in items]
    return calls if calls and all(calls) else None


_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


def _value_at(text: str, pos: int) -> tuple[Any, int]:
    """The JSON value starting at `pos` (after white space) and where it ends; ValueError when there is none."""
    return _DECODER.raw_decode(text, _SPACE.match(text, pos).end())


def _parse_marked(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls of text that starts with a marker; None when it does not parse as calls to declared tools."""
    try:
        if text.startswith("[TOOL_CALLS]"):
            return _calls_of(_value_at(text, len("[TOOL_CALLS]"))[0], names)
        calls, pos = [], 0
        while text.startswith("<tool_call>", pos):  # Hermes: one block per call; the last may be unclosed
            value, pos = _value_at(text, pos + len("<tool_call>"))
            call = _call(value, names)
            if call is None:
                return None
            calls.append(call)
            pos = _SPACE.match(text, pos).end()
            if text.startswith(HERMES_END, pos):
                pos = _SPACE.match(text, pos + len(HERMES_END)).end()
        return calls or None
    except ValueError:
        return None


# ---- streaming ------------------------------------------------------------------------------------------------
class ToolCallStream:
    """One choice's stream of message deltas under a tool policy.

    A named function's arguments stream as they are generated. Otherwise the text is held from where a call may
    start (a marker, the prefix of one, or trailing white space before it; everything under "required") and
    the calls, or the held text when they do not parse, are sent at the end: the deltas add up to `parse`'s
    message of the whole text, so a streamed answer equals the whole one.
    """

    def __init__(self, policy: ToolPolicy) -> None:
        self.policy = policy
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.held = False  # a marker came: nothing more is sent before the end
        self.named = ToolCall(policy.function, "") if policy.mode == "function" else None

    def start(self) -> dict:
        """The first delta: the role (and, for a named function, the call's id and name)."""
        if self.named is not None:
            return {"role": "assistant", "content": None, "tool_calls": [self.named.header_delta(0)]}
        return {"role": "assistant", "content": None}

    def feed(self, text: str) -> dict:
        """The delta of newly generated text ({} when it is all held)."""
        self.text += text
        if self.named is not None:
            return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
        if self.policy.mode == "required" or self.held:
            return {}
        start = first_marker(self.text)
        self.held = start is not None  # from a whole marker on, everything waits for the end
        safe = self.text[:start if start is not None else _partial_marker(self.text)].rstrip()
        return self._content_up_to(len(safe))

    def _content_up_to(self, end: int) -> dict:
        if end <= self.sent:
            return {}
        piece, self.sent = self.text[self.sent:end], end
        return {"content": piece}

    def end(self) -> tuple[list[dict], Message]:
        """The last deltas (what was held: content, then each call opened and its arguments) and the whole
        message."""
        if self.named is not None:
            return [], Message(None, [ToolCall(self.named.name, self.text, self.named.id)])
        message = self.policy.parse(self.text)
        deltas = []
        if message.content is not None and (len(message.content) > self.sent or self.sent == 0):
            deltas.append({"content": message.content[self.sent:]})
        for i, call in enumerate(message.tool_calls):
            deltas += [{"tool_calls": [call.header_delta(i)]},
                       {"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}]
        return deltas, message
