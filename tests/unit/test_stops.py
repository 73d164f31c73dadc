"""When a sequence stops and what text may go out, with plain sequences and a fake detokenizer (no tokenizer)."""

from __future__ import annotations

from moemesh.worker.engine.requests import GenerationRequest
from moemesh.worker.engine.sampling import SamplingParams
from moemesh.worker.engine.sequence import Sequence
from moemesh.worker.engine.stops import append_token, take_output

EOS = 2
PIECES = {10: "Hel", 11: "lo", 12: " wo", 13: "rld", 14: "!", 15: " E", 16: "ND", EOS: "</s>"}
MAX_LEN = 64


class PieceDetokenizer:
    """Each token id decodes to its own piece (no bytes held across tokens)."""

    def push(self, token_ids: list[int]) -> str:
        return "".join(PIECES[t] for t in token_ids)

    def flush(self) -> str:
        return ""


def sequence(**params) -> Sequence:
    request = GenerationRequest("r", (5, 6, 7), SamplingParams(**params))
    return Sequence.from_request(request, PieceDetokenizer())


def feed(seq: Sequence, tokens: list[int]) -> tuple[str, str | None]:
    """Append tokens one by one as the engine does, taking output after each; (text sent, finish reason)."""
    sent = ""
    for token in tokens:
        ended = append_token(seq, token, None, {EOS}, MAX_LEN)
        sent += take_output(seq).text
        if ended:
            break
    return sent, seq.finish_reason


def test_a_stop_string_across_tokens_cuts_the_text_where_it_starts():
    seq = sequence(stop=("world",))
    assert feed(seq, [10, 11, 12, 13, 14]) == ("Hello ", "stop")
    assert seq.num_generated == 4, "nothing after the token that completed the stop string"


def test_the_tail_that_could_still_become_a_stop_string_is_held_back_until_more_text_decides():
    seq = sequence(stop=(" END",), max_tokens=10)
    append_token(seq, 10, None, {EOS}, MAX_LEN)
    append_token(seq, 15, None, {EOS}, MAX_LEN)  # "Hel E": " E" may be the start of " END"
    assert take_output(seq).text == "He", "the last len(' END') - 1 characters wait"
    append_token(seq, 11, None, {EOS}, MAX_LEN)  # "l Elo": " E" was not one; "Elo" waits in its turn
    assert take_output(seq).text == "l "
    assert feed(seq, [15, 16]) == ("Elo", "stop"), "the held text goes out, cut where ' END' starts"


def test_eos_stops_unless_ignored_and_stop_token_ids_always_stop():
    assert feed(sequence(), [10, EOS, 11]) == ("Hel", "stop")
    assert feed(sequence(ignore_eos=True, max_tokens=3), [10, EOS, 11]) == ("Hel</s>lo", "length")
    assert feed(sequence(ignore_eos=True, stop_token_ids=(14,)), [10, 14, 11]) == ("Hel", "stop")


def test_max_tokens_and_the_context_end_a_sequence():
    assert feed(sequence(max_tokens=2), [10, 11, 12]) == ("Hello", "length")
    long = sequence(max_tokens=100)
    tokens = [10] * (MAX_LEN - 3)  # the prompt holds 3 positions
    text, reason = feed(long, tokens)
    assert reason == "context" and long.num_generated == MAX_LEN - 3 and len(text) == 3 * (MAX_LEN - 3)


def test_new_tokens_are_handed_out_once_with_the_usage_so_far():
    seq = sequence(max_tokens=5)
    append_token(seq, 10, None, {EOS}, MAX_LEN)
    append_token(seq, 11, None, {EOS}, MAX_LEN)
    first = take_output(seq)
    assert (first.token_ids, first.text, first.finish_reason) == ([10, 11], "Hello", None)
    assert (first.prompt_tokens, first.completion_tokens) == (3, 2)
    assert take_output(seq).token_ids == [] and take_output(seq).text == ""
