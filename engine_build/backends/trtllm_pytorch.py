"""Thin adapter to TensorRT-LLM's PyTorch flow for Nemotron-NAS (optional imports).

TensorRT-LLM's PyTorch flow (`tensorrt_llm.LLM`, the flow NVIDIA's nemotron_nas example README
recommends for these models) compiles nothing ahead of time: it loads a Hugging Face checkpoint
(its own `NemotronNASForCausalLM` registered for `DeciLMForCausalLM`; the config is read through
transformers' AutoConfig with trust_remote_code, so the checkpoint's `configuration_decilm.py`
and the modules it imports must be there). So "building" an engine for this flow means:

  bf16  check the checkpoint (tensors against its graph, as every build does; the remote-code
        config module and its imports present) and copy its files into the engine directory.
  fp8   ModelOpt post-training quantization, run once at build time (`fp8_calls`):
        `AutoModelForCausalLM.from_pretrained(dir, torch_dtype=bfloat16,
        trust_remote_code=True, device_map="auto")`, `mtq.quantize(model, FP8_DEFAULT_CFG
        [+ FP8_KV_CFG], forward_loop)` over calibration samples, `export_hf_checkpoint(model,
        export_dir=out)` (which writes `hf_quant_config.json`, what the PyTorch flow reads to
        load a pre-quantized checkpoint); then the tokenizer and remote-code files beside it.

Either way the engine directory is then committed to the repository like any engine (keyed on
the TensorRT-LLM version, locked, every file hashed), with `nemotron-engine.json` saying which
flow opens it. The bf16 placement runs in our tests (with the test double of the package for
its version); the FP8 calls are checked against ModelOpt's signatures (tests/data/
trtllm_contract.json) and have NOT been executed by us: they need CUDA, ModelOpt and the
checkpoint's remote code inside NVIDIA's container.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from engine_build.backends.base import BackendError, BuildJob
from engine_build.backends.trtllm import (
    Call,
    TensorRTLLMBackend,
    remote_code_files,
)
from engine_build.profiles import Dtype, Precision, Profile

ENGINE_FORMAT = "tensorrt-llm-pytorch-checkpoint"
FLOW = "pytorch"
CALIBRATION_SAMPLES = 512  # NVIDIA's calibration defaults (calib_size, calib_max_seq_length)
CALIBRATION_MAX_TOKENS = 512
CALIBRATION_SUFFIXES = (".jsonl", ".txt")
FP8_NEEDS_CALIBRATION = (
    "FP8 engines with tensorrt-llm-pytorch are quantized by ModelOpt at build time and need "
    "calibration text: pass --calibration-dataset (a .jsonl file with a 'text' field per line, "
    "a .txt file with one sample per line, or a directory of them)"
)
# What a checkpoint directory contributes to the engine directory (top-level files only).
PLACED_SUFFIXES = (".json", ".safetensors", ".py", ".model", ".txt", ".jinja")
# Written by the FP8 export itself: everything else the checkpoint has is placed beside it.
EXPORT_WRITES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")
# Placeholders in the planned calls for objects made at build time.
MODEL, CALIBRATION_LOOP = "<the loaded model>", "<forward over the calibration samples>"


def placed_files(checkpoint_dir: Path, beside: Path | None = None) -> list[str]:
    """The checkpoint's files an engine directory gets (top level, by suffix), sorted; with
    `beside` (an FP8 export), none of its weights and nothing the export wrote."""
    skip: set[str] = set()
    if beside is not None:
        skip = {p.name for p in beside.iterdir()} | set(EXPORT_WRITES)
    return sorted(
        path.name
        for path in checkpoint_dir.iterdir()
        if path.is_file()
        and path.suffix in PLACED_SUFFIXES
        and path.name not in skip
        and not (beside is not None and path.suffix == ".safetensors")
    )


def place_files(checkpoint_dir: Path, names: list[str], out_dir: Path) -> None:
    """Copy each named file into `out_dir`: copies, not links, so that the engine is the
    repository's own (its files' modes are the repository's; an edit of the checkpoint later
    cannot change it)."""
    for name in names:
        shutil.copyfile(checkpoint_dir / name, out_dir / name)


def calibration_texts(path: Path, limit: int = CALIBRATION_SAMPLES) -> list[str]:
    """Up to `limit` calibration samples from a .jsonl ('text' per line) or .txt (a sample per
    non-empty line) file, or a directory of them (files in name order)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in CALIBRATION_SUFFIXES)
        if not files:
            raise BackendError(f"{path}: no {' or '.join(CALIBRATION_SUFFIXES)} files inside")
    elif path.is_file():
        if path.suffix not in CALIBRATION_SUFFIXES:
            raise BackendError(
                f"{path}: calibration data must be one of {list(CALIBRATION_SUFFIXES)}"
            )
        files = [path]
    else:
        raise BackendError(f"{path}: calibration dataset not found")
    texts: list[str] = []
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if len(texts) == limit:
                return texts
            if not line.strip():
                continue
            texts.append(line if file.suffix == ".txt" else _jsonl_text(file, number, line))
    if not texts:
        raise BackendError(f"{path}: no calibration samples")
    return texts


def _jsonl_text(file: Path, number: int, line: str) -> str:
    try:
        text = json.loads(line).get("text")
    except (json.JSONDecodeError, AttributeError) as err:
        raise BackendError(f"{file}:{number}: not a JSON object ({err})") from err
    if not isinstance(text, str):
        raise BackendError(f"{file}:{number}: no string 'text' field")
    return text


