"""Thin adapter to TensorRT-LLM's Nemotron-NAS (DeciLM) engine flow; optional import.

TensorRT-LLM cannot be installed on our CI machines (PyPI only has a stub that downloads from
NVIDIA's index, and it needs CUDA), so this path has NOT been executed by our tests. What the
tests check is the exact list of calls and arguments `plan_calls` produces for each profile;
`build` executes that list in order inside NVIDIA's TensorRT-LLM container.

The flow, per TensorRT-LLM's `examples/models/core/nemotron_nas` and `builder.py`:
  bf16: per rank, `DeciLMForCausalLM.from_hugging_face(dir, dtype, mapping=Mapping(...))` then
        `.save_checkpoint(ckpt, save_config=rank == 0)`.
  fp8:  `quantize_and_export(...)` (modelopt calibration; DeciLM has no direct FP8 load path),
        which writes the whole tp-sharded checkpoint with FP8 weights and KV-cache scales.
  then, per rank: `DeciLMForCausalLM.from_checkpoint(ckpt, rank=r)`, `build(model,
        BuildConfig(...))`, `engine.save(out)`.
The intermediate checkpoint and the builder's timing cache live in the build's scratch
directory (`BuildConfig.output_timing_cache` defaults to `model.cache` in the working directory,
which the chart's build Job mounts read-only). The engine directory also gets the checkpoint's
tokenizer files and `generation_config.json` (TensorRT-LLM's `LLM` reads its EOS ids there).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine_build.backends.base import BackendError, BuildJob
from engine_build.profiles import Dtype, Precision, Profile

ENGINE_FORMAT = "tensorrt-llm-engine"
FP8_NEEDS_CALIBRATION = (
    "FP8 engines with tensorrt-llm need calibration data: pass --calibration-dataset "
    "(a local dataset path, as in TensorRT-LLM's nemotron_nas calibration_utils.py)"
)
CALIBRATION_SAMPLES = 512
TORCH_DTYPE_NAMES = {Dtype.BF16: "bfloat16", Dtype.FP32: "float32", Dtype.FP8: "bfloat16"}


@dataclass(frozen=True)
class Call:
    """One TensorRT-LLM call: a dotted function path, its keyword arguments and a target."""

    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None


# Copied from the checkpoint into the engine directory, where the runtime reads them.
ENGINE_DIR_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
TIMING_CACHE = "timing.cache"  # in the scratch directory
CHECKPOINT = "checkpoint"  # the TensorRT-LLM checkpoint, in the scratch directory


def build_config_kwargs(profile: Profile, scratch: Path) -> dict[str, Any]:
    """`tensorrt_llm.builder.BuildConfig` keyword arguments from the profile's limits."""
    limits = profile.limits
    return {
        "max_batch_size": limits.max_batch_size,
        "max_input_len": limits.max_seq_len,
        "max_seq_len": limits.max_seq_len,
        "max_num_tokens": limits.max_num_tokens,
        "max_beam_width": 1,
        "output_timing_cache": str(scratch / TIMING_CACHE),
    }


def plugin_settings(precision: Precision) -> dict[str, str]:
    """PluginConfig attributes: the GEMM plugin, for FP8 too (as NVIDIA's nemotron_nas example
    builds its FP8 engines)."""
    return {"gemm_plugin": "auto"}


