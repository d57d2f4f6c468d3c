"""Import a Llama-architecture GGUF file into a Nemotron-NAS checkpoint directory.

The output is what any Hugging Face-style loader expects: `config.json` (nemotron-nas, every
block regular), `model.safetensors` (dequantized, HF names, llama.cpp's Q/K row permutation
undone), `tokenizer.json` (built with `tokenizers` from the GGUF's vocabulary and merges) and
`tokenizer_config.json` (the GGUF's chat template and special tokens).

Weights are stored as fp32: llama.cpp, the `gguf` package and transformers all dequantize
Q4_1/Q8_0 blocks to fp32, so fp32 keeps the import bit-identical to them (bf16 would round).
The import is deterministic and cached under a key of the source file's hash.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from engine_build.checkpoint import Checkpoint
from engine_build.digest import file_sha256
from engine_build.graph import ffn_width

# Bump when the output format changes, so cached imports are redone.
IMPORTER_VERSION = "2"  # 2: generation_config.json
MARKER_FILE = "import.json"

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot convert; the message says what was found and allowed."""


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # llama.cpp's "smollm" pre-tokenizer: digits split one by one, then GPT-2 byte-level rules.
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


# `tokenizer.ggml.pre` -> how text is split before byte-level BPE.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "smollm": _smollm_pre_tokenizer,
}


def import_gguf_cached(gguf_path: str | Path, cache_root: str | Path) -> Path:
    """Import `gguf_path` under `cache_root/imports/`, reusing a finished earlier import."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise GGUFImportError(f"{gguf_path}: no such file")
    digest = file_sha256(gguf_path)
    target = Path(cache_root) / "imports" / f"{gguf_path.stem}-{digest[:16]}-v{IMPORTER_VERSION}"
    if (target / MARKER_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=target.parent))
    staging.chmod(0o755)
    try:
        import_gguf(gguf_path, staging, source_sha256=digest)
        if target.exists():  # an unfinished earlier attempt
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def import_gguf(gguf_path: str | Path, out_dir: str | Path, source_sha256: str = "") -> Path:
    """Convert one GGUF file into a checkpoint directory and validate the result."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = _open_reader(gguf_path)
    meta = _LlamaMetadata(reader, gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = meta.nemotron_config(tied=not any(t.name == "output.weight" for t in reader.tensors))
    _write_json(out_dir / "config.json", config)
    save_file(_convert_tensors(reader, meta), str(out_dir / "model.safetensors"), {"format": "pt"})
    (out_dir / "tokenizer.json").write_text(meta.tokenizer().to_str(pretty=True) + "\n")
    _write_json(out_dir / "tokenizer_config.json", meta.tokenizer_config())
    generation = meta.generation_config()
    if generation:
        _write_json(out_dir / "generation_config.json", generation)
    Checkpoint.open(out_dir)
    _write_json(
        out_dir / MARKER_FILE,
        {
            "source": gguf_path.name,
            "source_sha256": source_sha256 or file_sha256(gguf_path),
            "importer_version": IMPORTER_VERSION,
            "weights_dtype": "float32",
        },
    )
    return out_dir


def _open_reader(path: Path) -> GGUFReader:
    if not path.is_file():
        raise GGUFImportError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError) as err:
        raise GGUFImportError(f"{path}: not a readable GGUF file ({err})") from err


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


