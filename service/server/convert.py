"""Protobuf <-> domain objects in one place: servicer and engine never see the other's types."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format, struct_pb2
from nemotron.v1 import generation_pb2 as pb

from service.chat.formats import Reasoning, ToolSpec
from service.chat.turns import ChatDelta, ChatTurn, new_call_id
from service.runtime.interface import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestError,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.tokenizer import ChatMessage

_ROLES = {
    pb.ROLE_SYSTEM: "system",
    pb.ROLE_USER: "user",
    pb.ROLE_ASSISTANT: "assistant",
    pb.ROLE_TOOL: "tool",
}
_REASONING = {
    pb.REASONING_MODE_UNSPECIFIED: Reasoning.DEFAULT,
    pb.REASONING_MODE_ON: Reasoning.ON,
    pb.REASONING_MODE_OFF: Reasoning.OFF,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: pb.FINISH_REASON_ABORTED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
}
_EXACT_INTS = 2**53  # doubles hold every whole number up to here exactly


def sampling_from_pb(message: pb.SamplingParams) -> SamplingParams:
    """The options the client set (same names in the API and the domain); unset ones default."""
    return SamplingParams(**_set_fields(message))


def _set_fields(message: pb.SamplingParams) -> dict[str, Any]:
    names = SamplingParams.option_names()
    return {n: getattr(message, n) for n in names if message.HasField(n)}


def options_from_pb(
    sampling: pb.SamplingParams, limits: pb.GenerationLimits, deadline: float | None
) -> RequestOptions:
    """The request options of a Generate or Chat call (unset max_new_tokens stays unset)."""
    return RequestOptions.asked(
        _set_fields(sampling),
        max_new_tokens=limits.max_new_tokens if limits.HasField("max_new_tokens") else None,
        stop_strings=tuple(limits.stop_sequences),
        stop_token_ids=tuple(limits.stop_token_ids),
        ignore_eos=limits.ignore_eos,
        logprobs=limits.logprobs if limits.HasField("logprobs") else None,
        deadline=deadline,
    )


def deadline_from(time_remaining: float | None) -> float | None:
    """The engine deadline (monotonic) of a call with `time_remaining` seconds left."""
    return None if time_remaining is None else time.monotonic() + time_remaining


def prompt_ids(prompt: pb.Prompt) -> tuple[int, ...]:
    """Token ids of a prompt given as ids (text prompts are tokenized by the caller)."""
    if prompt.WhichOneof("input") is None:
        raise RequestError("prompt: set text or token_ids")
    return tuple(prompt.token_ids.ids)


def generation_from_pb(
    request: pb.GenerateRequest | pb.GenerateStreamRequest,
    request_id: str,
    prompt: Sequence[int],
    deadline: float | None,
) -> GenerationRequest:
    """The engine request of a Generate or GenerateStream call, with its prompt's ids."""
    return GenerationRequest(
        request_id, tuple(prompt), options_from_pb(request.sampling, request.limits, deadline)
    )


def messages_from_pb(messages: Any) -> tuple[ChatMessage, ...]:
    """Chat messages, refusing unset roles and tool fields on roles that do not carry them."""
    return tuple(_message_from_pb(f"messages[{i}]", m) for i, m in enumerate(messages))


def _reasoning_from_pb(value: int) -> Reasoning:
    """The reasoning switch; a value the API does not define is refused, as a bad role is."""
    if value not in _REASONING:
        allowed = ", ".join(pb.ReasoningMode.Name(v) for v in _REASONING)
        raise RequestError(f"reasoning: {value} is not allowed; use {allowed}")
    return _REASONING[value]


