"""Sampling: filters, penalties, temperature, seeds and log-probabilities, batched."""

from __future__ import annotations

import pytest
import torch

from service.runtime.options import SamplingParams
from service.runtime.sampler import SampleInput, sample_batch


def _row(**params) -> SampleInput:
    return SampleInput(SamplingParams(**params), prompt_ids=(), output_ids=())


def _draws(logits, count=300, **params):
    rng = torch.Generator().manual_seed(0)
    rows = [_row(**params)] * count
    return {token for token, _ in sample_batch(logits.expand(count, -1), rows, rng)}


PROBS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_top_k_top_p_and_min_p_each_restrict_the_choices():
    assert _draws(PROBS, temperature=1.0) == {0, 1, 2, 3}
    assert _draws(PROBS, temperature=1.0, top_k=2) == {0, 1}
    assert _draws(PROBS, temperature=1.0, top_p=0.7) == {0, 1}
    assert _draws(PROBS, temperature=1.0, min_p=0.25) == {0, 1, 2}  # 0.15 >= 0.25 * 0.5


def test_penalties_steer_away_from_repeated_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    rng = torch.Generator()
    plain = SampleInput(SamplingParams(), prompt_ids=(), output_ids=(0, 0))
    repeat = SampleInput(SamplingParams(repetition_penalty=1.5), prompt_ids=(0,), output_ids=())
    frequency = SampleInput(SamplingParams(frequency_penalty=0.1), prompt_ids=(), output_ids=(0, 0))
    presence = SampleInput(SamplingParams(presence_penalty=0.2), prompt_ids=(), output_ids=(0,))
    chosen = [
        t for t, _ in sample_batch(logits.expand(4, -1), [plain, repeat, frequency, presence], rng)
    ]
    assert chosen == [0, 1, 1, 1]


def test_seeded_rows_do_not_depend_on_their_neighbours():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    seeded = SampleInput(SamplingParams(temperature=1.0, seed=42), (), (5, 6, 7))
    alone = sample_batch(logits[:1], [seeded], torch.Generator().manual_seed(0))
    noise = [_row(temperature=1.0)] * 5
    busy = torch.cat([logits[1:4], logits[:1], logits[4:]])  # the seeded row in 4th place
    mixed = sample_batch(busy, [*noise[:3], seeded, *noise[3:]], torch.Generator().manual_seed(123))
    assert mixed[3] == alone[0]


def test_the_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    row = SampleInput(SamplingParams(repetition_penalty=2.0), prompt_ids=(0,), output_ids=())
    positive = torch.tensor([[1.0, 0.6, -3.0]])  # token 0 seen: 1.0 / 2 = 0.5 < 0.6
    negative = torch.tensor([[-1.0, -1.5, -3.0]])  # token 0 seen: -1.0 * 2 = -2.0 < -1.5
    assert sample_batch(positive, [row], torch.Generator())[0][0] == 1
    assert sample_batch(negative, [row], torch.Generator())[0][0] == 1


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.tensor([[1.0, 0.9]])
    in_prompt = SampleInput(
        SamplingParams(frequency_penalty=2.0, presence_penalty=2.0),
        prompt_ids=(0, 0, 0),
        output_ids=(),
    )
    generated = SampleInput(SamplingParams(frequency_penalty=2.0), prompt_ids=(), output_ids=(0,))
    assert sample_batch(logits, [in_prompt], torch.Generator())[0][0] == 0
    assert sample_batch(logits, [generated], torch.Generator())[0][0] == 1


def test_temperature_changes_the_distribution_sampled_from():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    cold = _draws(logits, temperature=0.05)
    hot = _draws(logits, temperature=50.0)
    assert cold == {0}
    assert hot == {0, 1, 2, 3}


def test_logprobs_describe_the_raw_distribution_before_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    row = SampleInput(SamplingParams(temperature=5.0, seed=3), (), (), logprobs=1)
    token, logprob = sample_batch(logits, [row], torch.Generator())[0]
    expected = torch.log_softmax(logits[0], -1)
    assert logprob.logprob == pytest.approx(float(expected[token]))
    assert logprob.top[0][0] == 0 and logprob.top[0][1] == pytest.approx(float(expected[0]))
