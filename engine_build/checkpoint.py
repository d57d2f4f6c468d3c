"""Reading a Hugging Face safetensors checkpoint of a Nemotron-NAS graph, checked against the graph.

Every expected tensor must be present with its shape, and nothing the config does not describe
may be there (a no-op sub-block has no weights, not even a norm). q/k/v and gate/up are fused
here, at load time, so that nothing downstream sees the unfused names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from engine_build.graph import ModelGraph
from engine_build.weights import WeightSpec, fused_group, weight_specs

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint directory that does not match its config; the message names the tensor."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint directory: its graph and where each tensor lives."""

    directory: Path
    graph: ModelGraph
    tensor_files: dict[str, Path]

    @classmethod
    def open(cls, directory: str | Path) -> Checkpoint:
        """Open and validate a checkpoint directory (config.json plus safetensors files)."""
        directory = Path(directory)
        graph = ModelGraph.from_path(directory)
        checkpoint = cls(directory, graph, _locate_tensors(directory))
        checkpoint.validate()
        return checkpoint

    def validate(self) -> None:
        """Check names and shapes of every tensor against the graph."""
        expected = {spec.name: spec for spec in weight_specs(self.graph)}
        for spec in expected.values():
            if spec.name not in self.tensor_files:
                raise CheckpointError(
                    f"{self.directory}: missing tensor {spec.name!r} "
                    f"({_describe(self.graph, spec)}, expected shape {list(spec.shape)})"
                )
        allowed_extra = {"lm_head.weight"} if self.graph.tie_word_embeddings else set()
        for name in sorted(set(self.tensor_files) - set(expected) - allowed_extra):
            raise CheckpointError(
                f"{self.directory}: tensor {name!r} is not described by config.json "
                "(a no-op sub-block has no weights; check block_configs)"
            )
        for name, shape in self._shapes():
            if name in expected and shape != expected[name].shape:
                raise CheckpointError(
                    f"{self.directory}: tensor {name!r} has shape {list(shape)}, "
                    f"config.json implies {list(expected[name].shape)}"
                )

    def _shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        for file, names in _group_by_file(self.tensor_files).items():
            with safe_open(file, framework="pt") as handle:
                for name in names:
                    yield name, tuple(handle.get_slice(name).get_shape())

    def read_fused(
        self, dtype: torch.dtype, layers: range | None = None, include_globals: bool = True
    ) -> dict[str, torch.Tensor]:
        """Tensors in `dtype` under HF names, with q/k/v and gate/up concatenated.

        Fused tensors are named `...self_attn.qkv_proj.weight` and `...mlp.gate_up_proj.weight`.
        `layers` and `include_globals` select a part of the model, so that big checkpoints can
        be processed a few layers at a time.
        """
        wanted = {
            spec.name
            for spec in weight_specs(self.graph)
            if (spec.layer is None and include_globals)
            or (spec.layer is not None and (layers is None or spec.layer in layers))
        }
        tensors: dict[str, torch.Tensor] = {}
        for file, names in _group_by_file(self.tensor_files).items():
            selected = [name for name in names if name in wanted]
            if not selected:
                continue
            with safe_open(file, framework="pt") as handle:
                for name in selected:
                    tensors[name] = handle.get_tensor(name).to(dtype)
        return fuse(tensors)


def fuse(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Replace each fused group of the weight table by one tensor concatenated along dim 0."""
    fused: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        group = fused_group(name)
        if group is None:
            fused[name] = tensor
        elif name == group[1][0]:
            fused[group[0]] = torch.cat([tensors[part] for part in group[1]], dim=0)
    return fused


def _describe(graph: ModelGraph, spec: WeightSpec) -> str:
    if spec.layer is None:
        return spec.role.value
    block = graph.blocks[spec.layer]
    return f"layer {spec.layer}: attention {block.attention.kind}, ffn {block.ffn.kind}"


def _locate_tensors(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_FILE
    if not index.is_file():
        single = directory / SINGLE_FILE
        if not single.is_file():
            raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
        return dict.fromkeys(_tensor_names(single), single)
    weight_map = _read_weight_map(index)
    files: dict[str, Path] = {}
    for file in sorted(set(weight_map.values())):
        path = directory / file
        if Path(file).is_absolute() or path.resolve().parent != directory.resolve():
            raise CheckpointError(f"{index}: shard {file!r} is outside the checkpoint directory")
        if not path.is_file():
            raise CheckpointError(f"{directory}: {INDEX_FILE} names {file}, which is missing")
        files.update(dict.fromkeys(_tensor_names(path), path))
    for name, file in weight_map.items():
        if files.get(name) != directory / file:
            raise CheckpointError(f"{index}: tensor {name!r} is not in {file}")
    return {name: files[name] for name in weight_map}


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise CheckpointError(f"{index}: not a valid safetensors index ({err})") from err
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index}: weight_map must map tensor names to file names")
    return weight_map


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as handle:
            return list(handle.keys())
    except Exception as err:  # safetensors raises its own SafetensorError and OSError
        raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err


def _group_by_file(tensor_files: dict[str, Path]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for name, file in tensor_files.items():
        groups.setdefault(file, []).append(name)
    return groups
