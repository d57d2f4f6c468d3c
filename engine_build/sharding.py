"""Tensor-parallel sharding: which tp sizes a graph allows, and each rank's slice of every tensor.

Which tensor splits how is the weight table's `ShardRule` (`engine_build.weights`); this module
cuts. Column-parallel (output rows split): fused q/k/v (by heads) and gate/up (by width),
embeddings and lm_head (by vocabulary). Row-parallel (input columns split, all-reduced after):
o_proj, down_proj and the linear replacements. Norms are replicated. When tp exceeds a layer's
KV-head count, each rank holds one KV head and a head is replicated tp / kv times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import Tensor

from engine_build.graph import AttentionSpec, BlockSpec, FFNSpec, ModelGraph
from engine_build.weights import ShardRule, fused_weight_specs, module_names, shard_rule_of

# Per-rank matrix dimensions on GPUs must be multiples of this many elements (tensor-core tiles).
GPU_ALIGNMENT = 16


class ShardingError(ValueError):
    """A graph that cannot be split across the requested tensor-parallel size."""


def kv_heads_per_rank(kv_heads: int, tp: int) -> int:
    """KV heads each rank holds: split when divisible, one (replicated) when tp exceeds them."""
    return kv_heads // tp if kv_heads % tp == 0 else 1


def kv_layout(kv_heads: int, tp: int) -> str:
    """A short human description of how `kv_heads` spread over `tp` ranks."""
    if tp == 1:
        return f"{kv_heads} KV heads, not split (tensor_parallel 1)"
    if kv_heads % tp == 0:
        return f"split: {kv_heads} KV heads -> {kv_heads // tp} per rank"
    return f"replicated: {kv_heads} KV heads, 1 per rank, each on {tp // kv_heads} ranks"


def tp_issues(graph: ModelGraph, tp: int, alignment: int = 1) -> list[str]:
    """Every reason `graph` cannot run at tensor-parallel size `tp` (empty when it can)."""
    issues = []
    heads = graph.num_attention_heads
    if heads % tp:
        issues.append(f"num_attention_heads {heads} is not divisible by tensor_parallel {tp}")
    if graph.vocab_size % tp:
        issues.append(f"vocab_size {graph.vocab_size} is not divisible by tensor_parallel {tp}")
    bad_kv = sorted({kv for kv in graph.kv_heads_per_layer if kv and kv % tp and tp % kv})
    for kv in bad_kv:
        layers = [i for i, k in enumerate(graph.kv_heads_per_layer) if k == kv]
        issues.append(
            f"{kv} KV heads (layers {_ranges(layers)}) can be neither split nor replicated "
            f"over tensor_parallel {tp}"
        )
    for width in sorted({b.ffn.intermediate_size for b in graph.blocks if b.ffn.intermediate_size}):
        issues.extend(_split_issue(f"FFN width {width}", width, tp, alignment))
    if module_names(graph, ShardRule.COLUMNS_OF_FULL_INPUT):  # linear replacements
        issues.extend(
            _split_issue("linear replacement input (hidden_size)", graph.hidden_size, tp, alignment)
        )
    return issues


def _split_issue(what: str, size: int, tp: int, alignment: int) -> list[str]:
    if size % tp:
        return [f"{what} is not divisible by tensor_parallel {tp}"]
    if (size // tp) % alignment:
        return [
            f"{what} gives {size // tp} per rank, not a multiple of {alignment} (kernel alignment)"
        ]
    return []


def _ranges(indices: list[int]) -> str:
    spans: list[str] = []
    start = prev = indices[0]
    for index in [*indices[1:], None]:
        if index is not None and index == prev + 1:
            prev = index
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if index is not None:
            start = prev = index
    return ", ".join(spans)


def rank_graph(graph: ModelGraph, tp: int) -> ModelGraph:
    """The graph of one rank: local heads, KV heads, FFN widths and vocabulary."""
    issues = tp_issues(graph, tp)
    if issues:
        raise ShardingError("; ".join(issues))
    if tp == 1:
        return graph
    blocks = tuple(
        BlockSpec(
            AttentionSpec(
                b.attention.kind,
                kv_heads_per_rank(b.attention.num_kv_heads, tp) if b.attention.has_kv_cache else 0,
            ),
            FFNSpec(b.ffn.kind, b.ffn.intermediate_size // tp),
        )
        for b in graph.blocks
    )
    return replace(
        graph,
        num_attention_heads=graph.num_attention_heads // tp,
        vocab_size=graph.vocab_size // tp,
        blocks=blocks,
    )


def shard_tensors(
    tensors: dict[str, Tensor], graph: ModelGraph, tp: int, rank: int
) -> dict[str, Tensor]:
    """Rank `rank`'s slice of every fused HF-named tensor (views where possible)."""
    if tp == 1:
        return dict(tensors)
    rank_graph(graph, tp)  # raises with every reason when the split is impossible
    return {name: _rule(name)(tensor, graph, tp, rank, name) for name, tensor in tensors.items()}


def shard_shapes(graph: ModelGraph, tp: int) -> dict[str, tuple[int, ...]]:
    """Shapes of one rank's tensors, computed by sharding meta tensors (no memory)."""
    meta = {s.name: torch.empty(s.shape, device="meta") for s in fused_weight_specs(graph)}
    return {name: tuple(t.shape) for name, t in shard_tensors(meta, graph, tp, 0).items()}


_Rule = Callable[[Tensor, ModelGraph, int, int, str], Tensor]


def _rows(t: Tensor, graph: ModelGraph, tp: int, rank: int, name: str) -> Tensor:
    size = t.shape[0] // tp
    return t[rank * size : (rank + 1) * size]


def _columns(t: Tensor, graph: ModelGraph, tp: int, rank: int, name: str) -> Tensor:
    size = t.shape[1] // tp
    return t[:, rank * size : (rank + 1) * size]


def _replicate(t: Tensor, graph: ModelGraph, tp: int, rank: int, name: str) -> Tensor:
    return t


def _gate_up(t: Tensor, graph: ModelGraph, tp: int, rank: int, name: str) -> Tensor:
    gate, up = t.chunk(2, dim=0)
    return torch.cat([_rows(gate, graph, tp, rank, name), _rows(up, graph, tp, rank, name)])


def _qkv(t: Tensor, graph: ModelGraph, tp: int, rank: int, name: str) -> Tensor:
    layer = int(name.split(".")[2])
    kv, head_dim = graph.kv_heads_per_layer[layer], graph.head_dim
    q_dim = graph.num_attention_heads * head_dim
    q, k, v = t.split([q_dim, kv * head_dim, kv * head_dim], dim=0)
    local = kv_heads_per_rank(kv, tp)
    first = rank * local if kv % tp == 0 else rank // (tp // kv)
    rows = slice(first * head_dim, (first + local) * head_dim)
    return torch.cat([_rows(q, graph, tp, rank, name), k[rows], v[rows]])


# How each rule of the weight table cuts a tensor.
_RULES: dict[ShardRule, _Rule] = {
    ShardRule.REPLICATE: _replicate,
    ShardRule.ROWS: _rows,
    ShardRule.COLUMNS: _columns,
    ShardRule.COLUMNS_OF_FULL_INPUT: _columns,
    ShardRule.QKV: _qkv,
    ShardRule.GATE_UP: _gate_up,
}


def _rule(name: str) -> _Rule:
    try:
        return _RULES[shard_rule_of(name)]
    except KeyError:
        raise ShardingError(f"no sharding rule for tensor {name!r}") from None
