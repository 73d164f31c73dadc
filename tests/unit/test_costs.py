"""One request cost estimate for the gateway and the scheduler, with the contract's default max_tokens."""

from __future__ import annotations

import pathlib
import re

from moemesh.gateway import ratelimit
from moemesh.services.core import costs
from moemesh.services.scheduler import dispatcher
from moemesh.v1 import common_pb2, worker_pb2
from moemesh.worker.engine.sampling import SamplingParams

COMMON_PROTO = pathlib.Path(__file__).resolve().parents[2] / "protos" / "moemesh" / "v1" / "common.proto"


def test_an_unset_max_tokens_counts_the_contracts_default():
    documented = re.search(r"max_tokens.*?Default (\d+)\.", COMMON_PROTO.read_text(), re.DOTALL)
    assert documented is not None, "common.proto documents max_tokens' default"
    assert costs.DEFAULT_MAX_TOKENS == int(documented.group(1)) == SamplingParams().max_tokens == 128


def test_the_estimate_is_prompt_plus_the_most_it_may_generate():
    text = worker_pb2.GenerationWork(prompt=common_pb2.Prompt(text="x" * 40),
                                     sampling=common_pb2.SamplingParams(max_tokens=20))
    assert costs.estimate_tokens(text) == 40 // 4 + 1 + 20
    chat = worker_pb2.GenerationWork(prompt=common_pb2.Prompt(chat=common_pb2.ChatMessages(
        messages=[common_pb2.ChatMessage(role="user", content="y" * 8)] * 2)))
    assert costs.estimate_tokens(chat) == 16 // 4 + 1 + 128
    tokenized = worker_pb2.GenerationWork(prompt=common_pb2.Prompt(text="x" * 400), prompt_token_ids=[1, 2, 3])
    assert costs.estimate_tokens(tokenized) == 3 + 128, "token ids, when given, win over the text"


def test_embedding_inputs_count_their_characters():
    assert costs.estimate_text_tokens(["abcd", "", "abcdefghi"]) == 2 + 1 + 3


def test_gateway_and_scheduler_use_the_same_estimate():
    assert ratelimit.estimate_tokens is costs.estimate_tokens
    assert dispatcher.estimate_tokens is costs.estimate_tokens
