"""The engine's view of one request: its tokens, its KV blocks and how far it has been computed."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from service.runtime.interface import FinishReason, GenerationRequest


class SeqStatus(StrEnum):
    """Where a sequence is."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request's tokens (prompt, then generated), KV blocks and progress."""

    request: GenerationRequest
    arrival: float
    token_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    cached_prompt_tokens: int = 0
    registered_blocks: int = 0  # full blocks already offered to the prefix cache
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks so far
    prefix_counted: bool = False  # prefix-cache statistics taken (first admission only)
    prompt_scored: bool = False  # prompt log-probabilities done (not again after preemption)

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_ids)

    @property
    def num_prompt(self) -> int:
        """Prompt length."""
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt

    @property
    def to_compute(self) -> int:
        """Tokens whose KV is not yet in the cache (1 when decoding)."""
        return len(self.token_ids) - self.num_computed
