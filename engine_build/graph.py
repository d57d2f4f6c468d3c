"""The typed, immutable description of a heterogeneous Nemotron-NAS (DeciLM) network.

This is the only module that speaks the checkpoint's vocabulary (`block_configs`,
`n_heads_in_group`, `ffn_mult`); everything else reads `ModelGraph` and its `BlockSpec`s.
A plain Llama config is the special case where every block is a regular GQA + SwiGLU block.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any


class GraphConfigError(ValueError):
    """A config.json the product cannot run; the message names the field and what is allowed."""


class AttentionKind(StrEnum):
    """What a layer does in place of (or as) self-attention."""

    GQA = "gqa"
    LINEAR = "linear"
    NONE = "none"


class FFNKind(StrEnum):
    """What a layer does in place of (or as) its feed-forward network."""

    SWIGLU = "swiglu"
    LINEAR = "linear"
    NONE = "none"


@dataclass(frozen=True)
class AttentionSpec:
    """One layer's attention: GQA with its own KV-head count, a linear map, or nothing."""

    kind: AttentionKind
    num_kv_heads: int = 0

    @property
    def has_kv_cache(self) -> bool:
        """Whether this layer keeps keys and values between decoding steps."""
        return self.kind is AttentionKind.GQA


@dataclass(frozen=True)
class FFNSpec:
    """One layer's feed-forward part: SwiGLU with its own width, a linear map, or nothing."""

    kind: FFNKind
    intermediate_size: int = 0