def quant_config_names(precision: Precision) -> tuple[str, ...]:
    """ModelOpt's config constants for this precision: FP8 weights and activations, and the
    FP8 KV cache where the precision asks for one."""
    if precision.kv_cache is Dtype.FP8:
        return ("FP8_DEFAULT_CFG", "FP8_KV_CFG")
    return ("FP8_DEFAULT_CFG",)


def fp8_calls(job: BuildJob, out_dir: Path) -> list[Call]:
    """The FP8 build: load, quantize with calibration, export an HF checkpoint into `out_dir`."""
    if not job.calibration_dataset:
        raise BackendError(FP8_NEEDS_CALIBRATION)
    return [
        Call(
            "transformers.AutoModelForCausalLM.from_pretrained",
            {
                "pretrained_model_name_or_path": str(job.checkpoint.directory),
                "torch_dtype": "bfloat16",
                "trust_remote_code": True,
                "device_map": "auto",
            },
        ),
        Call(
            "modelopt.torch.quantization.quantize",
            {
                "model": MODEL,
                "config": quant_config_names(job.precision),
                "forward_loop": CALIBRATION_LOOP,
            },
        ),
        Call(
            "modelopt.torch.export.export_hf_checkpoint",
            {"model": MODEL, "export_dir": str(out_dir)},
        ),
    ]


def merged_quant_config(mtq: Any, names: tuple[str, ...]) -> Any:
    """One ModelOpt config from constants of `mtq` (modelopt.torch.quantization): the first,
    with the others' quantizer settings added: a dict merge in ModelOpt 0.3x, its
    `update_quant_cfg_with_kv_cache_quant` helper where it has one (configs are lists there)."""
    config = copy.deepcopy(getattr(mtq, names[0]))
    for name in names[1:]:
        extra = getattr(mtq, name)["quant_cfg"]
        helper = getattr(mtq, "update_quant_cfg_with_kv_cache_quant", None)
        if helper is not None:
            config = helper(config, extra)
        else:
            config["quant_cfg"].update(extra)
    return config


def manifest(job: BuildJob, version: str) -> dict[str, Any]:
    """`nemotron-engine.json` of a PyTorch-flow engine directory."""
    return {
        "format": ENGINE_FORMAT,
        "flow": FLOW,
        "profile": job.profile.name,
        "tensor_parallel": job.profile.tensor_parallel,
        "precision": {
            "weights": job.precision.weights.value,
            "kv_cache": job.precision.kv_cache.value,
        },
        "tensorrt_llm_version": version,
    }


class TensorRTLLMPyTorchBackend(TensorRTLLMBackend):
    """Engines for TensorRT-LLM's PyTorch flow: the checkpoint as it loads it (bf16) or as
    ModelOpt quantizes it (fp8), where the tensorrt_llm package is importable."""

    name = "tensorrt-llm-pytorch"
    fp8_needs_calibration = FP8_NEEDS_CALIBRATION

    def check(
        self, profile: Profile, precision: Precision, calibration_dataset: str | None
    ) -> None:
        """bf16 or fp8 weights; then as the TensorRT flow (FP8: calibration data, ModelOpt)."""
        if precision.weights not in (Dtype.BF16, Dtype.FP8):
            raise BackendError(
                f"backend {self.name} builds bf16 or fp8 engines, not {precision.name}"
            )
        super().check(profile, precision, calibration_dataset)

    def build(self, job: BuildJob, out_dir: Path) -> None:
        """Place (bf16) or quantize (fp8) the checkpoint into `out_dir`, then the manifest."""
        directory = job.checkpoint.directory
        remote_code_files(directory, job.precision)  # refuse before any work
        if job.precision.weights is Dtype.FP8:
            calibration_texts(Path(str(job.calibration_dataset)), 1)  # readable, not empty
            _quantize_fp8(job, out_dir)
            place_files(directory, placed_files(directory, beside=out_dir), out_dir)
        else:
            place_files(directory, placed_files(directory), out_dir)
        text = json.dumps(manifest(job, self.version()), indent=2) + "\n"
        (out_dir / "nemotron-engine.json").write_text(text)


def _quantize_fp8(job: BuildJob, out_dir: Path) -> None:  # pragma: no cover - needs CUDA
    """Execute `fp8_calls` (transformers, ModelOpt and CUDA, inside NVIDIA's container)."""
    try:
        import modelopt.torch.quantization as mtq
        import torch
        import transformers
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError as err:
        raise BackendError(
            f"FP8 builds with tensorrt-llm-pytorch need ModelOpt and transformers ({err}); "
            "build inside NVIDIA's TensorRT-LLM release image, which has both"
        ) from err
    load, quantize, export = (call.kwargs for call in fp8_calls(job, out_dir))
    texts = calibration_texts(Path(str(job.calibration_dataset)))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(job.checkpoint.directory))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        **{**load, "torch_dtype": torch.bfloat16}
    )

    def forward_loop(module: Any) -> None:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(
                    text, return_tensors="pt", truncation=True, max_length=CALIBRATION_MAX_TOKENS
                ).input_ids
                module(ids.to(module.device))

    config = merged_quant_config(mtq, quantize["config"])
    # The planned keywords (checked against ModelOpt's signatures), the placeholders filled in.
    model = mtq.quantize(
        **{**quantize, "model": model, "config": config, "forward_loop": forward_loop}
    )
    with torch.inference_mode():
        export_hf_checkpoint(**{**export, "model": model})
