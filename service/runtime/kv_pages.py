"""The paged KV tensors: fixed-size blocks shared by all requests, for attention layers only.

Block ids come from `service.runtime.block_pool` through the KV-cache manager.
`PagedKVStore` holds the tensors: per GQA layer, [num_blocks * block_size, kv_heads, head_dim]
with that layer's own KV-head count; layers without attention have no storage at all.
`PagedStep` is the model's `StepAttention` for one packed step of many sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from engine_build.graph import ModelGraph


class PagedKVStore:
    """The KV tensors: one flat slot array per GQA layer, with the layer's own KV heads.

    One slot past the blocks (`scratch_slot`) belongs to no sequence: the padding rows of a
    compiled decode step (service/runtime/compiled.py) write and read only there.
    """

    def __init__(
        self,
        graph: ModelGraph,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.block_size = block_size
        slots = num_blocks * block_size
        self.scratch_slot = slots
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}
        for layer in graph.attention_layers:
            shape = (slots + 1, graph.kv_heads_per_layer[layer], graph.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=dtype, device=device)
            self.values[layer] = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_block(graph: ModelGraph, block_size: int, dtype: torch.dtype) -> int:
        """Memory of one block across all GQA layers."""
        return graph.kv_bytes_per_token(torch.tensor([], dtype=dtype).element_size()) * block_size

    @property
    def dtype(self) -> torch.dtype:
        """The storage (and attention compute) dtype."""
        return next(iter(self.keys.values())).dtype if self.keys else torch.float32

    @property
    def num_tensors(self) -> int:
        """Two per GQA layer; none for layers without attention."""
        return len(self.keys) + len(self.values)


@dataclass(frozen=True)
class Segment:
    """One sequence's part of a packed step: new tokens at [start, start + count)."""

    start: int
    count: int
    context: int  # tokens already in the cache before this step
    slots: Tensor  # [context + count] cache slot of every position of the sequence


class PagedStep:
    """`StepAttention` for a packed step: tokens of many sequences in one [1, N] row.

    Decoding sequences (one new token) are attended together, padded to the longest context;
    sequences in prefill are attended one by one with a causal mask offset by their context.
    Masks are additive (0 or -inf) in the compute dtype, built once per step.
    """

    def __init__(self, store: PagedKVStore, positions: Tensor, segments: Sequence[Segment]) -> None:
        self.store, self.positions = store, positions  # positions [1, N]
        self.write_slots = torch.cat([s.slots[s.context :] for s in segments])  # [N]
        device, dtype = positions.device, store.dtype
        decoding = [s for s in segments if s.count == 1]
        self.prefills = [s for s in segments if s.count > 1]
        # Every token decodes (batch-1 decode, pure decode steps): rows are already in order.
        self.decode_only = not self.prefills
        self.decode_rows = torch.tensor(
            [s.start for s in decoding], dtype=torch.long, device=device
        )
        longest = max((s.context + 1 for s in decoding), default=0)
        self.decode_slots = torch.zeros(len(decoding), longest, dtype=torch.long, device=device)
        visible = torch.zeros(len(decoding), 1, 1, longest, dtype=torch.bool, device=device)
        for row, segment in enumerate(decoding):
            self.decode_slots[row, : segment.context + 1] = segment.slots
            visible[row, 0, 0, : segment.context + 1] = True
        self.decode_bias = _bias(visible, dtype)
        self.prefill_biases = [
            _bias(
                torch.ones(s.count, s.context + s.count, dtype=torch.bool, device=device).tril(
                    s.context
                ),
                dtype,
            )
            for s in self.prefills
        ]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Write this step's k, v into their slots, then attend per group."""
        keys, values = self.store.keys[layer], self.store.values[layer]
        keys.index_copy_(0, self.write_slots, k[0])
        values.index_copy_(0, self.write_slots, v[0])
        gqa = keys.shape[1] != q.shape[2]
        if self.decode_only:
            return self._decode(q[0], keys, values, gqa)[None]
        out = torch.empty_like(q)  # [1, N, heads, head_dim]
        if len(self.decode_rows):
            out[0, self.decode_rows] = self._decode(q[0, self.decode_rows], keys, values, gqa)
        for segment, bias in zip(self.prefills, self.prefill_biases, strict=True):
            rows = slice(segment.start, segment.start + segment.count)
            attended = F.scaled_dot_product_attention(
                q[0, rows].transpose(0, 1)[None],  # [1, heads, n, hd]
                keys[segment.slots].transpose(0, 1)[None],  # [1, kv, ctx + n, hd]
                values[segment.slots].transpose(0, 1)[None],
                attn_mask=bias,
                enable_gqa=gqa,
            )
            out[0, rows] = attended[0].transpose(0, 1)
        return out

    def _decode(self, q: Tensor, keys: Tensor, values: Tensor, gqa: bool) -> Tensor:
        """q [B, heads, hd] of the decoding rows -> attention output [B, heads, hd]."""
        attended = F.scaled_dot_product_attention(
            q[:, :, None],  # [B, heads, 1, hd]
            keys[self.decode_slots].transpose(1, 2),  # [B, kv, L, hd]
            values[self.decode_slots].transpose(1, 2),
            attn_mask=self.decode_bias,
            enable_gqa=gqa,
        )
        return attended[:, :, 0]


def _bias(visible: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where attention is allowed, -inf elsewhere."""
    zeros = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    return zeros.masked_fill(~visible, float("-inf"))
