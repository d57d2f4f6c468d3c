"""The KV-cache manager: blocks for a sequence's next tokens, freed whole, prefixes shared."""

from __future__ import annotations

from service.runtime.block_pool import BlockPool
from service.runtime.interface import GenerationRequest
from service.runtime.kv_manager import KVCacheManager
from service.runtime.sequence import Sequence


def _seq(tokens: int) -> Sequence:
    return Sequence(GenerationRequest("s", tuple(range(1, tokens + 1))), 0.0)


def test_blocks_are_given_for_the_next_tokens_only_and_taken_back_whole():
    kv = KVCacheManager(BlockPool(8, 4))
    seq = _seq(10)
    assert kv.blocks_needed(seq, 6) == 2
    kv.allocate(seq, 6)
    seq.num_computed = 6
    assert kv.blocks_needed(seq, 4) == 1  # 10 tokens need 3 blocks; 2 are held
    assert not kv.can_fit(seq, 100)
    kv.free(seq)
    assert (seq.blocks, seq.num_computed, kv.pool.num_free) == ([], 0, 8)


def test_a_full_computed_block_is_found_by_the_next_sequence_with_that_prefix():
    kv = KVCacheManager(BlockPool(8, 4))
    first = _seq(9)
    kv.allocate(first, 9)
    first.num_computed = 9
    kv.cache_full_blocks(first)  # two full blocks of four
    kv.free(first)
    second = _seq(9)
    kv.reuse_prefix(second)
    kv.count_prefix(second)
    assert second.num_computed == 8 and second.cached_prompt_tokens == 8
    assert (kv.prefix_queries, kv.prefix_hits) == (9, 8)
