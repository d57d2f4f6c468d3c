"""The `Engine` interface on TensorRT-LLM's LLM API, for engines of both TensorRT-LLM flows.

`tensorrt-llm` engines (TensorRT plans) open with `tensorrt_llm._tensorrt_engine.LLM`;
`tensorrt-llm-pytorch` engines (a Hugging Face checkpoint, ModelOpt-quantized for FP8) with
`tensorrt_llm.LLM`, the PyTorch flow. Requests, streamed outputs and stats are the same classes
in both (`SamplingParams`, `GenerationResult`, the executor's iteration stats).

TensorRT-LLM cannot be installed on our CI machines (PyPI has only a stub that downloads from
NVIDIA's index, and it needs CUDA), so this adapter has NOT been executed by us against the real
package. The tests pin its translation of our requests into TensorRT-LLM's `SamplingParams` and
`generate_async` arguments, of the engine into each flow's `LLM` arguments, and of its streamed
outputs and iteration stats back into our events and stats, against the signatures and fields
in TensorRT-LLM's source (tests/data/trtllm_contract.json, tools/trtllm_contract.py); and the
server runs end to end on a test double of the package checked against the same fixture.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine_build.profiles import EngineLimits
from service.runtime.interface import (
    IN_FLIGHT,
    EngineState,
    EngineStats,
    FinishReason,
    GenerationRequest,
    NotReadyError,
    RequestError,
    RequestLimits,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from service.runtime.tokenizer import TextTokenizer
from service.runtime.validation import validate_request

# TensorRT-LLM's finish reasons -> ours.
FINISH_REASONS = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "cancelled": FinishReason.ABORTED,
    "timeout": FinishReason.DEADLINE,
}


class TensorRTLLMUnavailableError(NotReadyError):
    """The tensorrt_llm package is not importable here."""


# Options whose neutral value TensorRT-LLM spells as "not set".
_UNSET_WHEN = {"top_k": 0, "min_p": 0.0}


def sampling_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """`tensorrt_llm.SamplingParams(**kwargs)` for our request (its token limit resolved).

    Our sampling options carry TensorRT-LLM's own names, so they pass through as they are.
    """
    options, sampling = request.options, request.options.sampling
    kwargs: dict[str, Any] = {"max_tokens": options.max_new_tokens}
    for name in sampling.option_names():
        value = getattr(sampling, name)
        kwargs[name] = None if _UNSET_WHEN.get(name) == value else value
    if sampling.greedy:
        # TensorRT-LLM takes greedy decoding from top_k=1 (its maintainers' advice, issue
        # #646): temperature 0 passes its checks but a kernel divides by temperature + 1e-6,
        # sampling from sharpened logits, and `_greedy_decoding` reads only top_k and top_p.
        for name in ("temperature", "top_p", "top_k", "min_p"):
            kwargs.pop(name, None)
        kwargs["top_k"] = 1
    kwargs |= {
        "stop": list(options.stop_strings) or None,
        "stop_token_ids": list(options.stop_token_ids) or None,
        "include_stop_str_in_output": False,
        "ignore_eos": options.ignore_eos,
        # Our 0 ("the chosen token only") is TensorRT-LLM's 1: with 0 it returns nothing.
        "logprobs": None if options.logprobs is None else max(1, options.logprobs),
        "detokenize": True,
    }
    return {key: value for key, value in kwargs.items() if value is not None}


def generate_kwargs(request: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments of `LLM.generate_async` (sampling params still as a dict)."""
    return {
        "inputs": list(request.prompt_ids),
        "sampling_params": sampling_kwargs(request),
        "streaming": True,
    }


# Each flow's LLM class, as `module.attribute`.
TENSORRT_LLM_CLASS = "tensorrt_llm._tensorrt_engine.LLM"
PYTORCH_LLM_CLASS = "tensorrt_llm.LLM"


def llm_kwargs(
    engine_dir: Path, tokenizer_dir: Path, kv_cache_free_fraction: float
) -> dict[str, Any]:
    """Keyword arguments of the TensorRT-engine `LLM` (kv_cache_config still as a dict).

    `gather_generation_logits=True`: `LLM._check_arguments` refuses any request with
    `logprobs` unless the LLM was made with it.
    """
    return {
        "model": str(engine_dir),
        "tokenizer": str(tokenizer_dir),
        "gather_generation_logits": True,
        "kv_cache_config": {
            "free_gpu_memory_fraction": kv_cache_free_fraction,
            "enable_block_reuse": True,
        },
    }


