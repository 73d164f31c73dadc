"""Protobuf <-> worker records: sampling penalties and logprobs cross the edge intact."""

from __future__ import annotations

import pytest

from moemesh.v1 import common_pb2, worker_pb2
from moemesh.worker.engine.requests import RequestOutput
from moemesh.worker.engine.sampling import SamplingParams, TokenLogprobs
from moemesh.worker.engine.tokenizer import Tokenizer
from moemesh.worker.server.convert import chat_message, output_to_pb, sampling_from_pb
from tests.support.checkpoints import build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return Tokenizer.from_dir(build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def test_unset_penalties_and_logprobs_are_neutral():
    params = sampling_from_pb(common_pb2.SamplingParams(), {})
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.0, 0.0, 1.0)
    assert params.logprobs is None
    assert not params.needs_history


def test_penalties_and_logprobs_are_carried():
    pb = common_pb2.SamplingParams(presence_penalty=0.5, frequency_penalty=-1.25, repetition_penalty=1.5, logprobs=3)
    params = sampling_from_pb(pb, {"repetition_penalty": 1.1})
    assert params.presence_penalty == 0.5
    assert params.frequency_penalty == -1.25
    assert params.repetition_penalty == 1.5, "a set field wins over the model default"
    assert params.logprobs == 3
    assert params.needs_history


def test_zero_logprobs_is_not_unset():
    assert sampling_from_pb(common_pb2.SamplingParams(logprobs=0), {}).logprobs == 0


def test_repetition_penalty_defaults_to_the_generation_config_but_presence_and_frequency_do_not():
    defaults = {"repetition_penalty": 1.05, "presence_penalty": 0.7, "frequency_penalty": 0.7}
    params = sampling_from_pb(common_pb2.SamplingParams(), defaults)
    assert params.repetition_penalty == pytest.approx(1.05)
    assert (params.presence_penalty, params.frequency_penalty) == (0.0, 0.0)


def test_a_null_repetition_penalty_default_is_neutral():
    assert sampling_from_pb(common_pb2.SamplingParams(), {"repetition_penalty": None}).repetition_penalty == 1.0


def test_output_logprobs_become_token_logprobs_with_top_alternatives(tokenizer):
    output = RequestOutput(
        request_id="r1", text="ab", token_ids=[5, 7],
        logprobs=[TokenLogprobs(5, -0.25, [(5, -0.25), (2, -1.5)]), TokenLogprobs(7, -2.0, [(3, -0.5), (7, -2.0)])],
    )
    event = output_to_pb(output, tokenizer)
    assert isinstance(event, worker_pb2.RequestEvent)
    assert list(event.token_ids) == [5, 7]
    assert [(lp.token_id, lp.logprob) for lp in event.logprobs] == [(5, -0.25), (7, -2.0)]
    assert [[(t.token_id, t.logprob) for t in lp.top] for lp in event.logprobs] == [
        [(5, -0.25), (2, -1.5)], [(3, -0.5), (7, -2.0)]]
    # Each token is named by its text, alternatives included (the EOS token's text is its special token).
    assert [lp.token for lp in event.logprobs] == [tokenizer.decode([5]), tokenizer.decode([7])]
    assert [t.token for t in event.logprobs[0].top] == [tokenizer.decode([5]), "</s>"]
    # Survives the wire.
    assert worker_pb2.RequestEvent.FromString(event.SerializeToString()) == event


def test_logprobs_zero_gives_an_empty_top_and_none_requested_gives_no_logprobs(tokenizer):
    event = output_to_pb(RequestOutput(request_id="r", token_ids=[1], logprobs=[TokenLogprobs(1, -0.125, [])]),
                         tokenizer)
    assert len(event.logprobs) == 1 and len(event.logprobs[0].top) == 0
    assert len(output_to_pb(RequestOutput(request_id="r", token_ids=[1]), tokenizer).logprobs) == 0


def test_prompt_logprobs_go_out_with_their_token_texts(tokenizer):
    output = RequestOutput(request_id="r", token_ids=[9], prompt_logprobs=[
        TokenLogprobs(1, 0.0), TokenLogprobs(40, -1.5, [(41, -0.5), (40, -1.5)])])
    event = output_to_pb(output, tokenizer)
    assert [(lp.token_id, lp.logprob, lp.token) for lp in event.prompt_logprobs] == [
        (1, 0.0, "<s>"), (40, -1.5, tokenizer.decode([40]))]
    assert [t.token_id for t in event.prompt_logprobs[1].top] == [41, 40]


def test_tool_calls_and_tool_results_reach_the_template_in_openai_shape():
    message = common_pb2.ChatMessage(role="assistant", tool_calls=[
        common_pb2.ToolCall(id="call_1", name="lookup", arguments='{"sku": "A-7"}')])
    assert chat_message(message) == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": {"sku": "A-7"}}}]}
    reply = chat_message(common_pb2.ChatMessage(role="tool", content="42", tool_call_id="call_1"))
    assert reply == {"role": "tool", "content": "42", "tool_call_id": "call_1"}


def test_sampling_params_round_trip_through_the_proto():
    original = SamplingParams(max_tokens=9, temperature=0.5, top_p=0.75, top_k=4, min_p=0.125, seed=3,
                              stop=("x",), stop_token_ids=(2,), ignore_eos=True, presence_penalty=0.25,
                              frequency_penalty=0.5, repetition_penalty=1.25, logprobs=2)
    pb = common_pb2.SamplingParams(
        max_tokens=original.max_tokens, temperature=original.temperature, top_p=original.top_p,
        top_k=original.top_k, min_p=original.min_p, seed=original.seed, stop=original.stop,
        stop_token_ids=original.stop_token_ids, ignore_eos=original.ignore_eos,
        presence_penalty=original.presence_penalty, frequency_penalty=original.frequency_penalty,
        repetition_penalty=original.repetition_penalty, logprobs=original.logprobs,
    )
    assert sampling_from_pb(common_pb2.SamplingParams.FromString(pb.SerializeToString()), {}) == original