@dataclass(frozen=True)
class BlockSpec:
    """One decoder layer: its attention part and its feed-forward part."""

    attention: AttentionSpec
    ffn: FFNSpec


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelGraph:
    """Global hyperparameters plus one `BlockSpec` per layer."""

    hidden_size: int
    num_attention_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    blocks: tuple[BlockSpec, ...]
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.blocks)

    @property
    def kv_heads_per_layer(self) -> tuple[int, ...]:
        """KV-head count of every layer, 0 where the layer keeps no KV cache."""
        return tuple(b.attention.num_kv_heads for b in self.blocks)

    @property
    def attention_layers(self) -> tuple[int, ...]:
        """Indices of the layers with regular (KV-cached) attention."""
        return tuple(i for i, b in enumerate(self.blocks) if b.attention.has_kv_cache)

    def kv_bytes_per_token(self, element_bytes: int) -> int:
        """Bytes of K and V one token occupies across all KV-cached layers."""
        return sum(2 * kv * self.head_dim * element_bytes for kv in self.kv_heads_per_layer)

    def uniform_kv_bytes_per_token(self, element_bytes: int) -> int:
        """What one token would need if every layer had attention with the widest KV heads."""
        widest = max(self.kv_heads_per_layer, default=0)
        return self.num_layers * 2 * widest * self.head_dim * element_bytes

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelGraph:
        """Build the graph from a Hugging Face config dict (`nemotron-nas` or `llama`)."""
        if not isinstance(config, dict):
            raise GraphConfigError(f"config: expected a JSON object, got {type(config).__name__}")
        model_type = config.get("model_type")
        if model_type not in _BLOCK_PARSERS:
            raise GraphConfigError(
                f"model_type: {model_type!r} is not supported; allowed: {sorted(_BLOCK_PARSERS)}"
            )
        _check_global_options(config)
        fields = Fields(config)
        hidden = fields.positive_int("hidden_size")
        heads = fields.positive_int("num_attention_heads")
        explicit_head_dim = config.get("head_dim") is not None
        head_dim = fields.positive_int("head_dim") if explicit_head_dim else _divide(hidden, heads)
        if head_dim % 2:
            raise GraphConfigError(f"head_dim: {head_dim} must be even (RoPE rotates pairs)")
        rope_theta, rope_scaling = _parse_rope(config)
        bos = fields.token_ids("bos_token_id")
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            head_dim=head_dim,
            vocab_size=fields.positive_int("vocab_size"),
            rms_norm_eps=fields.positive_float("rms_norm_eps", default=1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=fields.positive_int("max_position_embeddings", default=2048),
            tie_word_embeddings=fields.boolean("tie_word_embeddings", default=False),
            blocks=_BLOCK_PARSERS[model_type](fields, hidden, heads),
            bos_token_id=bos[0] if bos else None,
            eos_token_ids=fields.token_ids("eos_token_id"),
            torch_dtype=str(config.get("torch_dtype") or "bfloat16"),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelGraph:
        """Build the graph from a `config.json` file or a checkpoint directory holding one."""
        return cls.from_hf_config(read_config(path))


def read_config(path: str | Path) -> dict[str, Any]:
    """Read `config.json` from a file path or a checkpoint directory."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise GraphConfigError(f"{file}: no such config file (give a config.json or its directory)")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GraphConfigError(f"{file}: not valid JSON ({err})") from err


def ffn_width(ffn_mult: float, hidden_size: int) -> int:
    """The DeciLM width rule: round_up(int(2 * ffn_mult * hidden / 3), 256)."""
    raw = int(2 * ffn_mult * hidden_size / 3)
    return math.ceil(raw / 256) * 256


# Global options whose only supported value is the one given here.
_GLOBAL_FIXED = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "partial_rotary_factor": 1.0,
}
# Global options that select features the product does not implement, refused when set.
_GLOBAL_UNSUPPORTED = (
    "sliding_window",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "query_pre_attn_scalar",
    "quantization_config",
)

# Block-config fields that select features the product does not implement, with the only
# value accepted for each.
_UNSUPPORTED_ATTENTION = {
    "sparsify": None,
    "window_length": None,
    "num_sink_tokens": None,
    "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False,
}
_UNSUPPORTED_FFN = {"sparsify": None}
_KNOWN_ATTENTION = {"no_op", "replace_with_linear", "n_heads_in_group", *_UNSUPPORTED_ATTENTION}
_KNOWN_FFN = {"no_op", "replace_with_linear", "ffn_mult", *_UNSUPPORTED_FFN}
_MISSING = object()


def _check_global_options(config: dict[str, Any]) -> None:
    for key, allowed in _GLOBAL_FIXED.items():
        if key in config and config[key] not in (allowed, None):
            raise GraphConfigError(f"{key}: {config[key]!r} is not supported; allowed: {allowed!r}")
    for key in _GLOBAL_UNSUPPORTED:
        if config.get(key) is not None:
            raise GraphConfigError(f"{key}: {config[key]!r} is not supported; allowed: null")


@dataclass(frozen=True)
class Fields:
    """Typed reads of one JSON object; errors name `where` + the key and what is allowed."""

    raw: dict[str, Any]
    where: str = ""

    def _get(self, key: str, default: Any) -> Any:
        value = self.raw.get(key)
        if value is None:
            if default is _MISSING:
                raise GraphConfigError(f"{self.where}{key}: missing")
            return default
        return value

    def positive_int(self, key: str, default: Any = _MISSING) -> int:
        """An integer > 0 (a float like 2.0 is refused: it is a different value in JSON)."""
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise GraphConfigError(f"{self.where}{key}: {value!r} must be a positive integer")
        return value

    def positive_float(self, key: str, default: Any = _MISSING) -> float:
        """A finite number > 0."""
        value = self._get(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value) or value <= 0:
            raise GraphConfigError(f"{self.where}{key}: {value!r} must be a finite positive number")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        """A JSON true or false (not a string that looks like one)."""
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise GraphConfigError(f"{self.where}{key}: {value!r} must be true or false")
        return value

    def token_ids(self, key: str) -> tuple[int, ...]:
        """A token id or a list of them (absent: empty)."""
        value = self.raw.get(key)
        values = value if isinstance(value, list) else [] if value is None else [value]
        for item in values:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise GraphConfigError(
                    f"{self.where}{key}: {value!r} must be a token id or a list of ids"
                )
        return tuple(values)

    def child(self, key: str) -> Fields:
        """The nested object under `key`."""
        value = self.raw.get(key)
        if not isinstance(value, dict):
            raise GraphConfigError(f"{self.where}{key}: missing or not an object")
        return Fields(value, f"{self.where}{key}.")


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise GraphConfigError(
            f"hidden_size: {numerator} is not divisible by num_attention_heads {denominator}; "
            "set head_dim explicitly"
        )
    return numerator // denominator


def _parse_rope(config: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling: rope_theta + rope_scaling, or rope_parameters (transformers 5)."""
    parameters = config.get("rope_parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise GraphConfigError(f"rope_parameters: {parameters!r} must be an object")
    parameters = parameters or {}
    theta = Fields({"rope_theta": config.get("rope_theta", parameters.get("rope_theta"))})
    scaling = config.get("rope_scaling", parameters or None)
    return theta.positive_float("rope_theta", default=10000.0), _parse_rope_scaling(scaling)


def _parse_rope_scaling(raw: Any) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise GraphConfigError(f"rope_scaling: {raw!r} must be an object or null")
    rope_type = raw.get("rope_type", raw.get("type"))
    if rope_type in ("default", None):
        return None
    if rope_type != "llama3":
        raise GraphConfigError(
            f"rope_scaling.rope_type: {rope_type!r} is not supported; allowed: 'llama3', 'default'"
        )
    fields = Fields(raw, "rope_scaling.")
    scaling = RopeScaling(
        factor=fields.positive_float("factor"),
        low_freq_factor=fields.positive_float("low_freq_factor"),
        high_freq_factor=fields.positive_float("high_freq_factor"),
        original_max_position_embeddings=fields.positive_int("original_max_position_embeddings"),
    )
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise GraphConfigError(
            "rope_scaling.high_freq_factor: must be greater than low_freq_factor "
            f"({scaling.high_freq_factor} <= {scaling.low_freq_factor})"
        )
    return scaling


def _llama_blocks(fields: Fields, hidden: int, heads: int) -> tuple[BlockSpec, ...]:
    layers = fields.positive_int("num_hidden_layers")
    kv_heads = fields.positive_int("num_key_value_heads", default=heads)
    if heads % kv_heads:
        raise GraphConfigError(
            f"num_key_value_heads: {kv_heads} does not divide num_attention_heads {heads}"
        )
    block = BlockSpec(
        AttentionSpec(AttentionKind.GQA, kv_heads),
        FFNSpec(FFNKind.SWIGLU, fields.positive_int("intermediate_size")),
    )
    return (block,) * layers


def _nas_blocks(fields: Fields, hidden: int, heads: int) -> tuple[BlockSpec, ...]:
    layers = fields.positive_int("num_hidden_layers")
    raw_blocks = fields.raw.get("block_configs")
    if not isinstance(raw_blocks, list):
        raise GraphConfigError("block_configs: missing; nemotron-nas needs one entry per layer")
    if len(raw_blocks) != layers:
        raise GraphConfigError(
            f"block_configs: has {len(raw_blocks)} entries but num_hidden_layers is {layers}"
        )
    return tuple(_parse_block(i, raw, hidden, heads) for i, raw in enumerate(raw_blocks))


def _parse_block(index: int, raw: Any, hidden: int, heads: int) -> BlockSpec:
    if not isinstance(raw, dict):
        raise GraphConfigError(f"block_configs[{index}]: must be an object")
    block = Fields(raw, f"block_configs[{index}].")
    return BlockSpec(
        _parse_attention(block.child("attention"), heads),
        _parse_ffn(block.child("ffn"), hidden),
    )


def _check_fields(fields: Fields, known: set[str], fixed: dict[str, Any]) -> None:
    for key in sorted(set(fields.raw) - known):
        raise GraphConfigError(f"{fields.where}{key}: unknown field; known fields: {sorted(known)}")
    for key, allowed in fixed.items():
        value = fields.raw.get(key)
        if value is not None and value != allowed:
            raise GraphConfigError(
                f"{fields.where}{key}: {value!r} is not supported by nemotron-serve; "
                f"allowed: {json.dumps(allowed)}"
            )


def _kind(fields: Fields) -> str:
    no_op = fields.boolean("no_op", default=False)
    linear = fields.boolean("replace_with_linear", default=False)
    if no_op and linear:
        where = fields.where.rstrip(".")
        raise GraphConfigError(f"{where}: no_op and replace_with_linear are both true; pick one")
    return "none" if no_op else "linear" if linear else "regular"


def _parse_attention(fields: Fields, heads: int) -> AttentionSpec:
    _check_fields(fields, _KNOWN_ATTENTION, _UNSUPPORTED_ATTENTION)
    kind = _kind(fields)
    if kind == "none":
        return AttentionSpec(AttentionKind.NONE)
    if kind == "linear":
        return AttentionSpec(AttentionKind.LINEAR)
    group = fields.raw.get("n_heads_in_group")
    if isinstance(group, bool) or not isinstance(group, int) or group <= 0 or heads % group:
        raise GraphConfigError(
            f"{fields.where}n_heads_in_group: {group!r} must be a positive integer dividing "
            f"num_attention_heads ({heads})"
        )
    return AttentionSpec(AttentionKind.GQA, heads // group)


def _parse_ffn(fields: Fields, hidden: int) -> FFNSpec:
    _check_fields(fields, _KNOWN_FFN, _UNSUPPORTED_FFN)
    kind = _kind(fields)
    if kind == "none":
        return FFNSpec(FFNKind.NONE)
    if kind == "linear":
        return FFNSpec(FFNKind.LINEAR)
    mult = fields.positive_float("ffn_mult")
    width = ffn_width(mult, hidden) if mult < 1e6 else 0
    if width <= 0:
        raise GraphConfigError(f"{fields.where}ffn_mult: {mult!r} gives no usable FFN width")
    return FFNSpec(FFNKind.SWIGLU, width)


_BLOCK_PARSERS = {"nemotron-nas": _nas_blocks, "llama": _llama_blocks}
