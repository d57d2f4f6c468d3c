"""What a request asks of the engine besides its prompt: sampling, token limit, stops, log-probs.

`RequestOptions` is shared by plain generation and by chat turns, so a default or a rule about
them is written once: here. Each sampling option carries its allowed range as field metadata,
which `service.runtime.validation` checks and the API documentation states; the TensorRT-LLM
adapter passes options through under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Tokens generated when a request does not say, clamped to the room the context leaves.
DEFAULT_MAX_NEW_TOKENS = 256
MAX_LOGPROBS = 20
VOCAB = "vocab"  # a range bound that is the model's vocabulary size


@dataclass(frozen=True)
class Range:
    """The values an option allows; `high` may be `VOCAB` (the loaded model's vocabulary size)."""

    low: float
    high: float | str
    integer: bool = False
    low_open: bool = False
    high_open: bool = False
    high_text: str = ""  # how the bound is written in messages, when not as a number

    def describe(self, vocab_size: int) -> str:
        """The interval as messages write it, e.g. `(0.0, 1.0]` or `[0, 2**63)`."""
        high = self.high_text or str(self.bound(vocab_size))
        return f"{'(' if self.low_open else '['}{self.low}, {high}{')' if self.high_open else ']'}"

    def bound(self, vocab_size: int) -> float:
        """The upper bound as a number (ints stay ints: 2**63 is not exact as a float)."""
        return vocab_size if isinstance(self.high, str) else self.high

    def contains(self, value: float, vocab_size: int) -> bool:
        """Whether `value` lies in the interval."""
        high = self.bound(vocab_size)
        above = value <= self.low if self.low_open else value < self.low
        below = value >= high if self.high_open else value > high
        return not (above or below)


def _option(default: Any, allowed: Range) -> Any:
    return field(default=default, metadata={"range": allowed})


@dataclass(frozen=True)
class SamplingParams:
    """How each next token is chosen; every field's range is checked by `validate_request`."""

    temperature: float = _option(0.0, Range(0.0, 100.0))
    top_p: float = _option(1.0, Range(0.0, 1.0, low_open=True))
    top_k: int = _option(0, Range(0, VOCAB, integer=True))
    min_p: float = _option(0.0, Range(0.0, 1.0))
    repetition_penalty: float = _option(1.0, Range(0.0, 10.0, low_open=True))
    frequency_penalty: float = _option(0.0, Range(-2.0, 2.0))
    presence_penalty: float = _option(0.0, Range(-2.0, 2.0))
    seed: int | None = _option(
        None,
        Range(0, 2**64, integer=True, high_open=True, high_text="2**64"),  # proto: uint64
    )

    @property
    def greedy(self) -> bool:
        """Argmax decoding (temperature 0, or too small to sample stably)."""
        return self.temperature < 1e-5

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The options' names (the API's SamplingParams fields carry the same names)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def ranges(cls) -> dict[str, Range]:
        """Each option's allowed range."""
        return {f.name: f.metadata["range"] for f in fields(cls)}


@dataclass(frozen=True)
class RequestOptions:
    """Everything a request sets besides its prompt, for generation and chat alike."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS, clamped to the room left
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no log-probabilities; n >= 0: chosen plus top n
    # Log-probabilities of the prompt's own tokens (each given those before it), as `logprobs`;
    # such a request computes its whole prompt (no prefix-cache reuse).
    prompt_logprobs: int | None = None
    deadline: float | None = None  # time.monotonic() value after which the request is dropped
    # The sampling fields the client set (front ends fill it in): the model's defaults fill the
    # others (service/chat/sampling.py). None: the request runs exactly as given.
    sampling_set: frozenset[str] | None = None
    # The model's defaults that filled the fields the client left unset (set with them): what
    # responses report, so that nobody has to guess what ran.
    sampling_applied: Mapping[str, float | int] = field(
        default_factory=dict, compare=False, hash=False
    )

    @classmethod
    def asked(cls, sampling: Mapping[str, Any], **others: Any) -> RequestOptions:
        """The options of a client's request that set exactly these sampling fields (the model's
        defaults fill the others); `others` are the remaining options."""
        return cls(SamplingParams(**sampling), sampling_set=frozenset(sampling), **others)


# Batch sizes whose decode step is compiled by default (service/runtime/compiled.py): here, in a
# module without torch, so that parsing nemotron-serve's flags does not import it.
COMPILED_DECODE_SIZES = (1, 2, 4, 8, 16, 32)


def max_new_tokens_for(requested: int | None, room: int) -> int:
    """The token limit of a request: what it asked for, else the default within the room left.

    `room` is what the context (and the KV cache) leaves after the prompt. A limit the request
    set is kept as it is, so that validation refuses one beyond the room instead of shortening
    the answer silently; an unset one never asks for more than the room (at least 1).
    """
    if requested is not None:
        return requested
    return max(1, min(DEFAULT_MAX_NEW_TOKENS, room))
