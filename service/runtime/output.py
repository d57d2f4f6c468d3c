"""Output processing: a request's new token becomes text, stops are found, events are pushed.

One `RequestState` per request inside the engine: its sequence, its text stream (incremental
detokenization with stop strings held back across tokens), its stop token ids and where its
events go. `OutputProcessor.append` takes a sampled token and says whether the request is done;
`finish_event` builds the last event with the finish reason, usage and timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from service.runtime.interface import FinishReason, Timings, TokenEvent, TokenLogprob, Usage
from service.runtime.sequence import Sequence
from service.runtime.text import StopTextStream
from service.runtime.tokenizer import TextTokenizer


@dataclass(eq=False)
class RequestState:
    """What the engine keeps about one request beside its scheduler `Sequence`."""

    seq: Sequence
    push: Callable[[TokenEvent], None]  # delivers an event to the request's stream
    text: StopTextStream
    stop_ids: frozenset[int]
    max_new_tokens: int  # the effective limit (the default already clamped to the room)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens 1.. so far
    stop_logprob: TokenLogprob | None = None  # of the stop token that ended it, if asked

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.seq.request.request_id


class OutputProcessor:
    """Turns sampled tokens into events; knows the stop ids and the length limits."""

    def __init__(self, tokenizer: TextTokenizer, eos_ids: frozenset[int], max_seq_len: int) -> None:
        self.tokenizer, self.eos_ids, self.max_seq_len = tokenizer, eos_ids, max_seq_len

    def new_state(
        self,
        seq: Sequence,
        push: Callable[[TokenEvent], None],
        max_new_tokens: int,
    ) -> RequestState:
        """The state of a request about to enter the engine."""
        options = seq.request.options
        stop_ids = frozenset(options.stop_token_ids) | (
            frozenset() if options.ignore_eos else self.eos_ids
        )
        text = StopTextStream(self.tokenizer, options.stop_strings)
        return RequestState(seq, push, text, stop_ids, max_new_tokens)

    def append(
        self, state: RequestState, token: int, logprob: TokenLogprob | None
    ) -> tuple[FinishReason | None, bool]:
        """Add a sampled token; (finish reason or None, whether held-back text is flushed)."""
        seq = state.seq
        state.first_token_at = state.first_token_at or time.monotonic()
        if token in state.stop_ids:
            state.stop_logprob = logprob
            return FinishReason.STOP, True
        seq.token_ids.append(token)
        if logprob is not None:
            state.logprobs.append(logprob)
        update = state.text.push(token)
        state.push(
            TokenEvent(
                state.request_id, (token,), update.text, (logprob,) if logprob is not None else ()
            )
        )
        if update.stopped:
            return FinishReason.STOP, False
        if seq.num_generated >= state.max_new_tokens or len(seq.token_ids) >= self.max_seq_len:
            return FinishReason.LENGTH, True
        return None, True

    def finish_event(
        self, state: RequestState, reason: FinishReason, error: str | None, flush: bool
    ) -> TokenEvent:
        """The last event of a request: held-back text, finish reason, usage and timings."""
        seq, tail = state.seq, ""
        if flush and reason is not FinishReason.ERROR:  # held-back text that no stop matched
            final = state.text.finish()
            tail = final.text
            if final.stopped and reason is FinishReason.LENGTH:
                reason = FinishReason.STOP
        now = time.monotonic()
        started = state.scheduled_at or now
        return TokenEvent(
            request_id=state.request_id,
            token_ids=(),
            text=tail,
            finish_reason=reason,
            usage=Usage(seq.num_prompt, seq.num_generated, seq.cached_prompt_tokens),
            timings=Timings(
                queue_s=started - seq.arrival,
                time_to_first_token_s=(state.first_token_at or now) - seq.arrival,
                total_s=now - seq.arrival,
            ),
            error=error,
            stop_logprob=state.stop_logprob,
        )
