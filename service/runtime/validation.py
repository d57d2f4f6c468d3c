"""Request validation at the engine boundary: refusals name the field and the allowed range."""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.runtime.interface import GenerationRequest, RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class RequestLimits:
    """What the loaded engine can take."""

    vocab_size: int
    max_seq_len: int
    max_kv_tokens: int  # tokens the whole KV cache holds: one request may not need more


def _in_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number, got {type(value).__name__}")
    bad = not math.isfinite(value) or value > high or (value <= low if low_open else value < low)
    if bad:
        bracket = "(" if low_open else "["
        raise RequestError(f"{name} {value} is outside {bracket}{low}, {high}]")


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    return value


def validate_request(request: GenerationRequest, limits: RequestLimits) -> None:
    """Raise RequestError for the first thing wrong with `request`."""
    if not request.request_id:
        raise RequestError("request_id must not be empty")
    _validate_prompt(request, limits)
    s = request.sampling
    _in_range("temperature", s.temperature, 0.0, 100.0)
    _in_range("top_p", s.top_p, 0.0, 1.0, low_open=True)
    _in_range("top_k", _integer("top_k", s.top_k), 0, limits.vocab_size)
    _in_range("min_p", s.min_p, 0.0, 1.0)
    _in_range("repetition_penalty", s.repetition_penalty, 0.0, 10.0, low_open=True)
    _in_range("frequency_penalty", s.frequency_penalty, -2.0, 2.0)
    _in_range("presence_penalty", s.presence_penalty, -2.0, 2.0)
    if s.seed is not None and not 0 <= _integer("seed", s.seed) < 2**63:
        raise RequestError(f"seed {s.seed} is outside [0, 2**63)")
    room = limits.max_seq_len - len(request.prompt_ids)
    if not 1 <= _integer("max_new_tokens", request.max_new_tokens) <= room:
        raise RequestError(
            f"max_new_tokens {request.max_new_tokens} is outside [1, {room}] "
            f"(max sequence length {limits.max_seq_len} minus "
            f"{len(request.prompt_ids)} prompt tokens)"
        )
    if len(request.prompt_ids) + request.max_new_tokens > limits.max_kv_tokens:
        raise RequestError(
            f"prompt plus max_new_tokens ({len(request.prompt_ids) + request.max_new_tokens}) "
            f"exceeds the KV cache of {limits.max_kv_tokens} tokens"
        )
    _validate_stops(request, limits)
    if (
        request.logprobs is not None
        and not 0 <= _integer("logprobs", request.logprobs) <= MAX_LOGPROBS
    ):
        raise RequestError(f"logprobs {request.logprobs} is outside [0, {MAX_LOGPROBS}]")
    if request.deadline is not None and not math.isfinite(request.deadline):
        raise RequestError("deadline must be a finite time")


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
    if len(request.stop_strings) > MAX_STOP_STRINGS:
        raise RequestError(
            f"{len(request.stop_strings)} stop strings; allowed: at most {MAX_STOP_STRINGS}"
        )
    for index, text in enumerate(request.stop_strings):  # messages never quote the text
        if not isinstance(text, str):
            raise RequestError(f"stop_strings[{index}] must be text, got {type(text).__name__}")
        if not 1 <= len(text) <= MAX_STOP_STRING_CHARS:
            raise RequestError(
                f"stop_strings[{index}] has {len(text)} characters; "
                f"allowed: 1 to {MAX_STOP_STRING_CHARS}"
            )
    for token in request.stop_token_ids:
        if not 0 <= _integer("stop token id", token) < limits.vocab_size:
            raise RequestError(f"stop token id {token} is outside [0, {limits.vocab_size})")
