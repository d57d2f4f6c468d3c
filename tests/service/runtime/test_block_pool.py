"""The block pool's chained block hashes."""

from __future__ import annotations

from service.runtime.block_pool import block_hashes


def test_block_hashes_chain_over_the_prefix():
    assert block_hashes([1, 2, 3, 4, 5], 2)[1] != block_hashes([9, 9, 3, 4], 2)[1]
    assert block_hashes([1, 2, 3, 4], 2) == block_hashes([1, 2, 3, 4, 7], 2)