class _LlamaMetadata:
    """Typed access to the GGUF metadata keys the importer needs."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader = reader
        architecture = self.get("general.architecture")
        if architecture != "llama":
            raise GGUFImportError(
                f"{path}: architecture is {architecture!r}; this importer converts 'llama' "
                "(SmolLM2 and other Llama-architecture models) only"
            )
        tokenizer_model = self.get("tokenizer.ggml.model")
        if tokenizer_model != "gpt2":
            raise GGUFImportError(
                f"{path}: tokenizer.ggml.model is {tokenizer_model!r}; "
                "supported: 'gpt2' (byte-level BPE)"
            )
        self.pre = self.get("tokenizer.ggml.pre")
        if self.pre not in PRE_TOKENIZERS:
            raise GGUFImportError(
                f"{path}: tokenizer.ggml.pre is {self.pre!r}; supported: {sorted(PRE_TOKENIZERS)}"
            )
        self.path = path
        self.heads = self.number("llama.attention.head_count", int)
        self.kv_heads = self.number("llama.attention.head_count_kv", int, self.heads)
        self.hidden = self.number("llama.embedding_length", int)
        scaling = self.get("llama.rope.scaling.type", "none")
        has_rope_freqs = any(t.name == "rope_freqs.weight" for t in reader.tensors)
        if scaling != "none" or has_rope_freqs:
            raise GGUFImportError(
                f"{path}: RoPE scaling ({scaling if scaling != 'none' else 'rope_freqs tensor'}) "
                "is not supported by this importer; only unscaled RoPE GGUFs import"
            )
        self.tokens: list[str] = self.get("tokenizer.ggml.tokens") or []
        self.token_types: list[int] = self.get("tokenizer.ggml.token_type") or []
        if not self.tokens or len(self.tokens) != len(self.token_types):
            raise GGUFImportError(
                f"{path}: tokenizer.ggml.tokens/token_type missing or inconsistent"
            )

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key, or `default` when absent."""
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def number(self, key: str, kind: type[int] | type[float], default: Any = None) -> Any:
        """A required positive number (`default` when absent and given)."""
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise GGUFImportError(
                f"{self.path}: metadata {key} is {value!r}; expected a positive number"
            )
        return kind(value)

    def nemotron_config(self, tied: bool) -> dict[str, Any]:
        """The nemotron-nas config.json: every block a regular GQA + SwiGLU block."""
        width = self.number("llama.feed_forward_length", int)
        ffn_mult = 3 * width / (2 * self.hidden)
        if ffn_width(ffn_mult, self.hidden) != width:
            raise GGUFImportError(
                f"llama.feed_forward_length {width} is not expressible with the DeciLM width rule "
                "(a multiple of 256 reachable from ffn_mult)"
            )
        block = {
            "attention": {
                "n_heads_in_group": self.heads // self.kv_heads,
                "no_op": False,
                "replace_with_linear": False,
            },
            "ffn": {"ffn_mult": ffn_mult, "no_op": False, "replace_with_linear": False},
        }
        layers = self.number("llama.block_count", int)
        eos = self.get("tokenizer.ggml.eos_token_id")
        return {
            "architectures": ["DeciLMForCausalLM"],
            "model_type": "nemotron-nas",
            "hidden_size": self.hidden,
            "num_attention_heads": self.heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": None,
            "intermediate_size": None,
            "vocab_size": len(self.tokens),
            "rms_norm_eps": self.number("llama.attention.layer_norm_rms_epsilon", float),
            "rope_theta": self.number("llama.rope.freq_base", float, 10000.0),
            "rope_scaling": None,
            "max_position_embeddings": self.number("llama.context_length", int),
            "hidden_act": "silu",
            "tie_word_embeddings": tied,
            "bos_token_id": self.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": [eos] if eos is not None else [],
            "torch_dtype": "float32",
            "block_configs": [block] * layers,
        }

    def tokenizer(self) -> Tokenizer:
        """A byte-level BPE tokenizer with the file's vocabulary, merges and special tokens."""
        merges = [tuple(m.split(" ")) for m in self.get("tokenizer.ggml.merges")]
        vocab = {token: index for index, token in enumerate(self.tokens)}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tokenizer.pre_tokenizer = PRE_TOKENIZERS[self.pre]()
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t in self._tokens_of(_CONTROL)]
        )
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False) for t in self._tokens_of(_USER_DEFINED)]
        )
        return tokenizer

    def _tokens_of(self, token_type: int) -> list[str]:
        return [
            t for t, kind in zip(self.tokens, self.token_types, strict=True) if kind == token_type
        ]

    def generation_config(self) -> dict[str, Any]:
        """generation_config.json: sampling defaults where the model's publisher gives them.

        GGUF files carry none; for the SmolLM2 family (the embedded model) they are the
        model card's (HuggingFaceTB/SmolLM2-135M-Instruct: its example generates with
        temperature 0.2, top-p 0.9), said so in `nemotron_source`.
        """
        if (self.get("general.organization"), self.get("general.basename")) != (
            "HuggingFaceTB",
            "smollm2",
        ):
            return {}
        return {
            "do_sample": True,
            "temperature": 0.2,
            "top_p": 0.9,
            "nemotron_source": "the SmolLM2-Instruct model card (temperature 0.2, top-p 0.9); "
            "the GGUF file carries no sampling metadata",
        }

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json: chat template and special token strings."""

        def token(key: str) -> str | None:
            index = self.get(key)
            return None if index is None else self.tokens[index]

        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "chat_template": self.get("tokenizer.chat_template"),
            "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id"),
            "pad_token": token("tokenizer.ggml.padding_token_id"),
            "unk_token": token("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": bool(self.get("tokenizer.ggml.add_bos_token", False)),
            "add_eos_token": bool(self.get("tokenizer.ggml.add_eos_token", False)),
            "model_max_length": self.number("llama.context_length", int),
            "clean_up_tokenization_spaces": False,
        }


def _convert_tensors(reader: GGUFReader, meta: _LlamaMetadata) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        array = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        array = array.reshape(shape)
        if name.endswith("self_attn.q_proj.weight"):
            array = _unpermute_rope_rows(array, meta.heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = _unpermute_rope_rows(array, meta.kv_heads)
        tensors[name] = torch.from_numpy(array.copy())  # owned and writable
    return tensors


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}"
    raise GGUFImportError(f"tensor {gguf_name!r} has no Nemotron-NAS counterpart")


def _unpermute_rope_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rows into rotary pairs (HF layout back)."""
    rows = weight.shape[0]
    split = weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)
