"""The TensorRT-LLM runtime adapter's translations (TensorRT-LLM itself is not installed here)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine_build.synthetic import write_byte_tokenizer
from service.runtime.interface import (
    EngineState,
    FinishReason,
    GenerationRequest,
    NotReadyError,
    RequestError,
    RequestLimits,
)
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.tokenizer import TextTokenizer
from service.runtime.trtllm_runtime import (
    TENSORRT_LLM_CLASS,
    TensorRTLLMRuntime,
    TensorRTLLMUnavailableError,
    event_from_output,
    generate_kwargs,
    llm_kwargs,
    sampling_kwargs,
    stats_from_iteration,
)

LIMITS = RequestLimits(vocab_size=128256, max_seq_len=131072, max_kv_tokens=10**7)


def test_a_greedy_request_translates_to_sampling_params():
    request = GenerationRequest(
        "r1", (1, 2, 3), RequestOptions(max_new_tokens=64, stop_strings=("</s>",))
    )
    assert sampling_kwargs(request) == {  # greedy as TensorRT-LLM takes it: top_k=1 alone
        "max_tokens": 64,
        "top_k": 1,
        "repetition_penalty": 1.0,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "stop": ["</s>"],
        "include_stop_str_in_output": False,
        "ignore_eos": False,
        "detokenize": True,
    }


def test_a_sampled_request_keeps_every_knob():
    sampling = SamplingParams(
        temperature=0.6,
        top_p=0.95,
        top_k=40,
        min_p=0.05,
        repetition_penalty=1.1,
        frequency_penalty=0.2,
        presence_penalty=0.3,
        seed=7,
    )
    request = GenerationRequest(
        "r2",
        (5,),
        RequestOptions(
            sampling, max_new_tokens=9, stop_token_ids=(128009,), ignore_eos=True, logprobs=3
        ),
    )
    kwargs = generate_kwargs(request)
    assert kwargs["inputs"] == [5] and kwargs["streaming"] is True
    assert kwargs["sampling_params"] == {
        "max_tokens": 9,
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
        "seed": 7,
        "stop_token_ids": [128009],
        "include_stop_str_in_output": False,
        "ignore_eos": True,
        "logprobs": 3,
        "detokenize": True,
    }


def test_llm_arguments_point_at_the_engine_and_size_the_kv_cache():
    assert llm_kwargs(Path("/engines/x"), Path("/models/m"), 0.85) == {
        "model": "/engines/x",
        "tokenizer": "/models/m",
        "gather_generation_logits": True,  # else LLM refuses every request with logprobs
        "kv_cache_config": {"free_gpu_memory_fraction": 0.85, "enable_block_reuse": True},
    }


@pytest.mark.parametrize(("ours", "theirs"), [(None, None), (0, 1), (1, 1), (5, 5)])
def test_logprobs_ask_tensorrt_llm_for_at_least_one(ours, theirs):
    request = GenerationRequest("r1", (1, 2), RequestOptions(max_new_tokens=4, logprobs=ours))
    assert sampling_kwargs(request).get("logprobs") == theirs


def _output(ids_diff, text_diff, ids, reason=None, logprobs_diff=None):
    return SimpleNamespace(
        token_ids_diff=ids_diff,
        text_diff=text_diff,
        token_ids=ids,
        finish_reason=reason,
        logprobs_diff=logprobs_diff,
    )


def test_streamed_outputs_become_events_with_finish_reason_and_usage():
    middle = event_from_output("r", _output([11, 12], "Par", [11, 12]), False, 30)
    assert (middle.token_ids, middle.text, middle.finish_reason) == ((11, 12), "Par", None)
    logprob = SimpleNamespace(logprob=-0.25)
    last = event_from_output(
        "r", _output([13], "is", [11, 12, 13], "length", [{13: logprob}]), True, 30
    )
    assert last.finish_reason is FinishReason.LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (30, 3)
    assert last.logprobs[0].token_id == 13 and last.logprobs[0].logprob == -0.25
    cancelled = event_from_output("r", _output([], "", [11], "cancelled"), True, 30)
    assert cancelled.finish_reason is FinishReason.ABORTED


def test_iteration_stats_become_engine_stats():
    stats = stats_from_iteration(
        {
            "iter": 41,
            "numActiveRequests": 3,
            "numQueuedRequests": 2,
            "kvCacheStats": {
                "maxNumBlocks": 100,
                "freeNumBlocks": 60,
                "usedNumBlocks": 40,
                "tokensPerBlock": 32,
                "reusedBlocks": 5,
                "missedBlocks": 15,
            },
        },
        EngineState.READY,
    )
    assert (stats.running, stats.waiting, stats.steps) == (3, 2, 41)
    assert (stats.kv_blocks_total, stats.kv_blocks_used, stats.kv_blocks_free) == (100, 40, 60)
    assert stats.prefix_cache_hit_rate == 0.25


def _runtime(engine: Path) -> TensorRTLLMRuntime:
    write_byte_tokenizer(engine, eos_id=0)
    arguments = llm_kwargs(engine, engine, 0.9)
    return TensorRTLLMRuntime(engine, TextTokenizer(engine), LIMITS, TENSORRT_LLM_CLASS, arguments)


def test_starting_without_tensorrt_llm_is_a_clear_error(tmp_path):
    runtime = _runtime(tmp_path)
    with pytest.raises(TensorRTLLMUnavailableError, match="tensorrt_llm package is not installed"):
        asyncio.run(runtime.start())
    assert runtime.state is EngineState.FAILED
    with pytest.raises(NotReadyError):
        runtime.generate(GenerationRequest("r", (1,)))


def test_requests_are_validated_before_they_reach_tensorrt_llm(tmp_path):
    runtime = _runtime(tmp_path)
    runtime._state = EngineState.READY  # as after a successful start
    with pytest.raises(RequestError, match=r"top_p 7.0 is outside"):
        runtime.generate(GenerationRequest("r", (1,), RequestOptions(SamplingParams(top_p=7.0))))
