"""What every front end does with the engine, whatever protocol carried the request.

`Serving` holds the started engine's chat context and model info (None until attached, so a
request before that gets NotReadyError). `generate` and `chat` run one request on the engine,
turn an engine failure into its typed error, and note the request and its outcome on the
current call record (for logs, spans and metrics). The gRPC servicer and the HTTP API only
convert their own messages to and from these domain calls.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from service.chat.turns import (
    ChatContext,
    ChatDelta,
    ChatTurn,
    prepare_chat_turn,
    submit_chat_turn,
)
from service.observability.tracing import RequestRecord, current_record, phase
from service.runtime.interface import (
    FinishReason,
    GenerationRequest,
    NotReadyError,
    TokenEvent,
    failure_of,
)
from service.runtime.options import RequestOptions
from service.server.offload import Offload


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo (and the HTTP API's model list) reports."""

    model: str
    family: str
    profile: str
    backend: str
    precision: str
    tensor_parallel: int
    max_context_tokens: int
    engine_id: str
    engine_name: str
    versions: dict[str, str]
    # reasoning_on / reasoning_off / without_reasoning: {option: value}; checkpoint_source
    sampling_defaults: dict[str, Any] = field(default_factory=dict)


class Serving:
    """The engine the front ends serve from, once it is started."""

    def __init__(self, offload: Offload | None = None) -> None:
        self._context: ChatContext | None = None
        self._info: ModelInfo | None = None
        self.offload = offload or Offload()  # large request preparation, off the event loop

    def attach(self, context: ChatContext, info: ModelInfo) -> None:
        """Start serving with a ready engine."""
        self._context, self._info = context, info

    @property
    def info(self) -> ModelInfo | None:
        """The model and engine, once attached."""
        return self._info

    def ready(self) -> ChatContext:
        """The chat context, or NotReadyError while the engine loads."""
        if self._context is None:
            raise NotReadyError("the engine is still loading; retry when readiness is SERVING")
        return self._context

    def model_info(self) -> ModelInfo:
        """The model info, or NotReadyError while the engine loads."""
        self.ready()
        assert self._info is not None  # set together with the context
        return self._info


def generate(context: ChatContext, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
    """Submit a plain generation now (a refusal raises here); stream its events, counting
    tokens as they come (a cancelled stream still counts). Sampling fields the request left
    unset take the model's defaults for a completion without a reasoning mode."""
    request = replace(request, options=context.sampling.apply(request.options, None))
    note_request("text_completion", request.options)
    record = current_record()
    if record is not None:
        record.prompt_tokens = len(request.prompt_ids)
        record.submitted_ns = time.time_ns()  # token-id prompts have no tokenize phase to say it
    return _counted(context, request, context.engine.generate(request), record)


async def _counted(
    context: ChatContext,
    request: GenerationRequest,
    stream: AsyncIterator[TokenEvent],
    record: RequestRecord | None,
) -> AsyncIterator[TokenEvent]:
    completion = 0
    try:
        async for event in stream:
            if event.finish_reason is FinishReason.ERROR:
                raise failure_of(event, context.engine.state)
            completion += len(event.token_ids)
            if record is not None:
                record.completion_tokens = completion
            if event.finish_reason is not None:
                _note_finish(request, completion, event)
                event = replace(event, sampling_applied=request.options.sampling_applied)
            yield event
    finally:
        await stream.aclose()  # a client that went away aborts its request


async def chat(
    context: ChatContext, make_turn: Callable[[], ChatTurn], offload: Offload, size: int
) -> AsyncIterator[ChatDelta]:
    """Convert, check and render the turn (off the loop when the request's `size` on the wire
    is large), then submit it; a refusal raises here. The returned iterator streams its
    deltas, noting the outcome."""
    with phase("tokenize"):
        prepared = await offload.run(lambda: prepare_chat_turn(context, make_turn()), size)
    note_request("chat", prepared.turn.options)
    return _noted(submit_chat_turn(context, prepared))


async def encode(context: ChatContext, text: str, offload: Offload) -> list[int]:
    """Token ids of a prompt text (off the loop when it is large)."""
    with phase("tokenize"):
        return await offload.run(lambda: context.tokenizer.encode(text), len(text))


async def _noted(deltas: AsyncIterator[ChatDelta]) -> AsyncIterator[ChatDelta]:
    async with aclosing(deltas):  # closed early (the client went away): the turn's stream too
        async for delta in deltas:
            record = current_record()
            if record is not None and delta.usage is not None:
                u = delta.usage
                record.finish(
                    u.prompt_tokens,
                    u.completion_tokens,
                    delta.timings,
                    delta.finish_reason,
                    u.reasoning_tokens,
                    u.cached_prompt_tokens,
                )
            yield delta


def note_request(operation: str, options: RequestOptions) -> None:
    """Put the GenAI operation and request attributes on the current call record."""
    record = current_record()
    if record is None:
        return
    sampling, max_tokens = options.sampling, options.max_new_tokens
    record.operation = operation
    record.request_attributes = {
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        **({"gen_ai.request.max_tokens": max_tokens} if max_tokens else {}),
        **({"gen_ai.request.seed": sampling.seed} if sampling.seed is not None else {}),
    }


def _note_finish(request: GenerationRequest, completion: int, last: TokenEvent) -> None:
    record = current_record()
    if record is not None:
        usage = last.usage
        record.finish(
            usage.prompt_tokens if usage else len(request.prompt_ids),
            completion,
            last.timings,
            last.finish_reason,
            cached_prompt_tokens=usage.cached_prompt_tokens if usage else 0,
        )
