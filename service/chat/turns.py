"""Chat over a running engine: prepare the conversation, generate, split reasoning and tools.

`prepare_chat_turn` checks a turn and renders its prompt (the CPU-heavy part, which the APIs run
off their event loop for large turns), `submit_chat_turn` submits it and streams its
`ChatDelta`s, `start_chat_turn` does both;
`run_chat_turn` does both when first iterated (the terminal chat). A reasoning budget runs the
turn in two generations when the first reaches it: the thinking, cut at the budget and closed
(or already closed within it), then the rest of the answer from the prompt plus what came so
far (prefix caching makes the second prefill cheap).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from service.chat.formats import (
    THINK_CLOSE,
    Family,
    OutputSplitter,
    Reasoning,
    ToolSpec,
    asked_reasoning,
    prepare_messages,
    validate_tools,
)
from service.chat.sampling import NO_DEFAULTS, SamplingDefaults
from service.observability.tracing import phase
from service.runtime.interface import (
    Engine,
    FinishReason,
    GenerationRequest,
    RequestError,
    Timings,
    TokenEvent,
    TokenLogprob,
    failure_of,
)
from service.runtime.options import RequestOptions, max_new_tokens_for
from service.runtime.tokenizer import ChatMessage, TextTokenizer


@dataclass(frozen=True)
class ChatTurn:
    """One chat request in domain terms."""

    request_id: str
    messages: tuple[ChatMessage, ...]
    reasoning: Reasoning = Reasoning.DEFAULT
    reasoning_budget_tokens: int | None = None
    tools: tuple[ToolSpec, ...] = ()
    options: RequestOptions = field(default_factory=RequestOptions)


@dataclass(frozen=True)
class ChatUsage:
    """Token counts of a finished turn."""

    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class ChatDelta:
    """New reasoning and answer text; the last delta carries tool calls and the finish data."""

    reasoning: str = ""
    content: str = ""
    tool_calls: tuple[dict[str, Any], ...] = ()  # {"id", "name", "arguments"} each
    finish_reason: FinishReason | None = None
    usage: ChatUsage | None = None
    timings: Timings | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens generated since the last delta
    # On the last delta: the model's sampling defaults the turn ran with (RequestOptions'
    # `sampling_applied`).
    sampling_applied: Mapping[str, float | int] = field(
        default_factory=dict, compare=False, hash=False
    )


@dataclass(frozen=True)
class ChatContext:
    """What a turn needs besides the request: the engine and the model's chat family."""

    engine: Engine
    family: Family
    sampling: SamplingDefaults = NO_DEFAULTS  # the model's, for fields a request leaves unset

    @property
    def tokenizer(self) -> TextTokenizer:
        """The engine's tokenizer (and chat template)."""
        return self.engine.tokenizer


def render_prompt(context: ChatContext, turn: ChatTurn) -> list[int]:
    """Token ids of the turn's prompt (reasoning switch and tools applied)."""
    validate_tools(turn.tools)
    if turn.tools and not offers_tools(context):
        raise RequestError(
            f"tools: this model (chat format {context.family.name!r}) has no way to be offered "
            "tools: its chat template does not render them; send the request without tools"
        )
    messages = prepare_messages(turn.messages, context.family, turn.reasoning, turn.tools)
    tools = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in turn.tools
    ]
    return context.tokenizer.render_chat(messages, **({"tools": tools} if tools else {}))


def offers_tools(context: ChatContext) -> bool:
    """Whether tools reach the prompt: the family lists them, or the chat template renders them."""
    source = context.tokenizer.chat_template_source or ""
    return context.family.tools_in_system or re.search(r"\btools\b", source) is not None


@dataclass(frozen=True)
class PreparedTurn:
    """A checked turn with its prompt rendered: ready to submit."""

    turn: ChatTurn
    prompt: list[int]


def prepare_chat_turn(context: ChatContext, turn: ChatTurn) -> PreparedTurn:
    """Check the turn and render its prompt: the CPU-heavy part, safe to run on any thread."""
    if turn.reasoning_budget_tokens is not None and turn.reasoning_budget_tokens < 1:
        raise RequestError(f"reasoning_budget_tokens {turn.reasoning_budget_tokens} must be >= 1")
    mode, messages = asked_reasoning(turn.messages, context.family, turn.reasoning)
    thinking = context.family.reasoning_enabled(mode) if context.family.supports_reasoning else None
    options = context.sampling.apply(turn.options, thinking)
    turn = replace(turn, messages=messages, reasoning=mode, options=options)
    return PreparedTurn(turn, render_prompt(context, turn))