def conversion_calls(job: BuildJob, checkpoint_out: Path) -> list[Call]:
    """HF checkpoint -> TensorRT-LLM checkpoint (per rank for bf16, one calibrated call for fp8)."""
    tp, model_dir = job.profile.tensor_parallel, str(job.checkpoint.directory)
    if job.precision.weights is Dtype.FP8:
        if not job.calibration_dataset:
            raise BackendError(FP8_NEEDS_CALIBRATION)
        return [
            Call(
                "tensorrt_llm.quantization.quantize_by_modelopt.quantize_and_export",
                {
                    "model_dir": model_dir,
                    "device": "cuda",
                    "calib_dataset": job.calibration_dataset,
                    "dtype": "bfloat16",
                    "qformat": "fp8",
                    "kv_cache_dtype": "fp8" if job.precision.kv_cache is Dtype.FP8 else None,
                    "calib_size": CALIBRATION_SAMPLES,
                    "batch_size": 1,
                    "calib_max_seq_length": 512,
                    "awq_block_size": 128,
                    "output_dir": str(checkpoint_out),
                    "tp_size": tp,
                    "pp_size": 1,
                    "cp_size": 1,
                    "seed": 1234,
                    "tokenizer_max_seq_length": 2048,
                },
            )
        ]
    dtype = TORCH_DTYPE_NAMES[job.precision.weights]
    return [
        Call(
            "tensorrt_llm.models.DeciLMForCausalLM.from_hugging_face",
            {
                "hf_model_or_dir": model_dir,
                "dtype": dtype,
                "mapping": {"world_size": tp, "rank": rank, "tp_size": tp, "pp_size": 1},
                "load_model_on_cpu": True,
                "trust_remote_code": True,
                "save_checkpoint": {"output_dir": str(checkpoint_out), "save_config": rank == 0},
            },
            rank,
        )
        for rank in range(tp)
    ]


def engine_calls(job: BuildJob, scratch: Path, out_dir: Path) -> list[Call]:
    """TensorRT-LLM checkpoint -> one engine per rank, with the profile's limits."""
    return [
        Call(
            "tensorrt_llm.builder.build",
            {
                "checkpoint_dir": str(scratch / CHECKPOINT),
                "build_config": build_config_kwargs(job.profile, scratch),
                "plugin_config": plugin_settings(job.precision),
                "engine_dir": str(out_dir),
            },
            rank,
        )
        for rank in range(job.profile.tensor_parallel)
    ]


def plan_calls(job: BuildJob, scratch: Path, out_dir: Path) -> list[Call]:
    """Every call `build` makes, in order; intermediate files go under `scratch`."""
    return conversion_calls(job, scratch / CHECKPOINT) + engine_calls(job, scratch, out_dir)


def remote_code_files(checkpoint_dir: Path, precision: Precision) -> list[str]:
    """The checkpoint's remote-code files TensorRT-LLM runs, checked present; BackendError
    naming the first one missing.

    Both flows read a Nemotron-NAS config through transformers' AutoConfig with
    trust_remote_code, and FP8 calibration loads the whole model with AutoModelForCausalLM: the
    modules config.json's `auto_map` names for those and, transitively, the sibling modules they
    import (`from .x import y`).
    """
    config = json.loads((checkpoint_dir / "config.json").read_text())
    auto_map = config.get("auto_map") or {}
    needed_by = ["AutoConfig"] + (
        ["AutoModelForCausalLM"] if precision.weights is Dtype.FP8 else []
    )
    files: list[str] = []
    for auto_class in needed_by:
        target = auto_map.get(auto_class)
        if not isinstance(target, str) or "." not in target:
            raise BackendError(
                f"{checkpoint_dir}: config.json has no auto_map.{auto_class}; TensorRT-LLM reads "
                "a Nemotron-NAS checkpoint through its remote code (trust_remote_code; NVIDIA's "
                "checkpoints name configuration_decilm.DeciLMConfig and "
                "modeling_decilm.DeciLMForCausalLM): use the published checkpoint's files, or "
                "--backend torch"
            )
        todo = [target.rsplit(".", 1)[0]]
        while todo:
            name = f"{todo.pop()}.py"
            if name in files:
                continue
            if not (checkpoint_dir / name).is_file():
                raise BackendError(
                    f"{checkpoint_dir}: {name} is missing (needed by config.json "
                    f"auto_map.{auto_class}; TensorRT-LLM loads it with trust_remote_code)"
                )
            files.append(name)
            todo += _relative_imports(checkpoint_dir / name)
    return files


