"""The weight table: every tensor a `ModelGraph` implies, written down once.

One row per kind of tensor: its Hugging Face name, its shape, its role (how precision
conversion treats it), the fused tensor it becomes at load time (q/k/v as `qkv_proj`, gate/up
as `gate_up_proj`), the parameter of `NemotronModel` it loads into, and how tensor parallelism
splits it. Checkpoint loading, synthetic checkpoints, the model, the sharding and the summary
all read this table, so adding a block kind means adding its rows here (and its module in
`model.py`, its kind in `graph.py`). A no-op sub-block has no rows at all, not even a norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from engine_build.graph import AttentionKind, BlockSpec, FFNKind, ModelGraph


class WeightRole(StrEnum):
    """What a tensor is for; decides how precision conversion treats it."""

    EMBEDDING = "embedding"
    NORM = "norm"
    LINEAR = "linear"
    LM_HEAD = "lm_head"


class ShardRule(StrEnum):
    """How a (fused) tensor splits over tensor-parallel ranks."""

    REPLICATE = "replicate"  # every rank holds all of it (norms)
    ROWS = "rows"  # output rows split (embeddings and lm_head: by vocabulary)
    COLUMNS = "columns"  # input columns split, input arrives split; partial sums all-reduced
    COLUMNS_OF_FULL_INPUT = "columns_of_full_input"  # the same, each rank slicing a full input
    QKV = "qkv"  # q rows by heads; k, v by KV heads (one per rank, replicated, when tp exceeds)
    GATE_UP = "gate_up"  # the gate half and the up half each split by width


Shape = Callable[[ModelGraph, BlockSpec], tuple[int, ...]]


@dataclass(frozen=True)
class TensorKind:
    """One row of the table: a kind of tensor, per layer or global."""

    name: str  # HF name (after `model.layers.{i}.` for per-layer tensors)
    role: WeightRole
    shape: Shape
    module: str  # parameter of NemotronModel (after `layers.{i}.` for per-layer tensors)
    shard: ShardRule
    fused_into: str = ""  # the fused tensor's name, when fused at load time
    present: Callable[[BlockSpec], bool] = lambda block: True

    @property
    def fused_name(self) -> str:
        """The name after load-time fusion (its own name when not fused)."""
        return self.fused_into or self.name


def _hidden(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (graph.hidden_size,)


def _square(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (graph.hidden_size, graph.hidden_size)


def _q(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (graph.num_attention_heads * graph.head_dim, graph.hidden_size)


def _kv(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (block.attention.num_kv_heads * graph.head_dim, graph.hidden_size)


def _o(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (graph.hidden_size, graph.num_attention_heads * graph.head_dim)


def _up(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (block.ffn.intermediate_size, graph.hidden_size)


def _down(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (graph.hidden_size, block.ffn.intermediate_size)


def _vocab(graph: ModelGraph, block: BlockSpec) -> tuple[int, ...]:
    return (graph.vocab_size, graph.hidden_size)


def _attention(*kinds: AttentionKind) -> Callable[[BlockSpec], bool]:
    return lambda block: block.attention.kind in kinds


def _ffn(*kinds: FFNKind) -> Callable[[BlockSpec], bool]:
    return lambda block: block.ffn.kind in kinds


_ANY_ATTENTION = _attention(AttentionKind.GQA, AttentionKind.LINEAR)
_GQA = _attention(AttentionKind.GQA)
_ANY_FFN = _ffn(FFNKind.SWIGLU, FFNKind.LINEAR)
_SWIGLU = _ffn(FFNKind.SWIGLU)
_LINEAR, _NORM = WeightRole.LINEAR, WeightRole.NORM
_QKV, _GATE_UP = "self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"

# Per-layer tensors, in checkpoint order. Fused parts are listed in concatenation order.
LAYER_TENSORS: tuple[TensorKind, ...] = (
    TensorKind("input_layernorm.weight", _NORM, _hidden, "parts.attention.norm.weight",
               ShardRule.REPLICATE, present=_ANY_ATTENTION),
    TensorKind("self_attn.q_proj.weight", _LINEAR, _q, "parts.attention.body.qkv.weight",
               ShardRule.QKV, _QKV, _GQA),
    TensorKind("self_attn.k_proj.weight", _LINEAR, _kv, "parts.attention.body.qkv.weight",
               ShardRule.QKV, _QKV, _GQA),
    TensorKind("self_attn.v_proj.weight", _LINEAR, _kv, "parts.attention.body.qkv.weight",
               ShardRule.QKV, _QKV, _GQA),
    TensorKind("self_attn.o_proj.weight", _LINEAR, _o, "parts.attention.body.o.weight",
               ShardRule.COLUMNS, present=_GQA),
    TensorKind("self_attn.linear_attn.weight", _LINEAR, _square,
               "parts.attention.body.proj.weight", ShardRule.COLUMNS_OF_FULL_INPUT,
               present=_attention(AttentionKind.LINEAR)),
    TensorKind("post_attention_layernorm.weight", _NORM, _hidden, "parts.ffn.norm.weight",
               ShardRule.REPLICATE, present=_ANY_FFN),
    TensorKind("mlp.gate_proj.weight", _LINEAR, _up, "parts.ffn.body.gate_up.weight",
               ShardRule.GATE_UP, _GATE_UP, _SWIGLU),
    TensorKind("mlp.up_proj.weight", _LINEAR, _up, "parts.ffn.body.gate_up.weight",
               ShardRule.GATE_UP, _GATE_UP, _SWIGLU),
    TensorKind("mlp.down_proj.weight", _LINEAR, _down, "parts.ffn.body.down.weight",
               ShardRule.COLUMNS, present=_SWIGLU),
    TensorKind("mlp.linear_mlp.weight", _LINEAR, _square, "parts.ffn.body.proj.weight",
               ShardRule.COLUMNS_OF_FULL_INPUT, present=_ffn(FFNKind.LINEAR)),
)  # fmt: skip
EMBEDDING = TensorKind(
    "model.embed_tokens.weight", WeightRole.EMBEDDING, _vocab, "embed.weight", ShardRule.ROWS
)
FINAL_NORM = TensorKind("model.norm.weight", _NORM, _hidden, "norm.weight", ShardRule.REPLICATE)
LM_HEAD = TensorKind("lm_head.weight", WeightRole.LM_HEAD, _vocab, "lm_head.weight", ShardRule.ROWS)
GLOBAL_TENSORS = (EMBEDDING, FINAL_NORM, LM_HEAD)
LAYER_PREFIX, MODULE_LAYER_PREFIX = "model.layers.", "layers."


@dataclass(frozen=True)
class WeightSpec:
    """One named tensor of a checkpoint: its shape `[out, in]` for linears, its role, its layer."""

    name: str
    shape: tuple[int, ...]
    role: WeightRole
    layer: int | None = None

    @property
    def numel(self) -> int:
        """Number of elements."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def layer_prefix(index: int) -> str:
    """The name prefix of layer `index`'s tensors."""
    return f"{LAYER_PREFIX}{index}."


