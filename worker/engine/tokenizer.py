"""Text <-> token ids for one checkpoint, chat templates, and streaming detokenization.

`Tokenizer` wraps the fast `tokenizers.Tokenizer` read from `tokenizer.json`
and the special tokens and chat template from `tokenizer_config.json`,
`generation_config.json` and `config.json`. `IncrementalDetokenizer` turns a
stream of generated ids into a stream of text pieces that never split a
character, as text-generation-inference and vLLM do.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# Used when a checkpoint ships no chat template: each message as
# "<|role|>\n{content}\n", then "<|assistant|>\n" when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# A detokenizer decodes this many tokens before the new ones, so that decoders
# which strip a word's leading space at the start of a text (SentencePiece) and
# byte-level pieces of one character still decode as they do in context.
DETOKENIZE_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateError(ValueError):
    """The chat template rejected the messages (e.g. roles out of order)."""


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, special tokens and chat template."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        eos_ids = set(eos_token_ids)
        if eos_token and backend.token_to_id(eos_token) is not None:
            eos_ids.add(backend.token_to_id(eos_token))
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        self.chat_template = chat_template
        self._template = _compile_chat_template(chat_template or DEFAULT_CHAT_TEMPLATE)
        self._token_texts: dict[int, str] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load from a checkpoint directory; ValueError if it has no tokenizer.json."""
        path = Path(path)
        tokenizer_file = path / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ValueError(f"checkpoint {str(path)!r} has no {TOKENIZER_FILE}")
        tokenizer_config = _read_json_if_present(path / TOKENIZER_CONFIG_FILE)
        model_config = _read_json_if_present(path / "config.json")
        generation_config = _read_json_if_present(path / "generation_config.json")
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        bos_token = _token_content(tokenizer_config.get("bos_token"))
        if bos_token is None:
            bos_token = _id_to_token(backend, model_config.get("bos_token_id"))
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=_token_content(tokenizer_config.get("eos_token")),
            eos_token_ids=_ids(generation_config.get("eos_token_id")) | _ids(model_config.get("eos_token_id")),
            chat_template=_find_chat_template(path, tokenizer_config),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, as `transformers` `AutoTokenizer(...)(text)` gives them.

        With `add_special_tokens` the post-processor of tokenizer.json adds what
        it adds (BOS for Llama and Mistral layouts, nothing for Qwen's); without
        it, only the text's own tokens (a rendered chat template carries its own
        BOS). transformers 5 ignores `add_bos_token` / `add_eos_token` in
        tokenizer_config.json when a tokenizer.json is present, and so does this.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless asked for."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text decoded alone, special tokens included (logprobs name tokens by it); remembered."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.backend.decode([token_id], skip_special_tokens=False)
        return text

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
        """Render a conversation to prompt text with the checkpoint's chat template."""
        _check_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


class IncrementalDetokenizer:
    """Turns one sequence's generated ids into text pieces, never splitting a character.

    It keeps a few ids already turned into text as context, then the pending
    ids. Each push decodes the context with and without the pending ids and
    emits the difference, unless it ends in U+FFFD: that is a character whose
    remaining bytes are still to come, so the text is held back until they are.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_ids)[max(len(prompt_ids) - DETOKENIZE_CONTEXT_TOKENS, 0) :]
        self._num_context = len(self._ids)  # ids [0, _num_context) are context, the rest pending

    def push(self, token_ids: Iterable[int]) -> str:
        """Add generated ids; return the text they complete (maybe '')."""
        self._ids.extend(token_ids)
        context, text = self._decode_window()
        if len(text) <= len(context) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._advance()
        return text[len(context) :]

    def flush(self) -> str:
        """Return whatever is still held back (the sequence has ended)."""
        context, text = self._decode_window()
        self._advance()
        return text[len(context) :]

    def _decode_window(self) -> tuple[str, str]:
        """(text of the context ids, text of context + pending ids)."""
        decode = self.tokenizer.decode
        context = decode(self._ids[: self._num_context], self.skip_special_tokens)
        return context, decode(self._ids, self.skip_special_tokens)

    def _advance(self) -> None:
        """Mark pending ids as emitted; keep the last few ids as the next context."""
        del self._ids[: max(len(self._ids) - DETOKENIZE_CONTEXT_TOKENS, 0)]
        self._num_context = len(self._ids)


def _compile_chat_template(source: str) -> jinja2.Template:
    """Compile in a sandbox: templates come with checkpoints, which may be untrusted."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template does not compile: {exc}") from exc


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; chat templates (as in
    # transformers) want the JSON text as it is.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role'")


def _find_chat_template(path: Path, tokenizer_config: dict) -> str | None:
    """The template from chat_template.jinja (newer layout) or tokenizer_config.json."""
    template_file = path / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # older layout: named templates
        named = {t.get("name"): t.get("template") for t in template}
        template = named.get("default")
    return template


def _read_json_if_present(file: Path) -> dict:
    if not file.is_file():
        return {}
    return json.loads(file.read_text(encoding="utf-8"))


def _token_content(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def _id_to_token(backend: tokenizers.Tokenizer, token_id) -> str | None:
    return backend.id_to_token(token_id) if isinstance(token_id, int) else None


def _ids(value) -> set[int]:
    """eos_token_id as configs write it: absent, one int or a list."""
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}
