"""Batched sampling: greedy, filters, seeds independent of the batch, penalties and logprobs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from moemesh.worker.engine.sampling import SampleResult, SamplingBatch, SamplingParams, TokenLogprobs, sample, sample_tokens


def draw(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int]) -> list[int]:
    batch = SamplingBatch.build(params, seeds, positions, logits.device)
    return sample(logits, batch).tolist()


def random_logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_temperature_zero_is_argmax():
    logits = random_logits(4)
    assert draw(logits, [SamplingParams(temperature=0.0)] * 4, [1, 2, 3, 4], [0] * 4) == logits.argmax(-1).tolist()


def test_top_k_one_is_argmax_even_when_hot():
    logits = random_logits(4)
    params = [SamplingParams(temperature=2.0, top_k=1)] * 4
    assert draw(logits, params, [5, 6, 7, 8], [3] * 4) == logits.argmax(-1).tolist()


def test_same_seed_same_token_whatever_else_is_in_the_batch():
    row = random_logits(1, seed=42)
    alone = draw(row, [SamplingParams(temperature=1.0)], [1234], [7])
    crowd = torch.cat([random_logits(5, seed=1), row, random_logits(3, seed=2)])
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 5 + [SamplingParams(temperature=1.0)] + \
        [SamplingParams(temperature=0.0)] * 3
    mixed = draw(crowd, params, [9, 8, 7, 6, 5, 1234, 1, 2, 3], [0, 1, 2, 3, 4, 7, 0, 0, 0])
    assert mixed[5] == alone[0], "a seeded row must not depend on its neighbours"


def test_different_positions_draw_different_noise():
    logits = torch.zeros(1, 1000)  # uniform: the token is decided by the noise alone
    tokens = {draw(logits, [SamplingParams(temperature=1.0)], [7], [p])[0] for p in range(20)}
    assert len(tokens) > 15, "each output position must get fresh randomness"


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    counts = torch.zeros(3)
    for position in range(3000):
        counts[draw(logits, [SamplingParams(temperature=1.0)], [99], [position])[0]] += 1
    assert torch.allclose(counts / 3000, torch.tensor([0.7, 0.2, 0.1]), atol=0.03), counts


def test_top_p_and_min_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    nucleus = {draw(logits, [SamplingParams(temperature=1.0, top_p=0.7)], [1], [p])[0] for p in range(300)}
    assert nucleus == {0, 1}
    floor = {draw(logits, [SamplingParams(temperature=1.0, min_p=0.5)], [1], [p])[0] for p in range(300)}
    assert floor == {0, 1}


# ---- penalties ---------------------------------------------------------------

def distribution(logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The row's logprobs [V] after penalties, read back through top-V logprobs."""
    vocab = logits.shape[1]
    params = replace(params, logprobs=vocab)
    batch = SamplingBatch.build([params], [0], [len(output)], logits.device,
                                prompt_token_ids=[prompt], output_token_ids=[output])
    top = sample_tokens(logits, batch, [params]).logprobs[0].top
    result = torch.empty(vocab)
    for token, logprob in top:
        result[token] = logprob
    return result


def assert_penalized(logits: list[float], params: SamplingParams, prompt: list[int], output: list[int],
                     expected: list[float]) -> None:
    got = distribution(torch.tensor([logits]), params, prompt, output)
    assert torch.allclose(got, torch.tensor(expected).log_softmax(-1), atol=1e-6), (got, expected)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    # Token 0 is in the prompt, 1 in the output, 2 and 3 unseen.
    assert_penalized([2.0, -1.0, 0.5, 3.0], SamplingParams(repetition_penalty=2.0), [0], [1],
                     [1.0, -2.0, 0.5, 3.0])


def test_presence_penalty_counts_output_tokens_once_and_ignores_the_prompt():
    assert_penalized([1.0, 1.0, 1.0, 1.0], SamplingParams(presence_penalty=0.5), [2, 2], [0, 0, 1],
                     [0.5, 0.5, 1.0, 1.0])