def weight_specs(graph: ModelGraph) -> tuple[WeightSpec, ...]:
    """Every tensor a checkpoint of this graph holds, in a stable order."""
    first = graph.blocks[0] if graph.blocks else None
    specs = [WeightSpec(EMBEDDING.name, EMBEDDING.shape(graph, first), EMBEDDING.role)]
    for index, block in enumerate(graph.blocks):
        specs.extend(
            WeightSpec(layer_prefix(index) + kind.name, kind.shape(graph, block), kind.role, index)
            for kind in LAYER_TENSORS
            if kind.present(block)
        )
    specs.append(WeightSpec(FINAL_NORM.name, FINAL_NORM.shape(graph, first), FINAL_NORM.role))
    if not graph.tie_word_embeddings:
        specs.append(WeightSpec(LM_HEAD.name, LM_HEAD.shape(graph, first), LM_HEAD.role))
    return tuple(specs)


def fused_weight_specs(graph: ModelGraph) -> tuple[WeightSpec, ...]:
    """The tensors after load-time fusion: q/k/v as one `qkv_proj`, gate/up as `gate_up_proj`."""
    specs = {spec.name: spec for spec in weight_specs(graph)}
    fused: list[WeightSpec] = []
    for spec in specs.values():
        group = fused_group(spec.name)
        if group is None:
            fused.append(spec)
        elif spec.name == group[1][0]:
            rows = sum(specs[part].shape[0] for part in group[1])
            fused.append(WeightSpec(group[0], (rows, *spec.shape[1:]), spec.role, spec.layer))
    return tuple(fused)


def fused_group(name: str) -> tuple[str, tuple[str, ...]] | None:
    """(fused tensor name, full names of its parts in order) when `name` is one of the parts."""
    prefix, kind = _split(name)
    if kind is None or not kind.fused_into:
        return None
    parts = tuple(prefix + k.name for k in LAYER_TENSORS if k.fused_into == kind.fused_into)
    return prefix + kind.fused_into, parts


def kind_of(name: str) -> TensorKind:
    """The table row of a tensor, from its (fused or unfused) HF name."""
    _, kind = _split(name)
    if kind is None:
        raise KeyError(f"no tensor kind for {name!r} in the weight table")
    return kind


def role_of(name: str) -> WeightRole:
    """The role of a tensor from its (fused or unfused) HF name."""
    return kind_of(name).role


def shard_rule_of(name: str) -> ShardRule:
    """How tensor parallelism splits a tensor, from its fused HF name."""
    return kind_of(name).shard


def module_name(name: str) -> str:
    """The `NemotronModel` parameter a fused HF-named tensor loads into."""
    prefix, kind = _split(name)
    if kind is None:
        raise KeyError(f"no tensor kind for {name!r} in the weight table")
    layer = prefix[len(LAYER_PREFIX) :]  # "{i}." or "" for global tensors
    return f"{MODULE_LAYER_PREFIX}{layer}{kind.module}" if layer else kind.module


def module_names(graph: ModelGraph, shard: ShardRule) -> list[str]:
    """The modules (parameter names without `.weight`) whose tensors `shard` splits."""
    return [
        module_name(spec.name).removesuffix(".weight")
        for spec in fused_weight_specs(graph)
        if kind_of(spec.name).shard is shard
    ]


_BY_NAME = {k.name: k for k in (*LAYER_TENSORS, *GLOBAL_TENSORS)}
_BY_NAME |= {k.fused_into: k for k in LAYER_TENSORS if k.fused_into}


def _split(name: str) -> tuple[str, TensorKind | None]:
    """(layer prefix or "", the table row) of a tensor name."""
    if name in _BY_NAME and not name.startswith(LAYER_PREFIX):
        return "", _BY_NAME[name]
    if name.startswith(LAYER_PREFIX):
        index, _, local = name[len(LAYER_PREFIX) :].partition(".")
        if index.isdigit():
            return f"{LAYER_PREFIX}{index}.", _BY_NAME.get(local)
    return "", None
