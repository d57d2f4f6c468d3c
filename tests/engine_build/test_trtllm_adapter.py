"""The TensorRT-LLM adapter: the exact calls and arguments it would make, per profile.

TensorRT-LLM cannot be installed here, so these tests pin the translation, not its execution.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_build.backends.base import BackendError, BuildJob
from engine_build.backends.registry import backend_names, select_backend
from engine_build.backends.trtllm import TensorRTLLMBackend, copy_engine_dir_files, plan_calls
from engine_build.checkpoint import Checkpoint
from engine_build.profiles import load_profiles

SCRATCH, ENGINE_OUT = Path("/scratch/trtllm-build-1"), Path("/work/engine")
CKPT_OUT = SCRATCH / "checkpoint"


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint) -> Checkpoint:
    return Checkpoint.open(synthetic_checkpoint)


def _job(checkpoint, profile_name, precision=None, calibration=None) -> BuildJob:
    profile = load_profiles().get(profile_name)
    return BuildJob(checkpoint, profile, profile.precision(precision), calibration)


@pytest.mark.parametrize(
    ("profile", "tp", "limits"),
    [("a100x4", 4, (64, 131072, 8192)), ("a100x8", 8, (128, 131072, 16384))],
)
def test_bf16_profiles_convert_per_rank_then_build_per_rank(checkpoint, profile, tp, limits):
    calls = plan_calls(_job(checkpoint, profile), SCRATCH, ENGINE_OUT)
    conversions, builds = calls[:tp], calls[tp:]
    assert len(calls) == 2 * tp
    for rank, call in enumerate(conversions):
        assert call.function == "tensorrt_llm.models.DeciLMForCausalLM.from_hugging_face"
        assert call.kwargs == {
            "hf_model_or_dir": str(checkpoint.directory),
            "dtype": "bfloat16",
            "mapping": {"world_size": tp, "rank": rank, "tp_size": tp, "pp_size": 1},
            "load_model_on_cpu": True,
            "trust_remote_code": True,
            "save_checkpoint": {"output_dir": str(CKPT_OUT), "save_config": rank == 0},
        }
    batch, seq, tokens = limits
    for rank, call in enumerate(builds):
        assert (call.function, call.rank) == ("tensorrt_llm.builder.build", rank)
        assert call.kwargs == {
            "checkpoint_dir": str(CKPT_OUT),
            "build_config": {
                "max_batch_size": batch,
                "max_input_len": seq,
                "max_seq_len": seq,
                "max_num_tokens": tokens,
                "max_beam_width": 1,
                # not `model.cache` in the working directory (read-only in the build Job)
                "output_timing_cache": str(SCRATCH / "timing.cache"),
            },
            "plugin_config": {"gemm_plugin": "auto"},
            "engine_dir": str(ENGINE_OUT),
        }


def test_h100x2_fp8_calibrates_with_modelopt_and_builds_two_ranks(checkpoint):
    calls = plan_calls(_job(checkpoint, "h100x2", calibration="/data/calib"), SCRATCH, ENGINE_OUT)
    assert [c.function for c in calls] == [
        "tensorrt_llm.quantization.quantize_by_modelopt.quantize_and_export",
        "tensorrt_llm.builder.build",
        "tensorrt_llm.builder.build",
    ]
    quantize = calls[0].kwargs
    assert (quantize["qformat"], quantize["kv_cache_dtype"], quantize["dtype"]) == (
        "fp8",
        "fp8",
        "bfloat16",
    )
    assert (quantize["tp_size"], quantize["pp_size"]) == (2, 1)
    assert quantize["calib_dataset"] == "/data/calib"
    assert quantize["output_dir"] == str(CKPT_OUT)
    assert calls[1].kwargs["plugin_config"] == {"gemm_plugin": "auto"}  # as NVIDIA's example
    assert calls[1].kwargs["checkpoint_dir"] == str(CKPT_OUT)
    assert calls[1].kwargs["build_config"]["max_num_tokens"] == 8192


def test_h100x2_fp8_without_calibration_data_is_refused(checkpoint):
    with pytest.raises(BackendError, match="need calibration data: pass --calibration-dataset"):
        plan_calls(_job(checkpoint, "h100x2"), SCRATCH, ENGINE_OUT)


def test_h100x2_bf16_alternative_converts_without_quantization(checkpoint):
    calls = plan_calls(_job(checkpoint, "h100x2", precision="bf16"), SCRATCH, ENGINE_OUT)
    assert [c.function.rsplit(".", 1)[1] for c in calls] == ["from_hugging_face"] * 2 + [
        "build"
    ] * 2


def test_auto_selects_torch_where_tensorrt_llm_is_not_installed():
    assert not TensorRTLLMBackend().is_available()
    for name in ("a100x4", "h100x2", "cpu"):
        assert select_backend("auto", load_profiles().get(name)).name == "torch"


def test_an_unknown_backend_lists_the_allowed_ones():
    assert backend_names() == ["auto", "torch", "tensorrt-llm", "tensorrt-llm-pytorch"]
    with pytest.raises(BackendError, match=r"unknown backend 'onnx'; allowed: \['auto', 'torch'"):
        select_backend("onnx", load_profiles().get("cpu"))


def test_the_engine_directory_gets_the_tokenizer_and_generation_config(tmp_path):
    checkpoint, engine = tmp_path / "hf", tmp_path / "engine"
    checkpoint.mkdir(), engine.mkdir()
    for name in ("tokenizer.json", "generation_config.json", "config.json"):
        (checkpoint / name).write_text(f'{{"name": "{name}"}}')
    assert copy_engine_dir_files(checkpoint, engine) == ["tokenizer.json", "generation_config.json"]
    assert (engine / "generation_config.json").read_text() == '{"name": "generation_config.json"}'
    assert not (engine / "config.json").exists()  # the engine has its own config
