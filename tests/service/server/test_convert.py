"""Protobuf -> domain conversion: sampling options by name, request options in one place."""

from __future__ import annotations

import pytest
from nemotron.v1 import generation_pb2 as pb

from service.runtime.options import SamplingParams
from service.server.convert import options_from_pb, sampling_from_pb


def test_the_api_and_the_domain_carry_the_same_sampling_options():
    assert set(SamplingParams.option_names()) == set(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def test_every_sampling_option_set_in_the_api_reaches_the_domain():
    values = dict(
        temperature=0.5,
        top_p=0.75,
        top_k=7,
        min_p=0.25,
        repetition_penalty=1.5,
        frequency_penalty=-0.5,
        presence_penalty=0.5,
        seed=2**63 + 5,  # uint64 in the API: passed on as sent, validation judges it
    )
    converted = sampling_from_pb(pb.SamplingParams(**values))
    assert (converted.top_k, converted.seed) == (7, 2**63 + 5)  # integers exactly
    assert {name: getattr(converted, name) for name in values} == pytest.approx(values)


def test_unset_options_keep_the_domain_defaults():
    assert sampling_from_pb(pb.SamplingParams(top_k=3)) == SamplingParams(top_k=3)


def test_request_options_leave_an_unset_token_limit_unset():
    limits = pb.GenerationLimits(stop_sequences=["\n\n"], ignore_eos=True)
    options = options_from_pb(pb.SamplingParams(), limits, deadline=12.5)
    assert options.max_new_tokens is None and options.logprobs is None
    assert (options.stop_strings, options.ignore_eos, options.deadline) == (("\n\n",), True, 12.5)
    limited = options_from_pb(pb.SamplingParams(), pb.GenerationLimits(max_new_tokens=0), None)
    assert limited.max_new_tokens == 0  # set, so validation refuses it rather than defaulting
