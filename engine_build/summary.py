"""Size figures of a graph: parameters, weight bytes per dtype and KV-cache bytes per token."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from engine_build.graph import AttentionKind, ModelGraph
from engine_build.weights import WeightRole, weight_specs

# Bytes per element of each storage dtype the product uses.
DTYPE_BYTES: dict[str, int] = {"bf16": 2, "fp8": 1, "fp32": 4}

# FP8 and int8 weights carry one fp32 scale per output channel of every linear layer; int4 a
# scale and a minimum per group of 32 inputs.
FP8_SCALE_BYTES = 4
INT4_GROUP = 32  # inputs per int4 scale and minimum
INT4_ROWS = 16  # torch's CPU int4 layout packs output rows in sixteens


@dataclass(frozen=True)
class LayerSummary:
    """One row of the per-layer table."""

    index: int
    attention: str
    kv_heads: int
    ffn: str
    ffn_width: int
    parameters: int


@dataclass(frozen=True)
class GraphSummary:
    """The figures `nemotron-build inspect` reports for one graph."""

    layers: int
    parameters: int
    attention_layers: int
    linear_attention_layers: int
    no_attention_layers: int
    ffn_kinds: dict[str, int]
    ffn_widths: dict[int, int]
    weight_bytes: dict[str, int]
    kv_bytes_per_token: dict[str, int]
    uniform_kv_bytes_per_token_bf16: int
    per_layer: tuple[LayerSummary, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (integer keys become strings)."""
        data = asdict(self)
        data["ffn_widths"] = {str(k): v for k, v in self.ffn_widths.items()}
        return data


def kv_bytes_per_token(graph: ModelGraph, dtype: str) -> int:
    """Bytes of K and V one token occupies across all KV-cached layers, stored in `dtype`."""
    return graph.kv_bytes_per_token(DTYPE_BYTES[dtype])


def stored_dtype(role: WeightRole, dtype: str) -> str:
    """The format an engine of `dtype` weights stores a tensor of `role` in.

    fp8, int8 and int4 engines quantize the linear matrices and keep embeddings and norms in
    bf16. The lm_head stays bf16 in fp8 and int8 engines, and is int8 (per output channel) in
    int4 engines: there it is the largest read of a decode step (half the bytes per token of the
    embedded model), and int8 costs +0.5% perplexity, inside int4's 2% but not int8's 0.5%
    (docs/benchmarks.md, issue 13).
    """
    if dtype not in ("fp8", "int8", "int4"):
        return dtype
    if role is WeightRole.LINEAR:
        return dtype
    if role is WeightRole.LM_HEAD and dtype == "int4":
        return "int8"
    return "bf16"


def stores_own_lm_head(graph: ModelGraph, dtype: str) -> bool:
    """Whether an engine of `dtype` weights stores an lm_head tensor of its own.

    Untied graphs always do; a tied graph does where its lm_head is stored in another format than
    the embedding table (int4 engines: an int8 copy of the table beside the bf16 one).
    """
    if not graph.tie_word_embeddings:
        return True
    return stored_dtype(WeightRole.LM_HEAD, dtype) != stored_dtype(WeightRole.EMBEDDING, dtype)


def tensor_bytes(role: WeightRole, shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of one tensor of `role` in an engine of `dtype` weights (`stored_dtype`).

    fp8 and int8 matrices hold a byte per element plus one fp32 scale per output channel; int4
    matrices hold half a byte per element plus a fp32 scale and minimum per group
    (engine_build/quantize.py).
    """
    numel = 1
    for dim in shape:
        numel *= dim
    stored = stored_dtype(role, dtype)
    if stored == "int4":
        return numel // 2 + 2 * (numel // INT4_GROUP) * FP8_SCALE_BYTES
    if stored in ("fp8", "int8"):
        return numel + shape[0] * FP8_SCALE_BYTES  # one byte per element, one scale per row
    return numel * DTYPE_BYTES[stored]


def weight_bytes(graph: ModelGraph, dtype: str) -> int:
    """Bytes of all weights stored in `dtype` (see `tensor_bytes` for fp8)."""
    return sum(tensor_bytes(s.role, s.shape, dtype) for s in weight_specs(graph))


def summarize(graph: ModelGraph) -> GraphSummary:
    """Compute every figure of the summary."""
    specs = weight_specs(graph)
    per_layer_params: Counter[int] = Counter()
    for spec in specs:
        if spec.layer is not None:
            per_layer_params[spec.layer] += spec.numel
    attention = Counter(b.attention.kind for b in graph.blocks)
    swiglu_widths = Counter(
        b.ffn.intermediate_size for b in graph.blocks if b.ffn.intermediate_size
    )
    return GraphSummary(
        layers=graph.num_layers,
        parameters=sum(s.numel for s in specs),
        attention_layers=attention[AttentionKind.GQA],
        linear_attention_layers=attention[AttentionKind.LINEAR],
        no_attention_layers=attention[AttentionKind.NONE],
        ffn_kinds=dict(Counter(b.ffn.kind.value for b in graph.blocks)),
        ffn_widths=dict(sorted(swiglu_widths.items(), reverse=True)),
        weight_bytes={dtype: weight_bytes(graph, dtype) for dtype in DTYPE_BYTES},
        kv_bytes_per_token={dtype: kv_bytes_per_token(graph, dtype) for dtype in DTYPE_BYTES},
        uniform_kv_bytes_per_token_bf16=graph.uniform_kv_bytes_per_token(DTYPE_BYTES["bf16"]),
        per_layer=tuple(
            LayerSummary(
                index=i,
                attention=b.attention.kind.value,
                kv_heads=b.attention.num_kv_heads,
                ffn=b.ffn.kind.value,
                ffn_width=b.ffn.intermediate_size,
                parameters=per_layer_params[i],
            )
            for i, b in enumerate(graph.blocks)
        ),
    )