def test_frequency_penalty_scales_with_output_counts_and_ignores_the_prompt():
    assert_penalized([1.0, 1.0, 1.0, 1.0], SamplingParams(frequency_penalty=0.5), [3], [0, 0, 1, 0],
                     [-0.5, 0.5, 1.0, 1.0])


def test_negative_presence_and_frequency_penalties_encourage():
    assert_penalized([0.0, 0.0, 0.0], SamplingParams(presence_penalty=-1.0, frequency_penalty=-0.5), [], [1, 1],
                     [0.0, 2.0, 0.0])


def test_penalties_combine_repetition_first():
    # Repetition: 2 -> 1, -1 -> -2, 3 -> 1.5; then presence 0.25 and frequency 0.5 per output occurrence.
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.5)
    assert_penalized([2.0, -1.0, 0.5, 3.0], params, [3], [0, 0, 1], [-0.25, -2.75, 0.5, 1.5])


def test_greedy_rows_pick_the_penalized_argmax():
    logits = torch.tensor([[3.0, 2.9, 0.0], [3.0, 2.9, 0.0], [3.0, 2.9, 0.0]])
    params = [SamplingParams(temperature=0.0, presence_penalty=0.5),
              SamplingParams(temperature=0.0, repetition_penalty=1.2),
              SamplingParams(temperature=0.0)]
    batch = SamplingBatch.build(params, [1, 2, 3], [1, 0, 1], logits.device,
                                prompt_token_ids=[[], [0], [0]], output_token_ids=[[0], [], [0]])
    assert sample(logits, batch).tolist() == [1, 1, 0]
    assert sample_tokens(logits, batch, params).token_ids == [1, 1, 0]


def test_penalties_do_not_touch_the_callers_logits():
    logits = random_logits(2)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0)] * 2
    batch = SamplingBatch.build(params, [1, 2], [2, 2], logits.device,
                                prompt_token_ids=[[1, 2], [3]], output_token_ids=[[4, 4], [5, 6]])
    sample_tokens(logits, batch, params)
    assert torch.equal(logits, before)


def test_penalties_apply_to_half_precision_logits_in_float32():
    logits = torch.tensor([[3.0, 2.9, 0.0]], dtype=torch.bfloat16)
    params = [SamplingParams(temperature=0.0, frequency_penalty=0.25)]
    batch = SamplingBatch.build(params, [1], [1], logits.device, prompt_token_ids=[[]], output_token_ids=[[0]])
    assert sample(logits, batch).tolist() == [1]


def test_no_penalty_needs_no_history_and_builds_no_penalty_tensors():
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.0, logprobs=3)]
    assert not any(p.needs_history for p in params)
    batch = SamplingBatch.build(params, [1, 2], [0, 0], torch.device("cpu"))
    assert batch.penalty_rows is None and batch.output_ids is None and batch.prompt_ids is None
    logits = random_logits(2)
    assert sample_tokens(logits, batch, params).token_ids == sample(logits, batch).tolist()


def test_needs_history_is_true_for_any_non_neutral_penalty():
    assert not SamplingParams().needs_history
    assert SamplingParams(presence_penalty=0.1).needs_history
    assert SamplingParams(frequency_penalty=-0.1).needs_history
    assert SamplingParams(repetition_penalty=1.1).needs_history


def test_a_penalized_row_without_history_is_an_error():
    with pytest.raises(ValueError, match="required"):
        SamplingBatch.build([SamplingParams(presence_penalty=1.0)], [1], [0], torch.device("cpu"))


def test_only_rows_that_need_history_are_read():
    params = [SamplingParams(), SamplingParams(frequency_penalty=1.0), SamplingParams()]
    batch = SamplingBatch.build(params, [1, 2, 3], [0, 2, 0], torch.device("cpu"),
                                prompt_token_ids=[None, [5], None], output_token_ids=[None, [1, 1], None])
    assert batch.penalty_rows.tolist() == [1]
    assert batch.output_ids.tolist() == [[1, 1]]
    assert batch.prompt_ids is None, "no row has a repetition penalty: the prompt is not needed"