def _relative_imports(path: Path) -> list[str]:
    """Modules a file imports with `from .x import y` (sibling files)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    ]


def require_modelopt(precision: Precision) -> None:
    """FP8 builds quantize with NVIDIA ModelOpt: refuse before any work where it is missing."""
    if precision.weights is Dtype.FP8 and importlib.util.find_spec("modelopt") is None:
        raise BackendError(
            "FP8 builds with TensorRT-LLM quantize with NVIDIA ModelOpt (the modelopt package, "
            "nvidia-modelopt), which is not installed here: build inside NVIDIA's TensorRT-LLM "
            "release image, which ships it, or build bf16"
        )


def copy_engine_dir_files(checkpoint_dir: Path, out_dir: Path) -> list[str]:
    """Copy the checkpoint's files the runtime reads into the engine directory; their names."""
    copied = []
    for name in ENGINE_DIR_FILES:
        if (checkpoint_dir / name).is_file():
            shutil.copyfile(checkpoint_dir / name, out_dir / name)
            copied.append(name)
    return copied


class TensorRTLLMBackend:
    """Builds TensorRT engines with TensorRT-LLM, where its package is importable."""

    name = "tensorrt-llm"
    fp8_needs_calibration = FP8_NEEDS_CALIBRATION  # what a refusal says the data must be

    def is_available(self) -> bool:
        """Whether `tensorrt_llm` can be imported (only in NVIDIA's container)."""
        return importlib.util.find_spec("tensorrt_llm") is not None

    def version(self) -> str:
        """The installed tensorrt_llm's version (engines only run with the release that built
        them), from its package metadata: importing tensorrt_llm needs libcuda, which a build
        without GPUs (a tensorrt-llm-pytorch bf16 one) does not have."""
        if not self.is_available():
            raise BackendError("tensorrt_llm is not installed")
        try:
            return importlib.metadata.version("tensorrt_llm")
        except importlib.metadata.PackageNotFoundError:
            return str(importlib.import_module("tensorrt_llm").__version__)

    def check(
        self, profile: Profile, precision: Precision, calibration_dataset: str | None
    ) -> None:
        """FP8 needs calibration data and ModelOpt (DeciLM has no direct FP8 conversion)."""
        if precision.weights is Dtype.FP8 and not calibration_dataset:
            raise BackendError(self.fp8_needs_calibration)
        require_modelopt(precision)

    def build(self, job: BuildJob, out_dir: Path) -> None:
        """Run the planned calls; intermediate files live in a temporary scratch directory."""
        remote_code_files(job.checkpoint.directory, job.precision)  # refuse before any work
        self._run(job, out_dir)

    def _run(self, job: BuildJob, out_dir: Path) -> None:  # pragma: no cover - needs CUDA
        with tempfile.TemporaryDirectory(prefix="trtllm-build-") as scratch:
            for call in plan_calls(job, Path(scratch), out_dir):
                _execute(call)
        copy_engine_dir_files(job.checkpoint.directory, out_dir)
        (out_dir / "nemotron-engine.json").write_text(
            json.dumps(
                {
                    "format": ENGINE_FORMAT,
                    "profile": job.profile.name,
                    "tensor_parallel": job.profile.tensor_parallel,
                    "precision": {
                        "weights": job.precision.weights.value,
                        "kv_cache": job.precision.kv_cache.value,
                    },
                    "tensorrt_llm_version": self.version(),
                },
                indent=2,
            )
            + "\n"
        )


def _execute(call: Call) -> None:  # pragma: no cover - needs tensorrt_llm and CUDA
    import tensorrt_llm
    from tensorrt_llm.builder import BuildConfig, build
    from tensorrt_llm.models import DeciLMForCausalLM

    kwargs = dict(call.kwargs)
    if call.function.endswith("quantize_and_export"):
        from tensorrt_llm.quantization.quantize_by_modelopt import quantize_and_export

        quantize_and_export(**kwargs)
    elif call.function.endswith("from_hugging_face"):
        save = kwargs.pop("save_checkpoint")
        kwargs["mapping"] = tensorrt_llm.Mapping(**kwargs["mapping"])
        model = DeciLMForCausalLM.from_hugging_face(**kwargs)
        Path(save["output_dir"]).mkdir(parents=True, exist_ok=True)
        model.save_checkpoint(save["output_dir"], save_config=save["save_config"])
    else:
        model = DeciLMForCausalLM.from_checkpoint(kwargs["checkpoint_dir"], rank=call.rank)
        config = BuildConfig(**kwargs["build_config"])
        for attribute, value in kwargs["plugin_config"].items():
            setattr(config.plugin_config, attribute, value)
        build(model, config).save(kwargs["engine_dir"])
