"""KV block ids: reference counts, a free list and a prefix cache of full blocks.

`BlockPool` hands out block ids with reference counts and keeps full blocks in a prefix cache
keyed by a chained hash of their tokens, so requests sharing a prompt prefix share its blocks.
It knows nothing of sequences: the KV-cache manager decides what to allocate and register.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, blocks: int
) -> list[bytes]:
    """Grow `hashes` to the first `blocks` full blocks of `token_ids` (hashing only new ones).

    Each hash is a BLAKE2b digest of the previous block's hash and this block's token ids, so a
    block's hash identifies its whole prefix; 128 bits make an accidental match between two
    different prefixes, which would serve one request another's keys and values, negligible.
    """
    for index in range(len(hashes), blocks):
        digest = hashlib.blake2b(hashes[-1] if hashes else b"", digest_size=16)
        block = token_ids[index * block_size : (index + 1) * block_size]
        digest.update(array("q", block).tobytes())
        hashes.append(digest.digest())
    return hashes


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Chained hashes of every full block of `token_ids`."""
    return extend_block_hashes([], token_ids, block_size, len(token_ids) // block_size)


class BlockPool:
    """Block ids with reference counts, a free list and an LRU prefix cache of full blocks."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives 0 first
        self._refs = [0] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> hash
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (free or evictable from the prefix cache)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one request."""
        return self.num_blocks - self.num_free

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (evicting least recently used cached ones if needed)."""
        if count > self.num_free:
            raise MemoryError(f"{count} KV blocks requested, {self.num_free} free")
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced cached blocks stay reusable."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`, each with a new reference."""
        blocks = []
        for block_hash in hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """Mark a full, computed block as reusable by later requests with the same prefix."""
        if block_hash not in self._cached and block not in self._hash_of:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash
