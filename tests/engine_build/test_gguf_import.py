"""The GGUF importer: determinism, caching, the Q/K permutation and refusals."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from gguf import GGUFWriter

from engine_build.checkpoint import Checkpoint
from engine_build.gguf_import import (
    MARKER_FILE,
    GGUFImportError,
    _unpermute_rope_rows,
    import_gguf,
    import_gguf_cached,
)


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf.py permutation, written out for the round trip.
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_rope_permutation():
    weight = np.arange(12 * 8 * 5, dtype=np.float32).reshape(12 * 8, 5)
    for heads in (1, 3, 12):
        permuted = _llama_cpp_permute(weight, heads)
        assert not np.array_equal(permuted, weight)
        assert np.array_equal(_unpermute_rope_rows(permuted, heads), weight)


def _tiny_gguf(path, architecture: str, metadata: bool = False, rope_scaling: str | None = None):
    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["a", "b", "c", "d"])
    writer.add_token_types([1, 1, 1, 1])
    if metadata:
        writer.add_head_count(2)
        writer.add_head_count_kv(1)
        writer.add_embedding_length(4)
    if rope_scaling:
        writer.add_string("llama.rope.scaling.type", rope_scaling)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_of_another_architecture_is_refused(tmp_path):
    gguf = _tiny_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.raises(
        GGUFImportError, match="architecture is 'qwen2'; this importer converts 'llama'"
    ):
        import_gguf(gguf, tmp_path / "out")


def test_a_llama_gguf_missing_required_metadata_is_refused(tmp_path):
    gguf = _tiny_gguf(tmp_path / "bare.gguf", "llama")
    with pytest.raises(GGUFImportError, match="metadata llama.attention.head_count is None"):
        import_gguf(gguf, tmp_path / "out")


def test_a_gguf_with_rope_scaling_is_refused_naming_it(tmp_path):
    gguf = _tiny_gguf(tmp_path / "scaled.gguf", "llama", metadata=True, rope_scaling="linear")
    with pytest.raises(GGUFImportError, match=r"RoPE scaling \(linear\) is not supported"):
        import_gguf(gguf, tmp_path / "out")


def test_cli_import_of_a_missing_file_is_a_clear_error(tmp_path, capsys):
    from engine_build.cli import main

    assert main(["import-gguf", str(tmp_path / "nope.gguf"), "--cache-dir", str(tmp_path)]) == 2
    assert "nope.gguf: no such file" in capsys.readouterr().err


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFImportError, match="not a readable GGUF file"):
        import_gguf(bogus, tmp_path / "out")


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(GGUFImportError, match="no such file"):
        import_gguf(tmp_path / "absent.gguf", tmp_path / "out")


@pytest.mark.slow
def test_embedded_import_is_a_valid_nemotron_nas_checkpoint(embedded_checkpoint):
    config = json.loads((embedded_checkpoint / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert len(config["block_configs"]) == 30
    assert {b["attention"]["n_heads_in_group"] for b in config["block_configs"]} == {3}
    checkpoint = Checkpoint.open(embedded_checkpoint)
    assert checkpoint.graph.tie_word_embeddings
    assert checkpoint.graph.blocks[0].ffn.intermediate_size == 1536
    tokenizer_config = json.loads((embedded_checkpoint / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    marker = json.loads((embedded_checkpoint / MARKER_FILE).read_text())
    assert marker["weights_dtype"] == "float32"


def _digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.slow
def test_import_is_deterministic_byte_for_byte(embedded_gguf, embedded_checkpoint, tmp_path):
    again = import_gguf(embedded_gguf, tmp_path / "again")
    assert _digests(again) == _digests(embedded_checkpoint)


@pytest.mark.slow
def test_cached_import_is_reused_without_rewriting(
    embedded_gguf, cached_embedded_checkpoint, cache_dir
):
    before = (cached_embedded_checkpoint / "model.safetensors").stat().st_mtime_ns
    assert import_gguf_cached(embedded_gguf, cache_dir) == cached_embedded_checkpoint
    assert (cached_embedded_checkpoint / "model.safetensors").stat().st_mtime_ns == before
