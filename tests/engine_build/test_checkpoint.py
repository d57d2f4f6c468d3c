"""Checkpoint validation against the graph, and load-time fusion."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_build.checkpoint import Checkpoint, CheckpointError
from engine_build.synthetic import write_synthetic_checkpoint


def test_a_checkpoint_missing_a_weight_names_the_tensor_and_layer(tmp_path):
    write_synthetic_checkpoint(tmp_path, drop=("model.layers.7.mlp.down_proj.weight",))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor 'model\.layers\.7\.mlp\.down_proj\.weight' \(layer 7",
    ):
        Checkpoint.open(tmp_path)


def _with_tensor(directory, name: str, tensor: torch.Tensor):
    """A synthetic checkpoint in `directory` whose tensor `name` is replaced or added."""
    write_synthetic_checkpoint(directory)
    tensors = load_file(directory / "model.safetensors")
    tensors[name] = tensor
    save_file(tensors, directory / "model.safetensors")
    return directory


def test_a_weight_for_a_no_op_part_is_refused(tmp_path):
    _with_tensor(tmp_path, "model.layers.5.input_layernorm.weight", torch.ones(64))  # all no-op
    with pytest.raises(
        CheckpointError, match=r"'model\.layers\.5\.input_layernorm\.weight' is not described"
    ):
        Checkpoint.open(tmp_path)


def test_a_weight_of_the_wrong_shape_is_refused(tmp_path):
    _with_tensor(tmp_path, "model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64))
    with pytest.raises(
        CheckpointError, match=r"has shape \[64, 64\], config.json implies \[32, 64\]"
    ):
        Checkpoint.open(tmp_path)


def test_a_directory_without_weights_is_refused(tmp_path):
    write_synthetic_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        Checkpoint.open(tmp_path)


def test_sharded_checkpoints_load_and_a_missing_shard_is_named(tmp_path):
    write_synthetic_checkpoint(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert len(Checkpoint.open(tmp_path).read_fused(torch.float32)) > 0
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names b\.safetensors, which is missing"):
        Checkpoint.open(tmp_path)


def test_read_fused_concatenates_qkv_and_gate_up(synthetic_checkpoint):
    checkpoint = Checkpoint.open(synthetic_checkpoint)
    raw = load_file(synthetic_checkpoint / "model.safetensors")
    fused = checkpoint.read_fused(torch.float32)
    qkv = fused["model.layers.0.self_attn.qkv_proj.weight"]
    parts = [raw[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(qkv, torch.cat(parts))
    gate_up = fused["model.layers.7.mlp.gate_up_proj.weight"]
    assert torch.equal(gate_up[:512], raw["model.layers.7.mlp.gate_proj.weight"])
    assert not any(name.endswith(("q_proj.weight", "gate_proj.weight")) for name in fused)


def test_a_corrupt_safetensors_file_is_a_checkpoint_error(tmp_path):
    write_synthetic_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("{not json", "not a valid safetensors index"),
        ("[1, 2]", "not a valid safetensors index"),
        ('{"weight_map": {"a": 1}}', "weight_map must map tensor names to file names"),
        ('{"weight_map": {"x": "../outside.safetensors"}}', "outside the checkpoint directory"),
    ],
)
def test_a_malformed_index_is_a_checkpoint_error(tmp_path, index, message):
    write_synthetic_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint.open(tmp_path)


def test_an_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    write_synthetic_checkpoint(tmp_path)
    weight_map = {"model.norm.weight": "model.safetensors", "ghost.weight": "model.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="tensor 'ghost.weight' is not in model.safetensors"):
        Checkpoint.open(tmp_path)
