"""A contiguous per-sequence KV cache, allocated for KV-cached (GQA) layers only.

Each attention layer gets its own [batch, capacity, kv_heads, head_dim] key and value tensors
with that layer's KV-head count; layers without attention, or with a linear replacement, get
none. A forward step appends up to `seq` tokens per row; rows may append different numbers of
tokens (right padding), which the step's mask hides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from engine_build.graph import ModelGraph


class StepAttention(Protocol):
    """One forward step's attention over some KV-cache layout; what the model's layers call.

    `positions` [batch, seq] are the absolute positions of the step's tokens. `attend` stores
    the step's keys and values for `layer` and returns the attention output.
    """

    positions: Tensor

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [batch, seq, heads, hd], k/v [batch, seq, kv_heads, hd] -> [batch, seq, heads, hd]."""
        ...


class CacheCapacityError(ValueError):
    """A step would write past the cache's capacity."""


@dataclass(frozen=True)
class StepLayout:
    """Where one step's tokens go: absolute positions, cache length to read and the mask."""

    positions: Tensor  # [batch, seq] absolute position of every input token
    rows: Tensor  # [batch, seq] row index of every input token
    kv_len: int  # number of cache slots any row needs to read this step
    mask: Tensor  # [batch, 1, seq, kv_len] True where a query may attend to a key


class KVCache:
    """Keys and values of every GQA layer for a batch of sequences."""

    def __init__(
        self,
        graph: ModelGraph,
        batch_size: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = capacity
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for layer in graph.attention_layers:
            shape = (batch_size, capacity, graph.kv_heads_per_layer[layer], graph.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=dtype, device=device)
            self.values[layer] = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_tensors(self) -> int:
        """How many tensors the cache allocated (two per GQA layer)."""
        return len(self.keys) + len(self.values)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for keys and values."""
        return sum(
            t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()]
        )

    def layout(self, seq: int, input_lengths: Tensor) -> StepLayout:
        """Positions and mask for appending `input_lengths[b]` (<= seq) tokens to each row."""
        device = self.lengths.device
        if int(input_lengths.max()) > seq or int(input_lengths.min()) < 0:
            raise ValueError(f"input_lengths must lie in [0, {seq}]")
        if int(self.lengths.max()) + seq > self.capacity:
            raise CacheCapacityError(
                f"step of {seq} tokens after {int(self.lengths.max())} "
                f"exceeds capacity {self.capacity}"
            )
        offsets = torch.arange(seq, device=device)
        positions = self.lengths[:, None] + offsets[None, :]  # [batch, seq]
        new_lengths = self.lengths + input_lengths
        kv_len = int((self.lengths + seq).max())
        keys = torch.arange(kv_len, device=device)
        mask = (keys[None, None, :] <= positions[:, :, None]) & (
            keys[None, None, :] < new_lengths[:, None, None]
        )
        rows = torch.arange(len(self.lengths), device=device)[:, None].expand(-1, seq)
        return StepLayout(positions, rows, kv_len, mask[:, None])

    def step(self, seq: int, input_lengths: Tensor) -> ContiguousStep:
        """The attention of one step appending `input_lengths[b]` (<= seq) tokens per row."""
        return ContiguousStep(self, self.layout(seq, input_lengths))

    def write(self, layer: int, k: Tensor, v: Tensor, layout: StepLayout) -> tuple[Tensor, Tensor]:
        """Store this step's k, v [batch, seq, kv_heads, head_dim]; return [batch, kv_len, ...]."""
        keys, values = self.keys[layer], self.values[layer]
        keys[layout.rows, layout.positions] = k
        values[layout.rows, layout.positions] = v
        return keys[:, : layout.kv_len], values[:, : layout.kv_len]

    def commit(self, input_lengths: Tensor) -> None:
        """Advance each row by the number of real tokens it appended."""
        self.lengths += input_lengths


@dataclass(frozen=True)
class ContiguousStep:
    """`StepAttention` over a contiguous `KVCache`: write, then masked SDPA over the rows."""

    cache: KVCache
    layout: StepLayout

    @property
    def positions(self) -> Tensor:
        """Absolute positions [batch, seq]."""
        return self.layout.positions

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store k, v and attend over everything each row may see."""
        keys, values = self.cache.write(layer, k, v, self.layout)  # [batch, kv_len, kv, hd]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys.transpose(1, 2),
            values.transpose(1, 2),
            attn_mask=self.layout.mask,
            enable_gqa=keys.shape[2] != q.shape[2],
        )  # [batch, heads, seq, head_dim]
        return out.transpose(1, 2)
