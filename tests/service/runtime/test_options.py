"""Request options: the one default of max_new_tokens and the ranges written on the options."""

from __future__ import annotations

import pytest

from service.runtime.interface import GenerationRequest, RequestError, RequestLimits
from service.runtime.options import (
    DEFAULT_MAX_NEW_TOKENS,
    RequestOptions,
    SamplingParams,
    max_new_tokens_for,
)
from service.runtime.validation import validate_request

LIMITS = RequestLimits(vocab_size=256, max_seq_len=1024, max_kv_tokens=600)
ROOMY_KV = RequestLimits(vocab_size=256, max_seq_len=1024, max_kv_tokens=10**6)


@pytest.mark.parametrize(
    ("requested", "room", "limit"),
    [
        (None, 5000, DEFAULT_MAX_NEW_TOKENS),  # unset: the default
        (None, 99, 99),  # unset: clamped to the room left
        (None, 0, 1),  # never below 1 (the prompt itself is then refused)
        (700, 99, 700),  # set: kept, so that validation refuses it
    ],
)
def test_max_new_tokens_is_the_default_within_the_room_unless_set(requested, room, limit):
    assert max_new_tokens_for(requested, room) == limit


def _request(prompt: int, **options) -> GenerationRequest:
    return GenerationRequest("r", (1,) * prompt, RequestOptions(**options))


def test_validation_resolves_the_limit_from_the_context_and_the_kv_cache():
    assert validate_request(_request(10), LIMITS) == DEFAULT_MAX_NEW_TOKENS
    assert validate_request(_request(1000), ROOMY_KV) == 24  # the context leaves 24
    assert validate_request(_request(500), LIMITS) == 100  # the KV cache leaves 100
    with pytest.raises(RequestError, match=r"max_new_tokens 25 is outside \[1, 24\]"):
        validate_request(_request(1000, max_new_tokens=25), ROOMY_KV)


def test_a_limit_set_beyond_the_kv_cache_is_refused_not_shortened():
    with pytest.raises(RequestError, match=r"prompt plus max_new_tokens \(601\) exceeds"):
        validate_request(_request(500, max_new_tokens=101), LIMITS)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("temperature", "[0.0, 100.0]"),
        ("top_p", "(0.0, 1.0]"),
        ("top_k", "[0, 256]"),
        ("repetition_penalty", "(0.0, 10.0]"),
        ("seed", "[0, 2**64)"),
    ],
)
def test_each_option_states_its_range(name, text):
    assert SamplingParams.ranges()[name].describe(vocab_size=256) == text


def test_the_seed_range_is_the_apis_uint64_exactly():
    """The proto's seed is uint64: every value it can carry is accepted (2**63 was refused)."""
    for seed in (2**63, 2**64 - 1):
        ok = GenerationRequest("r", (1,), RequestOptions(SamplingParams(seed=seed)))
        assert validate_request(ok, LIMITS) == DEFAULT_MAX_NEW_TOKENS
    bad = GenerationRequest("r", (1,), RequestOptions(SamplingParams(seed=2**64)))
    with pytest.raises(RequestError, match=r"seed 18446744073709551616 is outside \[0, 2\*\*64\)"):
        validate_request(bad, LIMITS)
