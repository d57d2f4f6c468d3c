"""The one table of Hugging Face weight names and shapes that a `ModelGraph` implies.

Checkpoint loading, synthetic checkpoints, importers and the parameter count all read this
table, so a name or a shape is written down exactly once. A no-op sub-block has no entry at
all, not even a norm.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from engine_build.graph import AttentionKind, FFNKind, ModelGraph


class WeightRole(StrEnum):
    """What a tensor is for; decides how precision conversion treats it."""

    EMBEDDING = "embedding"
    NORM = "norm"
    LINEAR = "linear"
    LM_HEAD = "lm_head"


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


# Tensors fused at load time: the fused name and its parts, in concatenation order (dim 0).
FUSED_PARTS: dict[str, tuple[str, ...]] = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def layer_prefix(index: int) -> str:
    """The name prefix of layer `index`'s tensors."""
    return f"model.layers.{index}."


def weight_specs(graph: ModelGraph) -> tuple[WeightSpec, ...]:
    """Every tensor a checkpoint of this graph holds, in a stable order."""
    hidden, vocab = graph.hidden_size, graph.vocab_size
    specs = [WeightSpec("model.embed_tokens.weight", (vocab, hidden), WeightRole.EMBEDDING)]
    for index in range(graph.num_layers):
        specs.extend(_layer_specs(graph, index))
    specs.append(WeightSpec("model.norm.weight", (hidden,), WeightRole.NORM))
    if not graph.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", (vocab, hidden), WeightRole.LM_HEAD))
    return tuple(specs)


def _layer_specs(graph: ModelGraph, index: int) -> list[WeightSpec]:
    block, hidden = graph.blocks[index], graph.hidden_size
    q_dim = graph.num_attention_heads * graph.head_dim
    kv_dim = block.attention.num_kv_heads * graph.head_dim
    width = block.ffn.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {}
    if block.attention.kind is not AttentionKind.NONE:
        shapes["input_layernorm.weight"] = (hidden,)
    if block.attention.kind is AttentionKind.GQA:
        shapes["self_attn.q_proj.weight"] = (q_dim, hidden)
        shapes["self_attn.k_proj.weight"] = (kv_dim, hidden)
        shapes["self_attn.v_proj.weight"] = (kv_dim, hidden)
        shapes["self_attn.o_proj.weight"] = (hidden, q_dim)
    elif block.attention.kind is AttentionKind.LINEAR:
        shapes["self_attn.linear_attn.weight"] = (hidden, hidden)
    if block.ffn.kind is not FFNKind.NONE:
        shapes["post_attention_layernorm.weight"] = (hidden,)
    if block.ffn.kind is FFNKind.SWIGLU:
        shapes["mlp.gate_proj.weight"] = (width, hidden)
        shapes["mlp.up_proj.weight"] = (width, hidden)
        shapes["mlp.down_proj.weight"] = (hidden, width)
    elif block.ffn.kind is FFNKind.LINEAR:
        shapes["mlp.linear_mlp.weight"] = (hidden, hidden)
    prefix = layer_prefix(index)
    return [
        WeightSpec(
            prefix + name,
            shape,
            WeightRole.NORM if name.endswith("layernorm.weight") else WeightRole.LINEAR,
            index,
        )
        for name, shape in shapes.items()
    ]


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
    for target, parts in FUSED_PARTS.items():
        for part in parts:
            suffix = f"{part}.weight"
            if name.endswith(suffix):
                prefix = name[: -len(suffix)]
                return f"{prefix}{target}.weight", tuple(f"{prefix}{p}.weight" for p in parts)
    return None


def role_of(name: str) -> WeightRole:
    """The role of a tensor from its (fused or unfused) HF name."""
    if name == "model.embed_tokens.weight":
        return WeightRole.EMBEDDING
    if name == "lm_head.weight":
        return WeightRole.LM_HEAD
    if name.endswith("norm.weight"):
        return WeightRole.NORM
    return WeightRole.LINEAR