def test_penalized_row_is_independent_of_the_batch():
    row = random_logits(1, seed=7)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2)
    prompt, output = [1, 2, 3, 2], [4, 4, 9]
    alone = [draw_with_history(row, [params], [77], [p], [prompt], [output])[0] for p in range(30)]
    crowd = torch.cat([random_logits(2, seed=3), row, random_logits(2, seed=4)])
    neighbours = [SamplingParams(temperature=0.7, frequency_penalty=1.0), SamplingParams(temperature=0.0)]
    mixed = [
        draw_with_history(crowd, neighbours + [params] + neighbours, [5, 6, 77, 8, 9], [p] * 5,
                          [[0] * 40, [1], prompt, [], [2, 3]], [list(range(25)), [], output, [7], [7, 7, 7]])[2]
        for p in range(30)
    ]
    assert mixed == alone


def test_unpenalized_rows_are_unchanged_by_a_penalized_neighbour():
    logits = random_logits(4, seed=11)
    params = [SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.0), SamplingParams(top_k=5)]
    without = [draw(logits[:3], params, [1, 2, 3], [p] * 3) for p in range(20)]
    penalized = SamplingParams(temperature=1.0, repetition_penalty=2.0)
    with_neighbour = [
        draw_with_history(logits, params + [penalized], [1, 2, 3, 4], [p] * 4, [[]] * 3 + [[1, 2]], [[]] * 4)[:3]
        for p in range(20)
    ]
    assert with_neighbour == without


def draw_with_history(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], positions: list[int],
                      prompts: list[list[int]], outputs: list[list[int]]) -> list[int]:
    batch = SamplingBatch.build(params, seeds, positions, logits.device,
                                prompt_token_ids=prompts, output_token_ids=outputs)
    return sample_tokens(logits, batch, params).token_ids


# ---- logprobs ----------------------------------------------------------------

def test_logprobs_are_the_penalized_distribution_before_temperature_and_filters():
    logits = random_logits(3, seed=5)
    params = [SamplingParams(temperature=0.5, top_k=3, logprobs=4, frequency_penalty=0.7),
              SamplingParams(temperature=1.3, top_p=0.5, logprobs=2),
              SamplingParams(temperature=0.0, logprobs=1)]
    outputs = [[0, 1, 1], [], []]
    batch = SamplingBatch.build(params, [1, 2, 3], [3, 0, 0], logits.device,
                                prompt_token_ids=[[], [], []], output_token_ids=outputs)
    result = sample_tokens(logits, batch, params)
    penalized = logits.clone()
    penalized[0, 0] -= 0.7
    penalized[0, 1] -= 1.4
    expected = penalized.log_softmax(-1)
    for row, (token, lp) in enumerate(zip(result.token_ids, result.logprobs)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(expected[row, token].item(), abs=1e-5)
        assert len(lp.top) == params[row].logprobs
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        best = expected[row].topk(params[row].logprobs)
        assert [t for t, _ in lp.top] == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-5)


def test_rows_without_logprobs_stay_none_and_zero_gives_no_alternatives():
    logits = random_logits(3)
    params = [SamplingParams(), SamplingParams(logprobs=0), SamplingParams(logprobs=5)]
    batch = SamplingBatch.build(params, [1, 2, 3], [0, 0, 0], logits.device)
    result = sample_tokens(logits, batch, params)
    assert result.logprobs[0] is None
    assert isinstance(result.logprobs[1], TokenLogprobs) and result.logprobs[1].top == []
    assert result.logprobs[1].logprob == pytest.approx(logits[1].log_softmax(-1)[result.token_ids[1]].item(), abs=1e-5)
    assert len(result.logprobs[2].top) == 5


def test_no_row_asks_for_logprobs():
    logits = random_logits(2)
    params = [SamplingParams(), SamplingParams(temperature=0.0)]
    result = sample_tokens(logits, SamplingBatch.build(params, [1, 2], [0, 0], logits.device), params)
    assert isinstance(result, SampleResult) and result.logprobs == [None, None]