def _message_from_pb(field: str, message: pb.ChatMessage) -> ChatMessage:
    if message.role not in _ROLES:
        name = pb.Role.Name(message.role) if message.role in pb.Role.values() else message.role
        raise RequestError(
            f"{field}.role: {name} is not allowed; "
            "use ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
        )
    role, role_name = _ROLES[message.role], pb.Role.Name(message.role)
    if message.tool_calls and role != "assistant":
        raise RequestError(
            f"{field}.tool_calls: only ROLE_ASSISTANT messages carry tool calls, not {role_name}"
        )
    if role == "tool" and not message.tool_call_id:
        raise RequestError(
            f"{field}.tool_call_id: a ROLE_TOOL message needs the id of the call it answers"
        )
    if role != "tool" and message.HasField("tool_call_id"):
        raise RequestError(
            f"{field}.tool_call_id: only ROLE_TOOL messages answer a call, not {role_name}"
        )
    calls = tuple(
        _call_from_pb(f"{field}.tool_calls[{i}]", call) for i, call in enumerate(message.tool_calls)
    )
    return ChatMessage(role, message.content, calls, message.tool_call_id or None)


def _call_from_pb(field: str, call: pb.ToolCall) -> dict[str, Any]:
    """An earlier call as the domain holds it: {"id", "name", "arguments"}."""
    if not call.name:
        raise RequestError(f"{field}.name: a tool call needs the name of the function it calls")
    arguments = _json_object(call.arguments, f"{field}.arguments")
    return {"id": call.id, "name": call.name, "arguments": arguments}


def _json_object(struct: struct_pb2.Struct, field: str) -> dict[str, Any]:
    """A Struct as the JSON object it stands for: keys sorted, whole numbers as ints.

    A Struct is a map whose order the wire does not keep (and Python's protobuf iterates it in a
    per-process order), so keys are sorted: the same conversation renders the same prompt on
    every replica, which the prefix cache needs. Struct keeps every number as a double; giving
    whole ones back as ints renders `{"days": 3}` as the model wrote it.
    """
    try:
        value = json_format.MessageToDict(struct)
    except ValueError as err:  # NaN and infinities have no JSON
        raise RequestError(f"{field}: must be a JSON object ({err})") from None
    return _canonical(value)


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) <= _EXACT_INTS:
        return int(value)
    if isinstance(value, dict):
        return {key: _canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_canonical(item) for item in value]
    return value


def chat_from_pb(
    request: pb.ChatRequest | pb.ChatStreamRequest,
    request_id: str,
    deadline: float | None,
) -> ChatTurn:
    """The domain chat turn of a Chat or ChatStream call."""
    tools = tuple(
        ToolSpec(t.name, t.description, _json_object(t.parameters, f"tools[{i}].parameters"))
        for i, t in enumerate(request.tools)
    )
    return ChatTurn(
        request_id=request_id,
        messages=messages_from_pb(request.messages),
        reasoning=_reasoning_from_pb(request.reasoning),
        reasoning_budget_tokens=request.reasoning_budget_tokens
        if request.HasField("reasoning_budget_tokens")
        else None,
        tools=tools,
        options=options_from_pb(request.sampling, request.limits, deadline),
    )


def finish_to_pb(reason: FinishReason | None) -> int:
    """The enum value of a finish reason (UNSPECIFIED while streaming)."""
    return (
        _FINISH.get(reason, pb.FINISH_REASON_UNSPECIFIED)
        if reason
        else pb.FINISH_REASON_UNSPECIFIED
    )


def timings_to_pb(timings: Timings | None) -> pb.Timings | None:
    """Milliseconds."""
    if timings is None:
        return None
    return pb.Timings(
        queue_ms=timings.queue_s * 1000,
        time_to_first_token_ms=timings.time_to_first_token_s * 1000,
        total_ms=timings.total_s * 1000,
    )


def usage_to_pb(usage: Usage | None) -> pb.Usage | None:
    """Token counts of a generation."""
    if usage is None:
        return None
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def logprobs_to_pb(logprobs: tuple[TokenLogprob, ...]) -> list[pb.TokenLogprob]:
    """Per-token log-probabilities."""
    return [
        pb.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        )
        for lp in logprobs
    ]


def applied_to_pb(applied: Mapping[str, float | int]) -> pb.SamplingParams | None:
    """The sampling defaults a request ran with (None, the field unset, when none applied)."""
    return pb.SamplingParams(**applied) if applied else None


