"""`moemesh bench`'s measuring core without a server: figures from hand-made timings, the arrival schedule, the
dataset's token counts and shared prefix, the settings' parsing, the loops, and the HTTP stream's parsing."""

from __future__ import annotations

import asyncio
import json
import statistics

import httpx
import pytest
from tokenizers import Tokenizer, processors

from moemesh.loadgen.clients import RequestSpec
from moemesh.loadgen.config import (
    DatasetConfig,
    GoodputLimits,
    LoadLevel,
    parse_goodput,
    parse_levels,
    parse_target,
)
from moemesh.loadgen.dataset import WORDS_PER_TOKEN, Prompt, SyntheticPrompts, TokenCounter, read_prompt_file
from moemesh.loadgen.http_client import HttpClient, chunk_tokens
from moemesh.loadgen.metrics import RequestRecord, level_metrics, meets, stats_ms
from moemesh.loadgen.runner import RequestBudget, closed_loop, open_loop
from moemesh.loadgen.schedule import poisson_arrivals
from tests.support.checkpoints import build_tiny_tokenizer


def record(pieces, e2e, output_tokens=None, prompt_tokens=None) -> RequestRecord:
    return RequestRecord(pieces=list(pieces), e2e=e2e, output_tokens=output_tokens, prompt_tokens=prompt_tokens)


def failed(kind: str, message: str) -> RequestRecord:
    return RequestRecord(e2e=0.01, error_kind=kind, error_message=message)


# ---- figures -------------------------------------------------------------------------------------------------------
def test_percentiles_interpolate_linearly_and_are_reported_in_milliseconds():
    stats = stats_ms([i / 1000 for i in range(1, 101)])  # 1 .. 100 ms
    assert stats.count == 100
    assert stats.mean == pytest.approx(50.5)
    assert (stats.p50, stats.p90, stats.p99) == pytest.approx((50.5, 90.1, 99.01))


def test_no_values_give_no_figures_rather_than_zeros():
    stats = stats_ms([])
    assert stats.count == 0 and stats.mean is None and stats.p50 is None and stats.p99 is None


def test_a_requests_ttft_tpot_and_inter_token_gaps_come_from_its_streamed_pieces():
    # Tokens at 100 ms, 140 ms, two at 240 ms, one at 300 ms; the stream ends at 320 ms.
    timed = record([(0.100, 1), (0.140, 1), (0.240, 2), (0.300, 1)], e2e=0.320)
    assert timed.generated == 5, "without the server's usage, the pieces' tokens are counted"
    assert timed.ttft == pytest.approx(0.100)
    assert timed.tpot == pytest.approx((0.320 - 0.100) / 4)
    assert timed.inter_token_latencies() == pytest.approx([0.040, 0.050, 0.050, 0.060]), \
        "a 100 ms gap before a piece of two tokens counts as two gaps of 50 ms"


def test_the_servers_usage_wins_over_the_pieces_count_and_a_one_token_answer_has_no_tpot():
    assert record([(0.1, 1), (0.2, 1)], e2e=0.3, output_tokens=7).generated == 7
    single = record([(0.1, 1)], e2e=0.1)
    assert single.tpot is None and single.inter_token_latencies() == []


def test_a_levels_throughput_counts_completed_requests_over_its_wall_time():
    records = [record([(0.1, 1), (0.2, 1), (0.3, 1)], e2e=0.3, output_tokens=3, prompt_tokens=10),
               record([(0.2, 1), (0.4, 1), (0.6, 1)], e2e=0.6, output_tokens=3, prompt_tokens=30),
               failed("UNAVAILABLE", "first"), failed("HTTP 503", "busy"), failed("UNAVAILABLE", "second")]
    m = level_metrics(records, duration=2.0)
    assert (m.completed, m.failed) == (2, 3)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.output_throughput == pytest.approx(3.0) and m.total_output_tokens == 6
    assert m.total_token_throughput == pytest.approx((6 + 40) / 2.0)
    assert m.mean_prompt_tokens == pytest.approx(20.0)
    assert m.ttft_ms.p50 == pytest.approx(150.0) and m.e2e_ms.mean == pytest.approx(450.0)
    assert m.tpot_ms.mean == pytest.approx((100 + 200) / 2)
    assert m.itl_ms.count == 4 and m.itl_ms.mean == pytest.approx(150.0)
    assert m.goodput is None, "no limits, no goodput"
    assert {kind: (e.count, e.first_message) for kind, e in m.errors.items()} == {
        "UNAVAILABLE": (2, "first"), "HTTP 503": (1, "busy")}, "errors are counted by status, first message kept"


