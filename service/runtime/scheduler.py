"""Iteration-level (continuous) batching over the paged KV cache.

Every step: running sequences first (decode one token, or continue a chunked prefill), then
waiting sequences are admitted while the batch, the token budget and the KV blocks allow.
When blocks run out, the most recently admitted running sequence is preempted: its blocks are
released and it goes back to the front of the queue, to be recomputed (its full blocks often
come back from the prefix cache). The runtime bounds the queue before requests get here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from service.runtime.interface import FinishReason, GenerationRequest
from service.runtime.kv_pages import BlockPool, extend_block_hashes


class SeqStatus(StrEnum):
    """Where a sequence is."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """The scheduler's view of one request: its tokens, KV blocks and progress."""

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


@dataclass(frozen=True)
class ScheduledStep:
    """What one model step computes: (sequence, number of new tokens) in batch order."""

    items: list[tuple[Sequence, int]]

    @property
    def num_tokens(self) -> int:
        """Tokens in the packed batch."""
        return sum(count for _, count in self.items)


class Scheduler:
    """Decides each step's batch; owns the waiting queue, the running set and the block pool."""

    def __init__(self, pool: BlockPool, max_batch_size: int, max_num_tokens: int) -> None:
        self.pool = pool
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (the runtime bounds the queue before it gets here)."""
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        """The next step's batch (may preempt running sequences to make room)."""
        budget, items = self.max_num_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            count = min(seq.to_compute, budget)
            if not self._reserve(seq, count, scheduled=[s for s, _ in items]):
                continue
            items.append((seq, count))
            budget -= count
        while self.waiting and budget and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            self._reuse_prefix(seq)
            count = min(seq.to_compute, budget)
            if not self._fits(seq, count):
                self._release(seq)  # give the prefix blocks back while it waits
                break
            self._count_prefix(seq)
            self._allocate(seq, count)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            items.append((seq, count))
            budget -= count
        return ScheduledStep(items)

    def computed(self, seq: Sequence, count: int) -> None:
        """Record that `count` more tokens of `seq` are in the cache; cache its full blocks."""
        seq.num_computed += count
        full = seq.num_computed // self.pool.block_size
        if full > seq.registered_blocks:
            hashes = extend_block_hashes(
                seq.block_hashes, seq.token_ids, self.pool.block_size, full
            )
            for index in range(seq.registered_blocks, full):
                self.pool.register(seq.blocks[index], hashes[index])
            seq.registered_blocks = full

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take `seq` out of the queue or the batch and release its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def _blocks_needed(self, seq: Sequence, count: int) -> int:
        total = -(-(seq.num_computed + count) // self.pool.block_size)
        return max(0, total - len(seq.blocks))

    def _fits(self, seq: Sequence, count: int) -> bool:
        return self._blocks_needed(seq, count) <= self.pool.num_free

    def _allocate(self, seq: Sequence, count: int) -> None:
        seq.blocks.extend(self.pool.allocate(self._blocks_needed(seq, count)))

    def _reserve(self, seq: Sequence, count: int, scheduled: list[Sequence]) -> bool:
        """Allocate for a running sequence, preempting the newest others until it fits."""
        while not self._fits(seq, count):
            victims = [s for s in self.running if s is not seq and s not in scheduled]
            if not victims:
                self._preempt(seq)
                return False
            self._preempt(victims[-1])
        self._allocate(seq, count)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.registered_blocks = [], 0, 0

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take cached blocks for the longest known prefix (always leaving one token to compute)."""
        size = self.pool.block_size
        usable = (len(seq.token_ids) - 1) // size
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, size, usable)
        seq.blocks = self.pool.lookup(hashes[:usable])
        seq.registered_blocks = len(seq.blocks)
        seq.num_computed = len(seq.blocks) * size

    def _count_prefix(self, seq: Sequence) -> None:
        if not seq.prefix_counted:
            seq.prefix_counted = True
            self.prefix_queries += seq.num_prompt
            self.prefix_hits += seq.num_computed
            seq.cached_prompt_tokens = seq.num_computed