def submit_chat_turn(context: ChatContext, prepared: PreparedTurn) -> AsyncIterator[ChatDelta]:
    """Submit a prepared turn now (a refusal raises here); its deltas stream after.

    A front end can so answer a refused turn with an error status and start streaming an
    admitted one before its first token exists.
    """
    turn, prompt = prepared.turn, prepared.prompt
    wanted = max_new_tokens_for(
        turn.options.max_new_tokens, context.engine.limits.room(len(prompt))
    )
    thinking = context.family.reasoning_enabled(turn.reasoning)
    budget = turn.reasoning_budget_tokens if thinking else None
    first = _request(turn, prompt, min(wanted, budget) if budget else wanted, turn.request_id)
    stream = context.engine.generate(first)
    return _run_turn(context, turn, prompt, stream, wanted, budget, thinking)


def start_chat_turn(context: ChatContext, turn: ChatTurn) -> AsyncIterator[ChatDelta]:
    """Prepare and submit the turn now, on this thread (a refusal raises here)."""
    with phase("tokenize"):
        prepared = prepare_chat_turn(context, turn)
    return submit_chat_turn(context, prepared)


async def run_chat_turn(context: ChatContext, turn: ChatTurn) -> AsyncIterator[ChatDelta]:
    """Stream the assistant's turn (submitted when first asked for a delta)."""
    async with aclosing(start_chat_turn(context, turn)) as deltas:
        async for delta in deltas:
            yield delta


async def _run_turn(
    context: ChatContext,
    turn: ChatTurn,
    prompt: list[int],
    stream: AsyncIterator[TokenEvent],
    wanted: int,
    budget: int | None,
    thinking: bool,
) -> AsyncIterator[ChatDelta]:
    splitter = OutputSplitter(thinking=thinking)
    events: list[TokenEvent] = []
    async with aclosing(_split(context.engine, stream, splitter, events)) as deltas:
        async for delta in deltas:
            yield delta
    tail = events[-1]
    generated = sum(len(e.token_ids) for e in events)
    if budget and tail.finish_reason is FinishReason.LENGTH and generated < wanted:
        # The first generation stopped at the budget; the answer follows in a second one.
        closing: list[int] = []
        if splitter.thinking:  # the thinking reached its budget: close the block first
            closed = splitter.push(THINK_CLOSE)
            if closed.reasoning or closed.content:
                yield ChatDelta(**_split_fields(closed))
            closing = context.tokenizer.encode(THINK_CLOSE + "\n\n")
        so_far = [*prompt, *(t for e in events for t in e.token_ids), *closing]
        second = _request(turn, so_far, wanted - generated, f"{turn.request_id}-answer")
        events2: list[TokenEvent] = []
        answer = context.engine.generate(second)
        async with aclosing(_split(context.engine, answer, splitter, events2)) as deltas:
            async for delta in deltas:
                yield delta
        events, tail = events + events2, events2[-1]
    final = splitter.finish()
    last = _final(context, splitter, final, events, tail, len(prompt))
    yield replace(last, sampling_applied=turn.options.sampling_applied)


def _request(
    turn: ChatTurn, prompt: Sequence[int], max_new: int, request_id: str
) -> GenerationRequest:
    options = replace(turn.options, max_new_tokens=max_new)
    return GenerationRequest(request_id, tuple(prompt), options)


async def _split(
    engine: Engine,
    stream: AsyncIterator[TokenEvent],
    splitter: OutputSplitter,
    events: list[TokenEvent],
) -> AsyncIterator[ChatDelta]:
    # Closed early (the client went away): the engine's stream too, which aborts the request.
    async with aclosing(stream):
        async for event in stream:
            events.append(event)
            if event.finish_reason is FinishReason.ERROR:
                raise failure_of(event, engine.state)
            delta = splitter.push(event.text)
            if delta.reasoning or delta.content or event.logprobs:
                yield ChatDelta(**_split_fields(delta), logprobs=event.logprobs)


def _split_fields(delta: Any) -> dict[str, str]:
    return {"reasoning": delta.reasoning, "content": delta.content}


def _final(
    context: ChatContext,
    splitter: OutputSplitter,
    final: Any,
    events: list[TokenEvent],
    tail: TokenEvent,
    prompt_tokens: int,
) -> ChatDelta:
    reason = tail.finish_reason
    if splitter.tool_calls and reason is FinishReason.STOP:
        reason = FinishReason.TOOL_CALLS
    first_usage = next(e.usage for e in events if e.usage is not None)
    completion = sum(len(e.token_ids) for e in events)
    reasoning_tokens = len(context.tokenizer.encode(splitter.reasoning_text))
    usage = ChatUsage(
        prompt_tokens,
        completion,
        min(reasoning_tokens, completion),
        first_usage.cached_prompt_tokens,
    )
    phases = [e.timings for e in events if e.timings is not None]  # one per generation
    timings = replace(phases[0], total_s=sum(t.total_s for t in phases))
    calls = tuple({"id": new_call_id(), **call} for call in splitter.tool_calls)
    return ChatDelta(final.reasoning, final.content, calls, reason, usage, timings)


def new_call_id() -> str:
    """An id for a tool call the model made, as OpenAI writes them (both APIs carry it)."""
    return f"call_{uuid.uuid4().hex[:24]}"