def pytorch_llm_kwargs(
    engine_dir: Path,
    tensor_parallel: int,
    limits: EngineLimits,
    max_seq_len: int,
    kv_cache_dtype: str,
) -> dict[str, Any]:
    """Keyword arguments of the PyTorch-flow `tensorrt_llm.LLM` (kv_cache_config as a dict).

    Nothing is compiled in this flow, so the profile's limits are given here, explicitly:
    `max_batch_size` unset would become BuildConfig's default, 2048. Chunked prefill, as our
    own runtime does it: without it a prompt longer than `max_num_tokens` is refused.
    `trust_remote_code`: TensorRT-LLM reads the Nemotron-NAS config through the checkpoint's
    configuration_decilm.py. Iteration stats are off in this flow unless asked for.
    """
    return {
        "model": str(engine_dir),
        "tokenizer": str(engine_dir),
        "trust_remote_code": True,
        "tensor_parallel_size": tensor_parallel,
        "max_batch_size": limits.max_batch_size,
        "max_num_tokens": limits.max_num_tokens,
        "max_seq_len": max_seq_len,
        "max_input_len": max_seq_len,  # unset it would become BuildConfig's 1024
        "enable_chunked_prefill": True,
        "enable_iter_perf_stats": True,
        "kv_cache_config": {
            "free_gpu_memory_fraction": limits.kv_cache_free_fraction,
            "enable_block_reuse": True,
            # "fp8" also where the checkpoint carries no KV scales; "auto" follows the checkpoint.
            "dtype": "fp8" if kv_cache_dtype == "fp8" else "auto",
        },
    }


def event_from_output(
    request_id: str, output: Any, finished: bool, prompt_tokens: int
) -> TokenEvent:
    """One streamed `CompletionOutput` (its `*_diff` fields) as our event."""
    logprobs = tuple(
        TokenLogprob(token, float(_chosen_logprob(entry, token)))
        for token, entry in zip(
            output.token_ids_diff,
            getattr(output, "logprobs_diff", None) or [None] * len(output.token_ids_diff),
            strict=True,
        )
        if entry is not None
    )
    reason = FINISH_REASONS.get(str(output.finish_reason)) if finished else None
    if finished and reason is None:
        reason = FinishReason.STOP
    usage = Usage(prompt_tokens, len(output.token_ids)) if finished else None
    return TokenEvent(
        request_id, tuple(output.token_ids_diff), output.text_diff, logprobs, reason, usage
    )


def _chosen_logprob(entry: Any, token: int) -> float:
    """TensorRT-LLM gives a {token: Logprob(logprob=...)} map per position."""
    value = entry[token] if isinstance(entry, dict) else entry
    return getattr(value, "logprob", value)


def request_timings(arrival: float, first_token_at: float | None) -> Timings:
    """Timings from our clock (time.monotonic()): TensorRT-LLM's per-request perf metrics are
    not requested, so its queueing is not seen apart and counts as 0."""
    now = time.monotonic()
    return Timings(0.0, (first_token_at or now) - arrival, now - arrival)


def past_deadline(request: GenerationRequest) -> bool:
    """Whether the request's deadline (a time.monotonic() value) has passed."""
    deadline = request.options.deadline
    return deadline is not None and time.monotonic() > deadline


def stats_from_iteration(stats: dict[str, Any], state: EngineState) -> EngineStats:
    """Our stats from one entry of `LLM.get_stats()` (the executor's iteration stats)."""
    kv = stats.get("kvCacheStats", {})
    total, free = int(kv.get("maxNumBlocks", 0)), int(kv.get("freeNumBlocks", 0))
    return EngineStats(
        state=state,
        running=int(stats.get("numActiveRequests", 0)),
        waiting=int(stats.get("numQueuedRequests", 0)),
        kv_blocks_total=total,
        kv_blocks_used=int(kv.get("usedNumBlocks", total - free)),
        kv_blocks_free=free,
        kv_block_size=int(kv.get("tokensPerBlock", 0)),
        kv_bytes_per_token=0,
        uniform_kv_bytes_per_token=0,
        tokens_processed=0,
        generated_tokens=0,
        preemptions=0,
        prefix_cache_queries=int(kv.get("missedBlocks", 0)) + int(kv.get("reusedBlocks", 0)),
        prefix_cache_hits=int(kv.get("reusedBlocks", 0)),
        steps=int(stats.get("iter", 0)),
    )


class ResultStream:
    """The async iterator `generate` returns: one TensorRT-LLM request's events.

    As our own runtime's stream does: a consumer that stops early, by closing it or dropping
    it, even before the first event (an async generator never started runs no `finally`),
    aborts the request, so TensorRT-LLM frees its KV cache.
    """

    def __init__(self, events: AsyncGenerator[TokenEvent, None], drop: Callable[[], None]) -> None:
        self._events, self._drop, self._done = events, drop, False

    def __aiter__(self) -> ResultStream:
        return self

    async def __anext__(self) -> TokenEvent:
        try:
            event = await anext(self._events)
        except StopAsyncIteration:
            self._done = True
            raise
        except BaseException:  # cancelled, or failed: the request goes too
            self._close()
            raise
        self._done = event.finish_reason is not None
        return event

    async def aclose(self) -> None:
        """Stop consuming; the request is aborted unless it already finished."""
        await self._events.aclose()
        self._close()

    def _close(self) -> None:
        if not self._done:
            self._done = True
            self._drop()

    def __del__(self) -> None:
        self._close()