def test_goodput_counts_only_the_requests_within_every_limit():
    fast = record([(0.05, 1), (0.07, 1), (0.09, 1)], e2e=0.09)  # TTFT 50 ms, TPOT 20 ms
    slow_start = record([(0.50, 1), (0.52, 1)], e2e=0.52)  # TTFT 500 ms
    slow_tokens = record([(0.05, 1), (0.15, 1)], e2e=0.15)  # TPOT 100 ms
    one_token = record([(0.05, 1)], e2e=0.05)  # no TPOT to break
    limits = GoodputLimits(ttft_ms=200, tpot_ms=50)
    assert [meets(r, limits) for r in (fast, slow_start, slow_tokens, one_token)] == [True, False, False, True]
    m = level_metrics([fast, slow_start, slow_tokens, one_token, failed("INTERNAL", "x")], 4.0, limits)
    assert m.goodput == pytest.approx(2 / 4.0)
    assert meets(fast, GoodputLimits(e2e_ms=80)) is False


# ---- the arrival schedule ------------------------------------------------------------------------------------------
def test_poisson_arrivals_start_at_once_and_keep_the_mean_rate():
    arrivals = [t for _, t in zip(range(20_001), poisson_arrivals(rate=8.0, seed=3))]
    assert arrivals[0] == 0.0
    assert all(b >= a for a, b in zip(arrivals, arrivals[1:]))
    assert 20_000 / arrivals[-1] == pytest.approx(8.0, rel=0.03)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    assert statistics.stdev(gaps) == pytest.approx(1 / 8.0, rel=0.05), "exponential gaps: stdev equals the mean"


def test_the_same_seed_gives_the_same_schedule():
    first = [t for _, t in zip(range(50), poisson_arrivals(2.0, seed=7))]
    assert first == [t for _, t in zip(range(50), poisson_arrivals(2.0, seed=7))]
    assert first != [t for _, t in zip(range(50), poisson_arrivals(2.0, seed=8))]


# ---- the dataset ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny tokenizer without a post-processor: it adds nothing, as Qwen's."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), bos=False)


@pytest.fixture(scope="module")
def bos_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """The tiny tokenizer with a post-processor that puts BOS first, as Mistral's and the demo model's do."""
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = tmp_path_factory.mktemp("bos-tokenizer")
    tokenizer.save(str(out / "tokenizer.json"))
    return out


def synthetic(prompt_tokens: int, directory=None, ratio: float = 0.0, seed: int = 0) -> SyntheticPrompts:
    counter = TokenCounter.from_dir(directory) if directory else None
    return SyntheticPrompts(DatasetConfig(prompt_tokens=prompt_tokens, shared_prefix_ratio=ratio), seed, counter)


@pytest.mark.parametrize("which", ["tokenizer_dir", "bos_tokenizer_dir"])
@pytest.mark.parametrize("size", [1, 2, 17, 128, 1000])
def test_synthetic_prompts_have_exactly_the_requested_token_count(request, which, size):
    directory = request.getfixturevalue(which)
    counted = Tokenizer.from_file(str(directory / "tokenizer.json"))
    if size == 1 and which == "bos_tokenizer_dir":  # BOS alone is one token: no prompt text fits
        with pytest.raises(ValueError, match="--prompt-tokens: this tokenizer cannot make a prompt of exactly 1"):
            synthetic(size, directory).prompt(0)
        return
    prompts = synthetic(size, directory)
    for index in range(8):
        prompt = prompts.prompt(index)
        assert prompt.tokens == size
        assert len(counted.encode(prompt.text).ids) == size, f"prompt {index}: {prompt.text!r}"


