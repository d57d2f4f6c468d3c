"""The engine interface every front end uses (gRPC, chat), independent of backend.

Submit a `GenerationRequest`, receive an async stream of `TokenEvent`s ending with one that
carries a finish reason, usage and timings; abort by request id; read `EngineStats`; watch
`EngineState` for readiness; shut down cleanly. The torch runtime (`service.runtime.frontend`)
and the TensorRT-LLM one (`service.runtime.trtllm_runtime`) implement it; `factory` picks one
from the engine's manifest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from service.runtime.options import RequestOptions

if TYPE_CHECKING:
    from service.runtime.tokenizer import TextTokenizer


class FinishReason(StrEnum):
    """Why a request ended."""

    STOP = "stop"  # a stop string, stop token or end-of-turn token
    LENGTH = "length"  # max_new_tokens or the engine's max sequence length
    ABORTED = "aborted"  # abort() or the client went away
    DEADLINE = "deadline"  # its deadline passed
    ERROR = "error"  # the engine failed
    TOOL_CALLS = "tool_calls"  # the chat layer found tool calls in a stopped turn


class EngineState(StrEnum):
    """Readiness as probes see it."""

    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class EngineError(RuntimeError):
    """Base of the runtime's typed errors."""


IN_FLIGHT = "request_id: a request of yours with this id is still in flight; use another id"


class RequestError(EngineError, ValueError):
    """A request the engine refuses; the message names the field and the allowed range."""


class OverloadedError(EngineError):
    """The waiting queue is full; retry later."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NotReadyError(EngineError):
    """The engine is starting, failed or shutting down."""


class RequestFailedError(EngineError):
    """One request failed inside a working engine (a bug); the details are for the server log."""


def failure_of(event: TokenEvent, state: EngineState) -> EngineError:
    """The error for an event with finish reason ERROR: the engine's failure, or the request's."""
    if state is EngineState.FAILED:
        return NotReadyError("the engine failed and this server is restarting; retry elsewhere")
    return RequestFailedError(event.error or "the request failed in the engine")


@dataclass(frozen=True)
class GenerationRequest:
    """One request: its id, its prompt's token ids and what it asks for (`RequestOptions`)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    options: RequestOptions = field(default_factory=RequestOptions)


@dataclass(frozen=True)
class RequestLimits:
    """What the loaded engine can take."""

    vocab_size: int
    max_seq_len: int
    max_kv_tokens: int  # tokens the whole KV cache holds: one request may not need more

    def room(self, prompt_tokens: int) -> int:
        """Tokens a prompt of this length leaves for generation (context and KV cache)."""
        return min(self.max_seq_len, self.max_kv_tokens) - prompt_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a generated token and of the top alternatives at that step."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds."""

    queue_s: float
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class TokenEvent:
    """New tokens of one request, with their text; the last event carries the finish data."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # With `prompt_logprobs`: prompt tokens 1.. given those before them, in an event of their own
    # before the first generated token.
    prompt_logprobs: tuple[TokenLogprob, ...] = ()
    # With `logprobs`, on the last event: the stop token that ended the request (not emitted
    # as a token: not in `token_ids`, the text or the usage), as OpenAI's completions list it.
    stop_logprob: TokenLogprob | None = None
    timings: Timings | None = None
    error: str | None = None
    # On the last event: the model's sampling defaults the request ran with, for the fields its
    # client left unset (the engine leaves it empty; `service.server.operations` sets it).
    sampling_applied: Mapping[str, float | int] = field(
        default_factory=dict, compare=False, hash=False
    )


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and memory."""

    state: EngineState
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_free: int
    kv_block_size: int
    kv_bytes_per_token: int
    uniform_kv_bytes_per_token: int  # what a model with attention in every layer would need
    tokens_processed: int  # tokens run through the model (prefill and decode)
    generated_tokens: int
    preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    steps: int

    @classmethod
    def empty(cls, state: EngineState) -> EngineStats:
        """The stats of an engine that has not loaded yet."""
        return cls(state, **{f.name: 0 for f in fields(cls) if f.name != "state"})

    @property
    def kv_saving(self) -> float:
        """Share of KV memory saved against the uniform model (0.39 for Nemotron-Super-49B)."""
        if not self.uniform_kv_bytes_per_token:
            return 0.0
        return 1.0 - self.kv_bytes_per_token / self.uniform_kv_bytes_per_token

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from cached blocks / prompt tokens looked up."""
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )


class Engine(Protocol):
    """What every backend implements; the servers and the chat layer see nothing else."""

    @property
    def state(self) -> EngineState:
        """Readiness."""
        ...

    @property
    def tokenizer(self) -> TextTokenizer:
        """The model's tokenizer and chat template."""
        ...

    @property
    def limits(self) -> RequestLimits:
        """What one request may ask for (valid once `start()` returned)."""
        ...

    async def start(self) -> None:
        """Load, warm up and begin serving (state READY, or FAILED with the reason logged)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Submit and stream; raises RequestError, OverloadedError or NotReadyError up front.

        The stream has `aclose()`: a consumer that closes it before the final event aborts the
        request (the layers above close it when their own client goes away).
        """
        ...

    def abort(self, request_id: str) -> bool:
        """Stop a request at the next step and free its memory; False if unknown."""
        ...

    def stats(self) -> EngineStats:
        """A snapshot of load and memory."""
        ...

    async def shutdown(self) -> None:
        """Fail pending requests as aborted, stop the loop and workers."""
        ...