class TensorRTLLMRuntime:
    """The `Engine` on TensorRT-LLM's LLM API (optional import; needs NVIDIA's container)."""

    def __init__(
        self,
        engine_dir: Path,
        tokenizer: TextTokenizer,
        limits: RequestLimits,
        llm_class: str,
        llm_arguments: dict[str, Any],
    ) -> None:
        self.engine_dir, self._tokenizer, self._limits = engine_dir, tokenizer, limits
        self.llm_class, self.llm_arguments = llm_class, llm_arguments
        self._state = EngineState.STARTING
        self._llm: Any = None
        self._results: dict[str, Any] = {}
        self._last_stats: dict[str, Any] = {}

    @property
    def state(self) -> EngineState:
        """Readiness."""
        return self._state

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer copied into the engine directory at build time."""
        return self._tokenizer

    @property
    def limits(self) -> RequestLimits:
        """What one request may ask for (the engine's build limits)."""
        return self._limits

    async def start(self) -> None:
        """Load the engine with its flow's LLM class."""
        if importlib.util.find_spec("tensorrt_llm") is None:
            self._state = EngineState.FAILED
            raise TensorRTLLMUnavailableError(
                "the tensorrt_llm package is not installed here; serve torch engines instead"
            )
        module, name = self.llm_class.rsplit(".", 1)
        llm_class = getattr(importlib.import_module(module), name)
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
        kwargs = dict(self.llm_arguments)
        kwargs["kv_cache_config"] = llmapi.KvCacheConfig(**kwargs["kv_cache_config"])
        self._llm = await asyncio.to_thread(llm_class, **kwargs)
        self._state = EngineState.READY

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Validate, submit and stream."""
        if self._state is not EngineState.READY:
            raise NotReadyError(f"engine is {self._state.value}")
        max_new_tokens = validate_request(request, self._limits)
        if request.request_id in self._results:
            raise RequestError(IN_FLIGHT)
        request = replace(request, options=replace(request.options, max_new_tokens=max_new_tokens))
        tensorrt_llm = importlib.import_module("tensorrt_llm")
        kwargs = generate_kwargs(request)
        kwargs["sampling_params"] = tensorrt_llm.SamplingParams(**kwargs["sampling_params"])
        arrival = time.monotonic()
        result = self._llm.generate_async(**kwargs)  # submitted now: a refusal raises here
        self._results[request.request_id] = result

        def drop() -> None:  # once: the stream's own `finally` may have aborted it already
            if self._results.pop(request.request_id, None) is not None and not result.finished:
                result.abort()

        return ResultStream(self._stream(request, result, arrival), drop)

    async def _stream(
        self, request: GenerationRequest, result: Any, arrival: float
    ) -> AsyncGenerator[TokenEvent, None]:
        first_token_at = None
        try:
            async for chunk in result:
                output = chunk.outputs[0]
                if first_token_at is None and output.token_ids_diff:
                    first_token_at = time.monotonic()
                if past_deadline(request) and not chunk.finished:
                    result.abort()
                    usage = Usage(len(request.prompt_ids), len(output.token_ids))
                    yield TokenEvent(
                        request.request_id, (), "", (), FinishReason.DEADLINE, usage,
                        timings=request_timings(arrival, first_token_at),
                    )  # fmt: skip
                    return
                event = event_from_output(
                    request.request_id, output, chunk.finished, len(request.prompt_ids)
                )
                if event.finish_reason is not None:
                    # The last event carries the request's timings (the chat layer needs them).
                    event = replace(event, timings=request_timings(arrival, first_token_at))
                yield event
        finally:
            self._results.pop(request.request_id, None)
            if not result.finished:
                result.abort()

    def abort(self, request_id: str) -> bool:
        """Abort through the request's GenerationResult."""
        result = self._results.get(request_id)
        if result is None:
            return False
        result.abort()
        return True

    def stats(self) -> EngineStats:
        """The latest iteration stats the executor reported."""
        if self._llm is not None:
            latest = self._llm.get_stats(timeout=0.01)
            if latest:
                self._last_stats = latest[-1]
        stats = stats_from_iteration(self._last_stats, self._state)
        if not self._results:
            # TensorRT-LLM hands out each iteration's stats once, and after a get_stats that
            # found none, none until the next request is submitted (`IterationResult`,
            # `mark_undone`): the last ones seen may be from mid-request. Nothing in flight
            # here means nothing runs or waits there.
            stats = replace(stats, running=0, waiting=0)
        return stats

    async def shutdown(self) -> None:
        """Stop the executor."""
        if self._llm is not None:
            await asyncio.to_thread(self._llm.shutdown)
        self._state = EngineState.STOPPED