def test_prompts_are_seeded_by_number_and_warm_up_prompts_are_others():
    prompts = synthetic(64)
    assert prompts.prompt(3) == synthetic(64).prompt(3), "the same seed and number give the same prompt"
    assert prompts.prompt(3) != prompts.prompt(4)
    assert prompts.prompt(3) != synthetic(64, seed=1).prompt(3)
    assert prompts.prompt(0, "warmup") != prompts.prompt(0)


def test_without_a_tokenizer_the_length_is_approximated_in_words():
    prompt = synthetic(200).prompt(0)
    assert prompt.tokens is None
    assert len(prompt.text.split()) == round(200 * WORDS_PER_TOKEN)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
def test_a_shared_prefix_is_the_same_leading_tokens_in_every_prompt(bos_tokenizer_dir, ratio):
    counted = Tokenizer.from_file(str(bos_tokenizer_dir / "tokenizer.json"))
    prompts = synthetic(200, bos_tokenizer_dir, ratio)
    ids = [counted.encode(prompts.prompt(i).text).ids for i in range(6)]
    shared = round(200 * ratio)
    assert all(len(i) == 200 for i in ids)
    assert all(i[:shared] == ids[0][:shared] for i in ids), f"the first {shared} tokens are common to all prompts"
    assert len({tuple(i[shared:]) for i in ids}) == 6, "the rest differs from prompt to prompt"
    assert len(counted.encode(" ".join(prompts.prefix)).ids) == shared


def test_no_shared_prefix_means_prompts_differ_from_the_start_and_a_whole_one_means_one_prompt(bos_tokenizer_dir):
    unshared = synthetic(64, bos_tokenizer_dir, 0.0)
    assert unshared.prefix == [] and len({unshared.prompt(i).text.split()[0] for i in range(8)}) > 1
    whole = synthetic(64, bos_tokenizer_dir, 1.0)
    assert len({whole.prompt(i).text for i in range(4)}) == 1


def test_a_prompt_file_holds_lines_or_jsonl_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('def main():\n\n{"prompt": "import os", "id": 7}\nclass Ledger:\n')
    assert read_prompt_file(path) == ["def main():", "import os", "class Ledger:"]
    path.write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match="--prompt-file: line 1"):
        read_prompt_file(path)


# ---- settings ------------------------------------------------------------------------------------------------------
def test_levels_goodput_and_targets_parse_from_their_flags():
    assert parse_levels("concurrency", "1,8,32") == tuple(LoadLevel("concurrency", v) for v in (1, 8, 32))
    assert [level.label for level in parse_levels("rate", "0.5,4")] == ["0.5 req/s", "4 req/s"]
    assert parse_goodput("ttft:500,tpot:50") == GoodputLimits(ttft_ms=500, tpot_ms=50)
    target = parse_target("http://127.0.0.1:8000/v1/")
    assert not target.is_grpc and target.base_url == "http://127.0.0.1:8000"
    assert parse_target("grpc://127.0.0.1:50051").address == "127.0.0.1:50051"


@pytest.mark.parametrize("parse, text, flag", [
    (lambda t: parse_levels("concurrency", t), "0,2", "--concurrency"),
    (lambda t: parse_levels("concurrency", t), "1.5", "--concurrency"),
    (lambda t: parse_levels("rate", t), "fast", "--rate"),
    (lambda t: parse_levels("rate", t), "inf", "--rate"),
    (parse_goodput, "latency:5", "--goodput"),
    (parse_target, "127.0.0.1:50051", "--target"),
    (parse_target, "grpc://host", "--target"),
])
def test_a_bad_flag_value_is_refused_naming_the_flag(parse, text, flag):
    with pytest.raises(ValueError, match=f"^{flag}:"):
        parse(text)


# ---- the loops -----------------------------------------------------------------------------------------------------
def test_a_budget_ends_at_its_count_or_its_deadline():
    budget = RequestBudget(first_index=100, requests=3, duration=None)
    assert [budget.take() for _ in range(5)] == [100, 101, 102, None, None]
    now = [0.0]
    timed = RequestBudget(0, None, duration=10.0, clock=lambda: now[0])
    assert timed.take() == 0
    now[0] = 10.0
    assert timed.take() is None and timed.expired


