"""The tensorrt-llm-pytorch backend: what its build places, refuses and plans.

The bf16 build runs for real here through `nemotron-build build` (the TEST DOUBLE of TensorRT-LLM
supplies the package's presence and version); the FP8 build's ModelOpt calls are only planned
(their arguments are checked against ModelOpt's signatures in test_trtllm_contract.py).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine_build.backends.base import BackendError, BuildJob
from engine_build.backends.registry import select_backend
from engine_build.backends.trtllm import remote_code_files
from engine_build.backends.trtllm_pytorch import (
    CALIBRATION_LOOP,
    ENGINE_FORMAT,
    MODEL,
    calibration_texts,
    fp8_calls,
    merged_quant_config,
    placed_files,
)
from engine_build.checkpoint import Checkpoint
from engine_build.cli import main
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from engine_build.synthetic import write_synthetic_checkpoint
from tests.service.trtllm_engine import REMOTE_CONFIG_FILES, publish_like_nvidia


@pytest.fixture
def published(tmp_path) -> Path:
    return publish_like_nvidia(write_synthetic_checkpoint(tmp_path / "ckpt"))


def _build(*extra: str, checkpoint: Path, repo: Path) -> int:
    return main(
        ["build", "--profile", "h100x2", "--backend", "tensorrt-llm-pytorch",
         "--checkpoint", str(checkpoint), "--repo", str(repo), *extra]
    )  # fmt: skip


def test_nemotron_build_places_the_checkpoint_as_the_pytorch_flow_loads_it(
    double, published, tmp_path, capsys
):
    for path in published.iterdir():
        path.chmod(0o400)  # a read-only checkpoint (a model volume mounted read-only)
    assert _build("--precision", "bf16", checkpoint=published, repo=tmp_path / "repo") == 0
    assert "tensorrt-llm-pytorch" in capsys.readouterr().out
    (entry,) = EngineRepository(tmp_path / "repo").entries()
    key = entry.key
    assert (key.backend, key.backend_version, key.precision) == (
        "tensorrt-llm-pytorch", double.__version__, "bf16"
    )  # fmt: skip
    ours = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    expected = sorted([*ours, *REMOTE_CONFIG_FILES])
    assert placed_files(published) == expected
    for name in expected:
        placed = entry.directory / name
        assert placed.read_bytes() == (published / name).read_bytes()
        # Copies, not links: the repository's own files; the checkpoint's are left as they were.
        assert os.stat(placed).st_ino != os.stat(published / name).st_ino
        assert stat.S_IMODE(os.stat(published / name).st_mode) == 0o400
    manifest = json.loads((entry.directory / "nemotron-engine.json").read_text())
    assert manifest == {
        "format": ENGINE_FORMAT,
        "flow": "pytorch",
        "profile": "h100x2",
        "tensor_parallel": 2,
        "precision": {"weights": "bf16", "kv_cache": "bf16"},
        "tensorrt_llm_version": double.__version__,
    }
    # The repository hashed what was placed: selection verifies it like any engine.
    assert not EngineRepository(tmp_path / "repo").damage(entry)


def test_the_backend_is_refused_without_tensorrt_llm_naming_what_to_do(published, tmp_path, capsys):
    assert _build("--precision", "bf16", checkpoint=published, repo=tmp_path / "repo") == 2
    err = capsys.readouterr().err
    assert "'tensorrt-llm-pytorch' was requested but is not installed here" in err
    assert "--backend torch" in err


def test_a_checkpoint_without_its_remote_config_code_is_refused_before_any_work(
    double, published, tmp_path, capsys
):
    (published / "block_config.py").unlink()
    assert _build("--precision", "bf16", checkpoint=published, repo=tmp_path / "repo") == 2
    err = capsys.readouterr().err
    assert "block_config.py is missing" in err and "trust_remote_code" in err
    assert not list(EngineRepository(tmp_path / "repo").entries())
    # The TensorRT flow reads the config the same way, and refuses the same way.
    main(["build", "--profile", "h100x2", "--precision", "bf16", "--backend", "tensorrt-llm",
          "--checkpoint", str(published), "--repo", str(tmp_path / "repo")])  # fmt: skip
    assert "block_config.py is missing" in capsys.readouterr().err
    bare = write_synthetic_checkpoint(tmp_path / "bare")  # our own imports carry no auto_map
    bf16, fp8 = (load_profiles().get("h100x2").precision(name) for name in ("bf16", "fp8"))
    with pytest.raises(BackendError, match="no auto_map.AutoConfig"):
        remote_code_files(bare, bf16)
    (published / "block_config.py").write_text(REMOTE_CONFIG_FILES["block_config.py"])
    assert remote_code_files(published, bf16) == ["configuration_decilm.py", "block_config.py"]
    # FP8 calibration loads the whole model: its modeling code must be there too.
    with pytest.raises(BackendError, match=r"modeling_decilm.py is missing \(needed by config"):
        remote_code_files(published, fp8)


def test_fp8_builds_are_refused_without_modelopt_before_any_work(double, published, tmp_path):
    profile = load_profiles().get("h100x2")
    for name in ("tensorrt-llm", "tensorrt-llm-pytorch"):
        backend = select_backend(name, profile)
        with pytest.raises(BackendError, match="NVIDIA ModelOpt .* not installed here"):
            backend.check(profile, profile.precision("fp8"), "/data/calibration")
        backend.check(profile, profile.precision("bf16"), None)  # bf16 needs no ModelOpt


def test_fp8_needs_calibration_data_and_fp32_is_refused(double, published, tmp_path, capsys):
    assert _build("--precision", "fp8", checkpoint=published, repo=tmp_path / "repo") == 2
    assert "need calibration text: pass --calibration-dataset" in capsys.readouterr().err
    profile = load_profiles().get("h100x2")
    backend = select_backend("tensorrt-llm-pytorch", profile)
    fp32 = SimpleNamespace(name="fp32", weights=SimpleNamespace(value="fp32"))
    with pytest.raises(BackendError, match="builds bf16 or fp8 engines, not fp32"):
        backend.check(profile, fp32, None)


def test_auto_picks_the_profiles_flow_where_tensorrt_llm_is_installed(double, tmp_path):
    (tmp_path / "p.yaml").write_text(
        (Path(__file__).parents[2] / "engine_build" / "profiles.yaml")
        .read_text()
        .replace("profiles:\n  a100x4:", "profiles:\n  mine:\n    backend: tensorrt-llm-pytorch", 1)
        .split("\n  a100x8:")[0]
    )
    profiles = load_profiles([tmp_path / "p.yaml"])
    assert select_backend("auto", profiles.get("mine")).name == "tensorrt-llm-pytorch"
    assert select_backend("auto", profiles.get("h100x2")).name == "tensorrt-llm"
    assert select_backend("auto", profiles.get("cpu")).name == "torch"


def test_the_fp8_build_plans_load_quantize_and_export(published, tmp_path):
    profile = load_profiles().get("h100x2")
    job = BuildJob(Checkpoint.open(published), profile, profile.precision("fp8"), "/data/calib")
    load, quantize, export = fp8_calls(job, tmp_path / "out")
    assert load.function == "transformers.AutoModelForCausalLM.from_pretrained"
    assert load.kwargs["pretrained_model_name_or_path"] == str(published)
    assert load.kwargs["trust_remote_code"] is True
    assert quantize.kwargs == {
        "model": MODEL,
        "config": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),  # h100x2's fp8 has an fp8 KV cache
        "forward_loop": CALIBRATION_LOOP,
    }
    assert export.kwargs == {"model": MODEL, "export_dir": str(tmp_path / "out")}
    no_data = BuildJob(job.checkpoint, profile, job.precision, None)
    with pytest.raises(BackendError, match="--calibration-dataset"):
        fp8_calls(no_data, tmp_path / "out")


def test_fp8_export_keeps_its_own_weights_and_configs(published, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for name in ("config.json", "hf_quant_config.json", "model-00001-of-00001.safetensors"):
        (export / name).write_text("{}")
    beside = placed_files(published, beside=export)
    assert beside == sorted(["tokenizer.json", "tokenizer_config.json", *REMOTE_CONFIG_FILES])


def test_modelopt_configs_merge_in_both_layouts():
    kv = {"quant_cfg": {"*[kv]_bmm_quantizer": {"num_bits": (4, 3)}}}
    old = SimpleNamespace(
        FP8_DEFAULT_CFG={"quant_cfg": {"*weight_quantizer": {}}, "algorithm": "max"},
        FP8_KV_CFG=kv,
    )
    merged = merged_quant_config(old, ("FP8_DEFAULT_CFG", "FP8_KV_CFG"))
    assert set(merged["quant_cfg"]) == {"*weight_quantizer", "*[kv]_bmm_quantizer"}
    assert "*[kv]_bmm_quantizer" not in old.FP8_DEFAULT_CFG["quant_cfg"]  # a copy, not in place

    def helper(config, extra):
        return {**config, "quant_cfg": [*config["quant_cfg"], extra]}

    new = SimpleNamespace(
        FP8_DEFAULT_CFG={"quant_cfg": [{"quantizer_name": "*weight_quantizer"}]},
        FP8_KV_CFG=kv,
        update_quant_cfg_with_kv_cache_quant=helper,
    )
    merged = merged_quant_config(new, ("FP8_DEFAULT_CFG", "FP8_KV_CFG"))
    assert merged["quant_cfg"][-1] == kv["quant_cfg"]
    assert merged_quant_config(new, ("FP8_DEFAULT_CFG",)) == new.FP8_DEFAULT_CFG


def test_calibration_text_comes_from_jsonl_txt_or_a_directory(tmp_path):
    data = tmp_path / "calib"
    data.mkdir()
    (data / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    (data / "b.txt").write_text("three\n\nfour\n")
    (data / "notes.md").write_text("ignored")
    assert calibration_texts(data) == ["one", "two", "three", "four"]
    assert calibration_texts(data, limit=3) == ["one", "two", "three"]
    assert calibration_texts(data / "b.txt") == ["three", "four"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"prompt": "no text"}\n')
    with pytest.raises(BackendError, match=r"bad.jsonl:2: no string 'text' field"):
        calibration_texts(tmp_path / "bad.jsonl")
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(BackendError, match=r"must be one of \['.jsonl', '.txt'\]"):
        calibration_texts(tmp_path / "c.csv")
    with pytest.raises(BackendError, match="not found"):
        calibration_texts(tmp_path / "missing")


def test_nemotron_build_plan_accepts_the_pytorch_flow_for_gpu_profiles(reference_config, capsys):
    assert main(["plan", str(reference_config), "--backend", "tensorrt-llm-pytorch", "--json"]) == 0
    plans = {plan["profile"]: plan for plan in json.loads(capsys.readouterr().out)}
    for name in ("a100x4", "a100x8", "h100x2"):
        assert plans[name]["backend"] == "tensorrt-llm-pytorch" and plans[name]["feasible"]
    # TensorRT-LLM keeps FP8 weights as FP8 (torch dequantizes them): half the bytes.
    assert plans["h100x2"]["precision"] == "fp8"
    assert plans["h100x2"]["weight_bytes_per_device"] < 30e9
    assert "needs NVIDIA GPUs" in " ".join(plans["cpu"]["reasons"])


def test_an_fp8_build_keeps_the_export_and_adds_the_checkpoints_other_files(
    double, published, tmp_path, monkeypatch
):
    """The FP8 branch of `build`, ModelOpt's part replaced by a stand-in that writes what
    `export_hf_checkpoint` writes (its run needs CUDA: not here)."""
    from engine_build.backends import trtllm, trtllm_pytorch

    def export(job, out_dir):
        (out_dir / "config.json").write_text('{"quantization_config": {"quant_method": "fp8"}}')
        (out_dir / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')
        (out_dir / "model.safetensors").write_bytes(b"fp8 weights")

    (published / "modeling_decilm.py").write_text("from .block_config import BlockConfig\n")
    monkeypatch.setattr(trtllm, "require_modelopt", lambda precision: None)
    monkeypatch.setattr(trtllm_pytorch, "_quantize_fp8", export)
    calibration = tmp_path / "calibration.txt"
    calibration.write_text("The capital of France is Paris.\n")
    code = _build(
        "--precision", "fp8", "--calibration-dataset", str(calibration),
        checkpoint=published, repo=tmp_path / "repo",
    )  # fmt: skip
    assert code == 0
    (entry,) = EngineRepository(tmp_path / "repo").entries()
    files = {p.name: p for p in entry.directory.iterdir()}
    assert files["model.safetensors"].read_bytes() == b"fp8 weights"  # the export's, not bf16
    assert "quantization_config" in files["config.json"].read_text()
    assert "hf_quant_config.json" in files
    for name in ("tokenizer.json", "configuration_decilm.py", "modeling_decilm.py"):
        assert files[name].read_bytes() == (published / name).read_bytes()
    manifest = json.loads(files["nemotron-engine.json"].read_text())
    assert manifest["precision"] == {"weights": "fp8", "kv_cache": "fp8"}
