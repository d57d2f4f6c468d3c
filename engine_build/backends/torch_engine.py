"""Our own PyTorch engine format, which runs everywhere: per-rank safetensors plus engine.json.

    engine.json                     model config, tp, precision, limits, files of every rank
    rank<r>-part<k>.safetensors     rank r's shard of a few layers (fused HF names; fp8, int8
                                    and int4 matrices carry `<name>_scale`, int4 `<name>_min`:
                                    engine_build/quantize.py)
    tokenizer.json, tokenizer_config.json   copied from the checkpoint when present

The checkpoint is read a few layers at a time, so building never holds the whole model.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from engine_build.backends.base import BuildJob
from engine_build.graph import ModelGraph
from engine_build.profiles import WEIGHT_ONLY, Dtype, EngineLimits, Precision, Profile
from engine_build.progress import Progress
from engine_build.quantize import convert_precision
from engine_build.sharding import shard_tensors
from engine_build.summary import stores_own_lm_head
from engine_build.weights import EMBEDDING, LM_HEAD, weight_specs

ENGINE_FILE = "engine.json"
ENGINE_FORMAT = "nemotron-torch-engine"
FORMAT_VERSION = 1
# Copied from the checkpoint when present (generation_config.json: its sampling defaults).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
# Source bytes read per part: bounds the builder's memory for big checkpoints.
PART_BYTES = 2 * 10**9


class EngineFormatError(ValueError):
    """An engine directory that is not a readable torch engine."""


class TorchBackend:
    """Builds torch engines: shard, convert precision, write safetensors."""

    name = "torch"

    def is_available(self) -> bool:
        """Always: torch is a dependency."""
        return True

    def version(self) -> str:
        """The engine format version (what a loader must understand)."""
        return f"{ENGINE_FORMAT}-v{FORMAT_VERSION}"

    def check(
        self, profile: Profile, precision: Precision, calibration_dataset: str | None
    ) -> None:
        """Every profile and precision builds (FP8 weights are computed in bf16 when served)."""

    def build(self, job: BuildJob, out_dir: Path) -> None:
        """Write every rank's shards, the tokenizer and engine.json into `out_dir`."""
        graph, tp = job.checkpoint.graph, job.profile.tensor_parallel
        # int8 and int4 quantize from the checkpoint's fp32 values (the GGUF import's are exact)
        exact = job.precision.weights in (Dtype.FP32, *WEIGHT_ONLY)
        read_dtype = torch.float32 if exact else torch.bfloat16
        parts = layer_parts(graph, torch.finfo(read_dtype).bits // 8)
        untie = graph.tie_word_embeddings and stores_own_lm_head(graph, job.precision.weights)
        progress = Progress(f"build {job.profile.name}", len(parts))
        rank_files: dict[int, list[str]] = {rank: [] for rank in range(tp)}
        for index, (layers, include_globals) in enumerate(parts):
            fused = job.checkpoint.read_fused(read_dtype, layers, include_globals)
            if include_globals and untie:  # the tied lm_head, stored in its own format
                fused[LM_HEAD.name] = fused[EMBEDDING.name]
            for rank in range(tp):
                shard = convert_precision(
                    shard_tensors(fused, graph, tp, rank), job.precision.weights
                )
                file = f"rank{rank}-part{index:04d}.safetensors"
                save_file(shard, str(out_dir / file), metadata={"format": "pt"})
                rank_files[rank].append(file)
            progress.advance(f"layers {layers.start}-{max(layers.stop - 1, layers.start)}")
        tokenizer = [f for f in TOKENIZER_FILES if (job.checkpoint.directory / f).is_file()]
        for file in tokenizer:
            shutil.copyfile(job.checkpoint.directory / file, out_dir / file)
        description = {
            "format": ENGINE_FORMAT,
            "format_version": FORMAT_VERSION,
            "profile": job.profile.name,
            "model_config": json.loads((job.checkpoint.directory / "config.json").read_text()),
            "tensor_parallel": tp,
            "precision": {
                "weights": job.precision.weights.value,
                "kv_cache": job.precision.kv_cache.value,
            },
            "limits": asdict(job.profile.limits),
            "rank_files": {str(rank): files for rank, files in rank_files.items()},
            "tokenizer_files": tokenizer,
            "torch_version": torch.__version__,
        }
        (out_dir / ENGINE_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")


def layer_parts(graph: ModelGraph, bytes_per_element: int) -> list[tuple[range, bool]]:
    """Consecutive layer ranges of at most ~PART_BYTES each; the first also holds the globals."""
    layer_bytes = [0] * graph.num_layers
    global_bytes = 0
    for spec in weight_specs(graph):
        if spec.layer is None:
            global_bytes += spec.numel * bytes_per_element
        else:
            layer_bytes[spec.layer] += spec.numel * bytes_per_element
    parts: list[tuple[range, bool]] = []
    start, size = 0, global_bytes
    for index, nbytes in enumerate(layer_bytes):
        if index > start and size + nbytes > PART_BYTES:
            parts.append((range(start, index), not parts))
            start, size = index, 0
        size += nbytes
    parts.append((range(start, graph.num_layers), not parts))
    return parts


@dataclass(frozen=True)
class TorchEngine:
    """A built torch engine opened for loading."""

    directory: Path
    model_config: dict[str, Any]
    tensor_parallel: int
    precision: Precision
    limits: EngineLimits
    rank_files: dict[int, list[str]]

    @property
    def graph(self) -> ModelGraph:
        """The whole (unsharded) model graph."""
        return ModelGraph.from_hf_config(self.model_config)

    @classmethod
    def open(cls, directory: str | Path) -> TorchEngine:
        """Read engine.json (no weights yet)."""
        directory = Path(directory)
        path = directory / ENGINE_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise EngineFormatError(f"{path}: cannot read engine description ({err})") from err
        if not isinstance(raw, dict):
            raise EngineFormatError(f"{path}: expected a JSON object")
        if raw.get("format") != ENGINE_FORMAT or raw.get("format_version") != FORMAT_VERSION:
            raise EngineFormatError(
                f"{path}: format {raw.get('format')!r} v{raw.get('format_version')!r}; "
                f"this loader reads {ENGINE_FORMAT} v{FORMAT_VERSION}"
            )
        try:
            return cls(
                directory=directory,
                model_config=raw["model_config"],
                tensor_parallel=int(raw["tensor_parallel"]),
                precision=Precision(
                    Dtype(raw["precision"]["weights"]), Dtype(raw["precision"]["kv_cache"])
                ),
                limits=EngineLimits(**raw["limits"]),
                rank_files={int(rank): list(files) for rank, files in raw["rank_files"].items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise EngineFormatError(
                f"{path}: malformed engine description ({type(err).__name__}: {err})"
            ) from err

    def read_rank(self, rank: int) -> dict[str, Tensor]:
        """All stored tensors of one rank, in their stored dtypes."""
        if rank not in self.rank_files:
            raise EngineFormatError(
                f"{self.directory}: no rank {rank}; "
                f"this engine has tensor_parallel {self.tensor_parallel}"
            )
        tensors: dict[str, Tensor] = {}
        for file in self.rank_files[rank]:
            with safe_open(self.directory / file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensors[name] = handle.get_tensor(name)
        return tensors