class FakeServer:
    """Answers after `latency` seconds and remembers how many requests were in flight at most."""

    def __init__(self, latency: float = 0.01) -> None:
        self.latency = latency
        self.in_flight = self.most_in_flight = 0
        self.sent: list[int] = []

    async def send(self, index: int) -> RequestRecord:
        self.sent.append(index)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await asyncio.sleep(self.latency)
        self.in_flight -= 1
        return record([(self.latency, 1)], e2e=self.latency)


async def test_a_closed_loop_keeps_its_concurrency_in_flight_and_sends_each_prompt_once():
    server = FakeServer()
    records = await closed_loop(server.send, 4, RequestBudget(0, 10, None))
    assert len(records) == 10 and sorted(server.sent) == list(range(10))
    assert server.most_in_flight == 4


async def test_an_open_loop_sends_on_schedule_whatever_is_in_flight():
    server = FakeServer(latency=0.2)
    records = await open_loop(server.send, rate=1000.0, seed=0, budget=RequestBudget(0, 20, None))
    assert len(records) == 20 and sorted(server.sent) == list(range(20))
    assert server.most_in_flight > 4, "arrivals do not wait for answers"


# ---- the HTTP stream -----------------------------------------------------------------------------------------------
SPEC = RequestSpec(model="m", output_tokens=3, temperature=0.0, seed=0, allow_cache=False, timeout=10.0)


def sse(*chunks) -> bytes:
    return "".join(f"data: {json.dumps(c) if isinstance(c, dict) else c}\n\n" for c in chunks).encode()


def text_chunk(text: str, finish: str | None = None) -> dict:
    return {"object": "text_completion", "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def test_a_chunk_counts_a_token_when_it_carries_output():
    assert chunk_tokens(text_chunk("def")) == 1
    assert chunk_tokens(text_chunk("")) == 1, "text held back (a broken character) is still a token"
    assert chunk_tokens(text_chunk("", "length")) == 0, "a bare finish carries no token"
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 3}}) == 0


def client_answering(handler) -> HttpClient:
    return HttpClient(parse_target("http://bench.test"), api_key="k", transport=httpx.MockTransport(handler))


async def test_the_http_client_reads_chunks_and_usage_and_asks_past_the_cache_for_exact_lengths():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"], seen["headers"] = json.loads(request.content), request.headers
        usage = {"prompt_tokens": 5, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}
        return httpx.Response(200, content=sse(text_chunk("a"), text_chunk("b"), text_chunk("c", "length"),
                                               {"choices": [], "usage": usage}, "[DONE]"))

    async with client_answering(handler) as client:
        timed = await client.send(Prompt("hello"), SPEC, 0)
    assert timed.ok and len(timed.pieces) == 3
    assert (timed.output_tokens, timed.prompt_tokens, timed.cached_tokens) == (3, 5, 2)
    assert seen["body"]["ignore_eos"] is True and seen["body"]["max_tokens"] == 3 and seen["body"]["stream"]
    assert seen["body"]["stream_options"] == {"include_usage": True} and "seed" not in seen["body"]
    assert seen["headers"]["cache-control"] == "no-store" and seen["headers"]["authorization"] == "Bearer k"


@pytest.mark.parametrize("response, kind, message", [
    (httpx.Response(429, json={"error": {"message": "slow down", "type": "rate_limit"}}), "HTTP 429", "slow down"),
    (httpx.Response(200, content=sse(text_chunk("a"), {"error": {"message": "aborted", "code": 503}})),
     "stream error 503", "aborted"),
    (httpx.Response(200, content=sse(text_chunk("a"))), "IncompleteStream", "[DONE]"),
])
async def test_the_http_client_reports_failures_by_status(response, kind, message):
    async with client_answering(lambda request: response) as client:
        timed = await client.send(Prompt("hello"), SPEC, 0)
    assert not timed.ok and timed.error_kind == kind and message in timed.error_message
