"""Tokenizer: round trips, special tokens, chat templates, streaming detokenization."""

from __future__ import annotations

import json

import pytest

from moemesh.worker.engine.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer
from tests.support.checkpoints import build_tiny_tokenizer

MULTIBYTE_TEXT = "héllo 世界 🎉"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


def stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Push ids one at a time, as an engine emits them; the last piece is the flush."""
    return [detokenizer.push([token_id]) for token_id in ids] + [detokenizer.flush()]


@pytest.mark.parametrize(
    "text", ["The quick brown fox.", "Café crème brûlée, déjà vu!", MULTIBYTE_TEXT, "  spaces\tand\nnewlines  "]
)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_encode_adds_what_the_post_processor_adds(tokenizer):
    assert tokenizer.bos_token_id == 1
    ids = tokenizer.encode("hello")
    assert ids[0] == 1 and 1 not in ids[1:], "the test tokenizer's post-processor puts BOS first"
    assert tokenizer.encode("hello", add_special_tokens=False) == ids[1:]
    assert tokenizer.encode("<s>hello") == [1, *ids], "a BOS in the text is the text's, as in transformers"


def test_special_tokens_come_from_the_checkpoint_files(tokenizer, tokenizer_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tokenizer_dir / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert tokenizer.eos_token_ids == {2}, "from tokenizer_config.json's eos_token"
    assert Tokenizer.from_dir(tmp_path).eos_token_ids == {2, 5}, "generation_config.json's ids are added"
    assert tokenizer.decode([1, *tokenizer.encode("hi", add_special_tokens=False), 2]) == "hi", "special tokens are skipped"


def test_streamed_multibyte_text_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(MULTIBYTE_TEXT, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text should have a character split over tokens"
    pieces = stream(IncrementalDetokenizer(tokenizer), ids)
    assert "".join(pieces) == tokenizer.decode(ids) == MULTIBYTE_TEXT
    assert not any("\ufffd" in piece for piece in pieces), f"a piece holds a broken character: {pieces}"


def test_streaming_after_a_prompt_emits_only_the_generated_text(tokenizer):
    prompt = tokenizer.encode("The router picks")
    generated = tokenizer.encode(" experts 🎉 for each token", add_special_tokens=False)
    pieces = stream(IncrementalDetokenizer(tokenizer, prompt_ids=prompt), generated)
    assert "".join(pieces) == " experts 🎉 for each token"


def test_flush_releases_a_character_cut_short(tokenizer):
    ids = tokenizer.encode("ok 🎉", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    detokenizer = IncrementalDetokenizer(tokenizer)
    text = "".join(detokenizer.push([i]) for i in ids[:cut])
    assert text == tokenizer.decode(ids[:cut]).rstrip("\ufffd"), "incomplete bytes are held back"
    assert detokenizer.flush().startswith("\ufffd"), "at the end, held-back bytes come out as U+FFFD"


def test_chat_template_renders_the_conversation(tokenizer):
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "more"},
    ]
    assert tokenizer.apply_chat_template(messages) == "<s>[INST] hi [/INST]hello</s>[INST] more [/INST]"


def test_chat_template_can_reject_messages(tokenizer):
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tokenizer.apply_chat_template([{"role": "assistant", "content": "first"}])
    with pytest.raises(ValueError, match="role"):
        tokenizer.apply_chat_template([{"content": "no role"}])


def test_chat_template_runs_sandboxed(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "x"}])


def test_without_a_chat_template_the_plain_format_is_used(tokenizer_dir, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    tokenizer = Tokenizer.from_dir(tmp_path)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(messages) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith("<|user|>\nhi\n")


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_a_resumed_stream_cut_inside_a_character_repeats_no_text(tokenizer):
    """Failover: the client got the text of some tokens, the last of them ending inside a character; the new
    replica resumes after those tokens and must send exactly the rest of the text, nothing twice."""
    from moemesh.worker.engine.requests import GenerationRequest
    from moemesh.worker.engine.sampling import SamplingParams
    from moemesh.worker.engine.sequence import Sequence
    from moemesh.worker.engine.stops import append_token, take_output

    prompt = tokenizer.encode("The router picks")
    answer = tokenizer.encode(" ok 🎉 done", add_special_tokens=False)
    cut = next(n for n in range(1, len(answer)) if tokenizer.decode(answer[:n]).endswith("\ufffd"))
    delivered = tokenizer.decode(answer[:cut]).rstrip("\ufffd")  # what the first replica could send
    request = GenerationRequest("r", tuple(prompt), SamplingParams(max_tokens=len(answer), ignore_eos=True),
                                resume_token_ids=tuple(answer[:cut]), resume_text_chars=len(delivered))
    seq = Sequence.from_request(request, IncrementalDetokenizer(tokenizer, prompt_ids=prompt))
    rest = take_output(seq).text
    for token in answer[cut:]:
        append_token(seq, token, None, set(), 1000)
        rest += take_output(seq).text
    assert delivered + rest == tokenizer.decode(answer) == " ok 🎉 done"
