"""Iteration-level (continuous) batching: which sequences run in the next step, and how far.

Every step: running sequences first (decode one token, or continue a chunked prefill), then
waiting sequences are admitted while the batch, the token budget and the KV blocks allow.
When blocks run out, the most recently admitted running sequence is preempted: its blocks are
freed and it goes back to the front of the queue, to be recomputed (its full blocks often
come back from the prefix cache). Blocks themselves are the KV-cache manager's business; the
front end bounds the queue before requests get here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from service.runtime.interface import FinishReason
from service.runtime.kv_manager import KVCacheManager
from service.runtime.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class ScheduledStep:
    """What one model step computes: (sequence, number of new tokens) in batch order."""

    items: list[tuple[Sequence, int]]

    @property
    def num_tokens(self) -> int:
        """Tokens in the packed batch."""
        return sum(count for _, count in self.items)


class Scheduler:
    """Decides each step's batch; owns the waiting queue and the running set."""

    def __init__(self, kv: KVCacheManager, max_batch_size: int, max_num_tokens: int) -> None:
        self.kv = kv
        self.max_batch_size, self.max_num_tokens = max_batch_size, max_num_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        """The next step's batch (may preempt running sequences to make room)."""
        budget, items = self.max_num_tokens, []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:  # preempted earlier in this loop
                continue
            count = min(seq.to_compute, budget, _chunk_cap(seq))
            if not self._reserve(seq, count, scheduled=[s for s, _ in items]):
                continue
            items.append((seq, count))
            budget -= count
        while self.waiting and budget and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.request.options.prompt_logprobs is None:  # cached tokens have no logits
                self.kv.reuse_prefix(seq)
            count = min(seq.to_compute, budget, _chunk_cap(seq))
            if not self.kv.can_fit(seq, count):
                self.kv.free(seq)  # give the prefix blocks back while it waits
                break
            self.kv.count_prefix(seq)
            self.kv.allocate(seq, count)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            items.append((seq, count))
            budget -= count
        return ScheduledStep(items)

    def computed(self, seq: Sequence, count: int) -> None:
        """Record that `count` more tokens of `seq` are in the cache."""
        seq.num_computed += count
        self.kv.cache_full_blocks(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take `seq` out of the queue or the batch and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def _reserve(self, seq: Sequence, count: int, scheduled: list[Sequence]) -> bool:
        """Allocate for a running sequence, preempting the newest others until it fits."""
        while not self.kv.can_fit(seq, count):
            victims = [s for s in self.running if s is not seq and s not in scheduled]
            if not victims:
                self._preempt(seq)
                return False
            self._preempt(victims[-1])
        self.kv.allocate(seq, count)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.preemptions += 1


# Prompt rows scored at once: each needs a vocabulary-wide row of logits (a 128k vocabulary
# at 512 rows is 256 MB in fp32), so a scored prompt is computed in chunks of this many.
SCORED_PROMPT_CHUNK = 512


def _chunk_cap(seq: Sequence) -> int:
    """The most tokens of `seq` one step computes (all, unless its prompt is being scored)."""
    scoring = seq.request.options.prompt_logprobs is not None and not seq.prompt_scored
    return SCORED_PROMPT_CHUNK if scoring and seq.num_computed < seq.num_prompt else 1 << 30
