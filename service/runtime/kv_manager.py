"""The KV-cache manager: KV blocks for sequences, and full blocks shared through the prefix cache.

It sits between the scheduler, which decides who runs, and the block pool, which only counts
references: it knows how many blocks a sequence needs for its next tokens, hands them out,
takes them back, offers every full computed block to the prefix cache and looks a new
sequence's prompt up in it. It keeps the prefix-cache statistics.
"""

from __future__ import annotations

from service.runtime.block_pool import BlockPool, extend_block_hashes
from service.runtime.sequence import Sequence


class KVCacheManager:
    """Blocks for sequences, from one pool; prefix-cache lookups and registrations."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found there

    @property
    def block_size(self) -> int:
        """Tokens per block."""
        return self.pool.block_size

    def blocks_needed(self, seq: Sequence, count: int) -> int:
        """New blocks `seq` needs to hold `count` more tokens."""
        total = -(-(seq.num_computed + count) // self.pool.block_size)
        return max(0, total - len(seq.blocks))

    def can_fit(self, seq: Sequence, count: int) -> bool:
        """Whether the pool has the blocks for `count` more tokens of `seq`."""
        return self.blocks_needed(seq, count) <= self.pool.num_free

    def allocate(self, seq: Sequence, count: int) -> None:
        """Give `seq` the blocks for `count` more tokens (check `can_fit` first)."""
        seq.blocks.extend(self.pool.allocate(self.blocks_needed(seq, count)))

    def free(self, seq: Sequence) -> None:
        """Take back every block of `seq`; it will recompute from its first token."""
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_computed, seq.registered_blocks = [], 0, 0

    def reuse_prefix(self, seq: Sequence) -> None:
        """Take cached blocks for the longest known prefix (always leaving one token to compute)."""
        size = self.pool.block_size
        usable = (len(seq.token_ids) - 1) // size
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, size, usable)
        seq.blocks = self.pool.lookup(hashes[:usable])
        seq.registered_blocks = len(seq.blocks)
        seq.num_computed = len(seq.blocks) * size

    def count_prefix(self, seq: Sequence) -> None:
        """Record the prompt's prefix-cache lookup, once per sequence (its first admission)."""
        if not seq.prefix_counted:
            seq.prefix_counted = True
            self.prefix_queries += seq.num_prompt
            self.prefix_hits += seq.num_computed
            seq.cached_prompt_tokens = seq.num_computed

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Offer every full, computed block of `seq` to the prefix cache."""
        full = seq.num_computed // self.pool.block_size
        if full > seq.registered_blocks:
            hashes = extend_block_hashes(
                seq.block_hashes, seq.token_ids, self.pool.block_size, full
            )
            for index in range(seq.registered_blocks, full):
                self.pool.register(seq.blocks[index], hashes[index])
            seq.registered_blocks = full
