"""Request validation at the engine boundary: refusals name the field and the allowed range."""

from __future__ import annotations

import math

from service.runtime.interface import GenerationRequest, RequestError, RequestLimits
from service.runtime.options import MAX_LOGPROBS, SamplingParams, max_new_tokens_for

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    return value


def validate_request(request: GenerationRequest, limits: RequestLimits) -> int:
    """Raise RequestError for the first thing wrong; else return the request's token limit."""
    if not request.request_id:
        raise RequestError("request_id must not be empty")
    _validate_prompt(request, limits)
    _validate_sampling(request.options.sampling, limits)
    options = request.options
    prompt = len(request.prompt_ids)
    max_new = max_new_tokens_for(options.max_new_tokens, limits.room(prompt))
    room = limits.max_seq_len - prompt
    if not 1 <= _integer("max_new_tokens", max_new) <= room:
        raise RequestError(
            f"max_new_tokens {max_new} is outside [1, {room}] "
            f"(max sequence length {limits.max_seq_len} minus {prompt} prompt tokens)"
        )
    if prompt + max_new > limits.max_kv_tokens:
        raise RequestError(
            f"prompt plus max_new_tokens ({prompt + max_new}) "
            f"exceeds the KV cache of {limits.max_kv_tokens} tokens"
        )
    _validate_stops(request, limits)
    if options.logprobs is not None and not 0 <= _integer("logprobs", options.logprobs) <= (
        MAX_LOGPROBS
    ):
        raise RequestError(f"logprobs {options.logprobs} is outside [0, {MAX_LOGPROBS}]")
    if (
        options.prompt_logprobs is not None
        and not 0 <= _integer("prompt_logprobs", options.prompt_logprobs) <= MAX_LOGPROBS
    ):
        raise RequestError(
            f"prompt_logprobs {options.prompt_logprobs} is outside [0, {MAX_LOGPROBS}]"
        )
    if options.deadline is not None and not math.isfinite(options.deadline):
        raise RequestError("deadline must be a finite time")
    return max_new


def _validate_sampling(sampling: SamplingParams, limits: RequestLimits) -> None:
    """Every option within its range (the ranges are written on `SamplingParams`)."""
    for name, allowed in SamplingParams.ranges().items():
        value = getattr(sampling, name)
        if value is None:  # an optional option left unset (seed)
            continue
        value = _integer(name, value) if allowed.integer else _number(name, value)
        if not math.isfinite(value) or not allowed.contains(value, limits.vocab_size):
            raise RequestError(f"{name} {value} is outside {allowed.describe(limits.vocab_size)}")


def _validate_prompt(request: GenerationRequest, limits: RequestLimits) -> None:
    count = len(request.prompt_ids)
    if not 1 <= count < limits.max_seq_len:
        raise RequestError(
            f"prompt has {count} tokens; allowed: 1 to {limits.max_seq_len - 1} "
            f"(max sequence length {limits.max_seq_len})"
        )
    for token in request.prompt_ids:
        if not 0 <= _integer("prompt token id", token) < limits.vocab_size:
            raise RequestError(f"prompt token id {token} is outside [0, {limits.vocab_size})")


def _validate_stops(request: GenerationRequest, limits: RequestLimits) -> None:
    stops = request.options.stop_strings
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"{len(stops)} stop strings; allowed: at most {MAX_STOP_STRINGS}")
    for index, text in enumerate(stops):  # messages never quote the text
        if not isinstance(text, str):
            raise RequestError(f"stop_strings[{index}] must be text, got {type(text).__name__}")
        if not 1 <= len(text) <= MAX_STOP_STRING_CHARS:
            raise RequestError(
                f"stop_strings[{index}] has {len(text)} characters; "
                f"allowed: 1 to {MAX_STOP_STRING_CHARS}"
            )
    for token in request.options.stop_token_ids:
        if not 0 <= _integer("stop token id", token) < limits.vocab_size:
            raise RequestError(f"stop token id {token} is outside [0, {limits.vocab_size})")
