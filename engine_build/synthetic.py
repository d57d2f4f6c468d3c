"""Tiny random-weight Nemotron-NAS checkpoints that exercise every block kind.

They are written in the same on-disk format as real checkpoints (config.json with
`block_configs`, HF-named `model.safetensors`), so tests run every code path without big files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from engine_build.graph import ModelGraph
from engine_build.weights import WeightRole, weight_specs


@dataclass(frozen=True)
class LayerRecipe:
    """One synthetic layer in checkpoint vocabulary: attention and FFN choices."""

    attention: str  # "gqa", "linear" or "none"
    ffn: str  # "swiglu", "linear" or "none"
    n_heads_in_group: int = 1
    ffn_mult: float = 2.0


# Every combination the graph allows, with several KV-head counts and FFN widths
# (with hidden 64: ffn_mult 2.0 -> width 256, 7.0 -> 512).
MIXED_LAYERS: tuple[LayerRecipe, ...] = (
    LayerRecipe("gqa", "swiglu", n_heads_in_group=2, ffn_mult=2.0),
    LayerRecipe("none", "swiglu", ffn_mult=7.0),
    LayerRecipe("linear", "swiglu", ffn_mult=2.0),
    LayerRecipe("gqa", "linear", n_heads_in_group=4),
    LayerRecipe("gqa", "none", n_heads_in_group=1),
    LayerRecipe("none", "none"),
    LayerRecipe("linear", "linear"),
    LayerRecipe("gqa", "swiglu", n_heads_in_group=2, ffn_mult=7.0),
)


def synthetic_config(
    layers: tuple[LayerRecipe, ...] = MIXED_LAYERS,
    hidden_size: int = 64,
    num_heads: int = 4,
    vocab_size: int = 256,
    tie_word_embeddings: bool = False,
) -> dict[str, Any]:
    """A nemotron-nas config.json dict for the given layer recipes (llama3 RoPE scaling on)."""
    return {
        "architectures": ["DeciLMForCausalLM"],
        "model_type": "nemotron-nas",
        "hidden_size": hidden_size,
        "num_attention_heads": num_heads,
        "num_hidden_layers": len(layers),
        "num_key_value_heads": None,
        "intermediate_size": None,
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        "max_position_embeddings": 1024,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": 1,
        "eos_token_id": [2],
        "torch_dtype": "float32",
        "block_configs": [_block_config(recipe) for recipe in layers],
    }


def _block_config(recipe: LayerRecipe) -> dict[str, Any]:
    attention: dict[str, Any] = {
        "no_op": recipe.attention == "none",
        "replace_with_linear": recipe.attention == "linear",
        "n_heads_in_group": recipe.n_heads_in_group if recipe.attention == "gqa" else None,
    }
    ffn: dict[str, Any] = {
        "no_op": recipe.ffn == "none",
        "replace_with_linear": recipe.ffn == "linear",
        "ffn_mult": recipe.ffn_mult if recipe.ffn == "swiglu" else None,
    }
    return {"attention": attention, "ffn": ffn}


def random_weights(graph: ModelGraph, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF-named random weights for `graph`, scaled so activations stay in a useful range."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for spec in weight_specs(graph):
        noise = torch.randn(spec.shape, generator=generator)
        if spec.role is WeightRole.NORM:
            tensors[spec.name] = 1.0 + 0.1 * noise
        elif spec.role is WeightRole.EMBEDDING:
            tensors[spec.name] = noise
        else:
            tensors[spec.name] = noise / spec.shape[-1] ** 0.5
    return tensors


def write_synthetic_checkpoint(
    directory: str | Path,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    drop: tuple[str, ...] = (),
    with_tokenizer: bool = True,
) -> Path:
    """Write config.json, model.safetensors and (for 256-token vocabularies) a byte tokenizer.

    `drop` omits named tensors (for error tests).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else synthetic_config()
    graph = ModelGraph.from_hf_config(config)
    tensors = {k: v for k, v in random_weights(graph, seed).items() if k not in drop}
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    if with_tokenizer and graph.vocab_size == BYTE_VOCAB:
        write_byte_tokenizer(directory, eos_id=graph.eos_token_ids[0] if graph.eos_token_ids else 2)
    return directory


BYTE_VOCAB = 256
BYTE_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def write_byte_tokenizer(directory: Path, eos_id: int) -> None:
    """A byte-level tokenizer (token id = byte value, no merges), so random models can talk."""
    alphabet = _byte_alphabet()
    model = models.BPE(vocab={alphabet[b]: b for b in range(BYTE_VOCAB)}, merges=[])
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"eos_token": alphabet[eos_id], "chat_template": BYTE_CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each byte value."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(BYTE_VOCAB)]
