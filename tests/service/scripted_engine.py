"""A scripted `Engine` for tests of the layers above the runtime (chat, the APIs).

It stands in for the model only: each `generate` answers with the next scripted `Reply`, one
event per byte token, so the chat code, the servers and their clients under test are real.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from service.runtime.interface import (
    EngineState,
    EngineStats,
    FinishReason,
    GenerationRequest,
    RequestLimits,
    Timings,
    TokenEvent,
    Usage,
)
from service.runtime.tokenizer import TextTokenizer

LIMITS = RequestLimits(vocab_size=256, max_seq_len=4096, max_kv_tokens=4096)
FIRST_TIMINGS = Timings(0.01, 0.05, 0.5)


@dataclass(frozen=True)
class Reply:
    """One scripted generation: what the model writes, and how it ends unless cut first."""

    text: str
    finish: FinishReason = FinishReason.STOP
    timings: Timings = FIRST_TIMINGS
    cached_prompt_tokens: int = 0
    error: str | None = None
    refusal: Exception | None = None  # raised by `generate` itself (an overloaded queue, say)


class ScriptedEngine:
    """An `Engine` standing in for the model only; the chat code under test is real.

    Each `generate` answers with the next scripted `Reply`: one event per byte token of its
    text (scripts are ASCII, so each token is a whole character), cut with LENGTH at the
    request's `max_new_tokens` like a real engine; the last event carries the finish reason,
    usage and timings. The requests received are kept in `requests`.
    """

    def __init__(
        self, tokenizer: TextTokenizer, replies: Sequence[Reply], limits: RequestLimits = LIMITS
    ) -> None:
        self._tokenizer, self._replies, self._limits = tokenizer, list(replies), limits
        self._state = EngineState.READY
        self.requests: list[GenerationRequest] = []

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def tokenizer(self) -> TextTokenizer:
        return self._tokenizer

    @property
    def limits(self) -> RequestLimits:
        return self._limits

    async def start(self) -> None:
        self._state = EngineState.READY

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        assert self._replies, f"no scripted reply left for {request.request_id}"
        self.requests.append(request)
        reply = self._replies.pop(0)
        if reply.refusal is not None:
            raise reply.refusal
        return self._stream(request, reply)

    async def _stream(self, request: GenerationRequest, reply: Reply) -> AsyncIterator[TokenEvent]:
        if reply.finish is FinishReason.ERROR:  # what it wrote, then the failure
            for token in self._tokenizer.encode(reply.text):
                yield TokenEvent(request.request_id, (token,), self._tokenizer.decode([token]))
            yield TokenEvent(
                request.request_id, (), "", finish_reason=reply.finish, error=reply.error
            )
            return
        ids = self._tokenizer.encode(reply.text)
        limit = request.options.max_new_tokens
        finish = FinishReason.LENGTH if limit is not None and len(ids) > limit else reply.finish
        ids = ids[:limit]
        usage = Usage(len(request.prompt_ids), len(ids), reply.cached_prompt_tokens)
        for token in ids[:-1]:
            yield TokenEvent(request.request_id, (token,), self._tokenizer.decode([token]))
        last = ids[-1:]
        yield TokenEvent(
            request.request_id,
            tuple(last),
            self._tokenizer.decode(last),
            finish_reason=finish,
            usage=usage,
            timings=reply.timings,
        )

    def abort(self, request_id: str) -> bool:
        return False

    def stats(self) -> EngineStats:
        return EngineStats.empty(self._state)

    async def shutdown(self) -> None:
        self._state = EngineState.STOPPED