def stream_event_to_pb(request_id: str, event: TokenEvent) -> pb.GenerateStreamResponse:
    """One engine event as a stream message (under the client's request id)."""
    return pb.GenerateStreamResponse(
        request_id=request_id,
        text=event.text,
        token_ids=list(event.token_ids),
        finish_reason=finish_to_pb(event.finish_reason),
        usage=usage_to_pb(event.usage),
        timings=timings_to_pb(event.timings),
        logprobs=logprobs_to_pb(event.logprobs),
        sampling_defaults_applied=applied_to_pb(event.sampling_applied),
    )


def generate_response_to_pb(request_id: str, events: list[TokenEvent]) -> pb.GenerateResponse:
    """All events of a request folded into one response (under the client's request id)."""
    last = events[-1]
    return pb.GenerateResponse(
        request_id=request_id,
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        finish_reason=finish_to_pb(last.finish_reason),
        usage=usage_to_pb(last.usage),
        timings=timings_to_pb(last.timings),
        logprobs=logprobs_to_pb(tuple(lp for e in events for lp in e.logprobs)),
        sampling_defaults_applied=applied_to_pb(last.sampling_applied),
    )


def _tool_calls_to_pb(calls: tuple[dict[str, Any], ...]) -> list[pb.ToolCall]:
    """The model's calls with their ids (one lacking an id gets one, as in the HTTP API)."""
    out = []
    for call in calls:
        arguments = struct_pb2.Struct()
        if isinstance(call.get("arguments"), dict):
            arguments.update(call["arguments"])
        out.append(
            pb.ToolCall(
                id=call.get("id") or new_call_id(), name=call.get("name", ""), arguments=arguments
            )
        )
    return out


def _chat_usage_to_pb(delta: ChatDelta) -> pb.Usage | None:
    usage = delta.usage
    if usage is None:
        return None
    return pb.Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        cached_prompt_tokens=usage.cached_prompt_tokens,
    )


def chat_delta_to_pb(request_id: str, delta: ChatDelta) -> pb.ChatStreamResponse:
    """One chat delta as a stream message."""
    return pb.ChatStreamResponse(
        request_id=request_id,
        content=delta.content,
        reasoning=delta.reasoning,
        tool_calls=_tool_calls_to_pb(delta.tool_calls),
        finish_reason=finish_to_pb(delta.finish_reason),
        usage=_chat_usage_to_pb(delta),
        timings=timings_to_pb(delta.timings),
        logprobs=logprobs_to_pb(delta.logprobs),
        sampling_defaults_applied=applied_to_pb(delta.sampling_applied),
    )


def chat_response_to_pb(request_id: str, deltas: list[ChatDelta]) -> pb.ChatResponse:
    """A whole assistant turn."""
    last = deltas[-1]
    return pb.ChatResponse(
        request_id=request_id,
        content="".join(d.content for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        tool_calls=_tool_calls_to_pb(last.tool_calls),
        finish_reason=finish_to_pb(last.finish_reason),
        usage=_chat_usage_to_pb(last),
        timings=timings_to_pb(last.timings),
        logprobs=logprobs_to_pb(tuple(lp for d in deltas for lp in d.logprobs)),
        sampling_defaults_applied=applied_to_pb(last.sampling_applied),
    )


def stats_to_pb(stats: EngineStats) -> pb.GetEngineStatsResponse:
    """An engine snapshot."""
    return pb.GetEngineStatsResponse(
        running_requests=stats.running,
        waiting_requests=stats.waiting,
        kv_blocks_total=stats.kv_blocks_total,
        kv_blocks_used=stats.kv_blocks_used,
        kv_block_size=stats.kv_block_size,
        kv_bytes_per_token=stats.kv_bytes_per_token,
        uniform_kv_bytes_per_token=stats.uniform_kv_bytes_per_token,
        prefix_cache_hit_rate=stats.prefix_cache_hit_rate,
        preemptions=stats.preemptions,
        tokens_processed=stats.tokens_processed,
        generated_tokens=stats.generated_tokens,
    )
