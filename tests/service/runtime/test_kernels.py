"""Kernels chosen by measurement on this machine, cached per machine identity."""

from __future__ import annotations

import json

import pytest
import torch

from engine_build.build import BuildRequest, build_engine
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from engine_build.synthetic import synthetic_config, write_synthetic_checkpoint
from service.runtime import kernels, native
from service.runtime.kernels import (
    ChosenKernels,
    apply_measured_kernels,
    bucket_of,
    choices_file,
    machine_identity,
)
from service.runtime.loader import load_rank_model
from service.runtime.memory import MemoryBudget
from service.runtime.quantized import Int4Linear
from service.server.flags import parse_serve_config


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kernels")
    checkpoint = write_synthetic_checkpoint(root / "ckpt", synthetic_config())
    repository = EngineRepository(root / "repo")
    cpu = load_profiles().get("cpu")
    return {
        precision: build_engine(BuildRequest(checkpoint, cpu, precision), repository).entry
        for precision in ("bf16", "int8", "int4", "fp32")
    }


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([[1, 5, 9, 200, 33, 7]])).float()


def test_rows_map_to_the_nearest_measured_count():
    assert [bucket_of(r) for r in (1, 2, 3, 6, 7, 12, 40, 500)] == [1, 4, 4, 4, 4, 16, 64, 64]
    assert bucket_of(0) == 4  # no rows is not one row: torch.mv cannot take it


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_the_bf16_copy_is_the_stored_matrix(engines, precision, tmp_path):
    model = load_rank_model(engines[precision].directory)
    for matrix in kernels.matrices(model).values():
        if matrix.fmt != precision:
            continue
        x = torch.randn(3, matrix.in_features).to(torch.bfloat16)
        direct = matrix.module(x).float()
        through_copy = torch.nn.functional.linear(x, matrix.dense()).float()
        scale = float(direct.abs().max())
        assert float((direct - through_copy).abs().max()) <= 0.02 * scale


@pytest.mark.parametrize("kernel", ["linear", "mv"])
def test_served_through_bf16_copies_the_model_computes_the_same(
    engines, monkeypatch, tmp_path, kernel
):
    """Force the copies (a machine where int4 always wins would never exercise them)."""

    def prefer(candidates, rows, in_features, dtype):
        return {name: {kernel: 0.4, "linear": 0.5}.get(name, 1.0) for name in candidates}

    monkeypatch.setattr(kernels, "time_kernels", prefer)
    monkeypatch.setattr(kernels, "choices_file", lambda d, i: tmp_path / f"{kernel}.json")
    directory = engines["int4"].directory
    before = _logits(load_rank_model(directory))
    model = load_rank_model(directory)
    record = apply_measured_kernels(model, directory, threads=1)
    assert {t["1"] for t in record["choices"].values()} == {kernel}
    wrapped = [m for m in model.modules() if isinstance(m, ChosenKernels)]
    assert all(hasattr(m, "dense") for m in wrapped if isinstance(m.inner, Int4Linear))
    after = _logits(model)  # 6 rows: the batched choice (a copy through F.linear)
    assert float((after - before).abs().max()) <= 0.05 * float(before.abs().max())
    with torch.inference_mode():  # one row (mv or F.linear on the copy), and no rows at all
        one = model.lm_head(torch.randn(1, model.lm_head.in_features).to(torch.bfloat16))
        none = model.lm_head(torch.randn(0, model.lm_head.in_features).to(torch.bfloat16))
    assert one.shape == (1, 256) and none.shape == (0, 256)


def test_a_cached_record_missing_a_matrix_or_naming_an_unknown_kernel_is_measured_again(
    engines, tmp_path, monkeypatch
):
    monkeypatch.setattr(kernels, "choices_file", lambda d, i: tmp_path / "c.json")
    directory = engines["int4"].directory
    first = apply_measured_kernels(load_rank_model(directory), directory, threads=1)
    saved = json.loads((tmp_path / "c.json").read_text())
    signature = next(iter(saved["choices"]))
    for damage in ("missing", "unknown"):
        edited = json.loads(json.dumps(saved))
        if damage == "missing":
            del edited["choices"][signature]
        else:
            edited["choices"][signature]["4"] = "fastest"
        (tmp_path / "c.json").write_text(json.dumps(edited))
        again = apply_measured_kernels(load_rank_model(directory), directory, threads=1)
        assert again["measured"] is True
    assert first["measured"] is True


def test_a_read_only_repository_keeps_the_choices_in_the_cache(engines, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "_writable", lambda directory: False)
    directory = engines["bf16"].directory
    path = choices_file(directory, machine_identity(7))
    assert path.parent == tmp_path / "cache" / "kernel-choices"


def test_every_matrix_gets_its_measured_kernels_and_the_model_computes_the_same(engines):
    entry = engines["int4"]
    before = _logits(load_rank_model(entry.directory))
    model = load_rank_model(entry.directory)
    count = len(kernels.matrices(model))
    record = apply_measured_kernels(model, entry.directory, threads=2)
    assert record["measured"] is True
    wrapped = [m for m in model.modules() if isinstance(m, ChosenKernels)]
    assert count > 0 and len(wrapped) == count
    signatures = set(record["choices"])
    assert {s.split(":")[0] for s in signatures} == {"int4", "int8"}  # body, int8 lm_head
    for table in record["choices"].values():
        assert set(table) == {"1", "4", "16", "64"}
        assert all(table[rows] != "mv" for rows in ("4", "16", "64"))
    after = _logits(model)
    assert float((after - before).abs().max()) <= 0.05 * float(before.abs().max())


def test_the_choice_is_cached_with_the_machine_identity_and_remeasured_elsewhere(engines):
    entry = engines["bf16"]
    first = apply_measured_kernels(load_rank_model(entry.directory), entry.directory, threads=1)
    path = choices_file(entry.directory, machine_identity(1))
    saved = json.loads(path.read_text())
    assert saved["machine"] == machine_identity(1) and saved["choices"] == first["choices"]
    again = apply_measured_kernels(load_rank_model(entry.directory), entry.directory, threads=1)
    assert again["measured"] is False and again["choices"] == first["choices"]
    other = apply_measured_kernels(load_rank_model(entry.directory), entry.directory, threads=3)
    assert other["measured"] is True  # another thread count is another machine
    saved["machine"]["cpu"] = "another CPU"
    path.write_text(json.dumps(saved))
    assert apply_measured_kernels(load_rank_model(entry.directory), entry.directory, threads=1)[
        "measured"
    ]


@pytest.mark.parametrize("fastest", ["mv", "linear"])
def test_the_kernel_is_whichever_measured_fastest_not_a_fixed_one(
    engines, monkeypatch, tmp_path, fastest
):
    def fake_time(candidates, rows, in_features, dtype):
        return {name: 0.5 if name == fastest else 1.0 for name in candidates}

    monkeypatch.setattr(kernels, "time_kernels", fake_time)
    monkeypatch.setattr(kernels, "choices_file", lambda d, i: tmp_path / f"{fastest}.json")
    model = load_rank_model(engines["bf16"].directory)
    record = apply_measured_kernels(model, engines["bf16"].directory, threads=1)
    assert all(table["1"] == fastest for table in record["choices"].values())


def test_bf16_copies_of_quantized_matrices_only_within_the_memory_share(
    engines, monkeypatch, tmp_path
):
    monkeypatch.setattr(kernels, "host_budget", lambda: MemoryBudget(1000, "test", 1000))
    monkeypatch.setattr(kernels, "choices_file", lambda d, i: tmp_path / "small.json")
    model = load_rank_model(engines["int4"].directory)
    record = apply_measured_kernels(model, engines["int4"].directory, threads=1)
    assert record["allow_bf16_copies"] is False
    for signature, table in record["choices"].items():
        if signature.startswith("int4"):
            assert set(table.values()) <= {"int4", "int4-native"}
    assert not any(hasattr(m, "dense") for m in model.modules() if isinstance(m, ChosenKernels))


def test_fp32_engines_keep_one_kernel(engines):
    model = load_rank_model(engines["fp32"].directory)
    record = apply_measured_kernels(model, engines["fp32"].directory, threads=1)
    assert record["choices"] == {}
    assert not any(isinstance(m, ChosenKernels) for m in model.modules())


def test_the_server_flag_switches_measurement_off_and_names_the_allowed_values(capsys):
    assert parse_serve_config([], {}).measure_kernels is True
    assert parse_serve_config(["--kernel-choice", "fixed"], {}).measure_kernels is False
    assert parse_serve_config([], {"NEMOTRON_KERNEL_CHOICE": "fixed"}).measure_kernels is False
    with pytest.raises(SystemExit) as exit_info:
        parse_serve_config(["--kernel-choice", "fastest"], {})
    assert exit_info.value.code == 2
    assert "measure" in capsys.readouterr().err


def test_served_through_the_native_kernels_the_model_computes_the_same(
    engines, monkeypatch, tmp_path
):
    """Force the native kernels (where torch's win, the choice would never exercise them)."""
    assert native.load(), "the native kernels did not build here"

    def prefer(candidates, rows, in_features, dtype):
        assert any(name.endswith("-native") for name in candidates)
        return {name: 0.1 if name.endswith("-native") else 1.0 for name in candidates}

    measured = kernels.time_kernels
    monkeypatch.setattr(kernels, "time_kernels", prefer)
    monkeypatch.setattr(kernels, "choices_file", lambda d, i: tmp_path / "native.json")
    directory = engines["int4"].directory
    before = _logits(load_rank_model(directory))
    model = load_rank_model(directory)
    record = apply_measured_kernels(model, directory, threads=1)
    assert record["native_kernels"] == native.library_key() is not None
    for signature, table in record["choices"].items():
        assert set(table.values()) == {signature.partition(":")[0] + "-native"}
    inner = [m.inner for m in model.modules() if isinstance(m, ChosenKernels)]
    # torch's int4 layout is dropped once no chosen kernel reads it
    assert all(m.weight_int4.numel() == 0 for m in inner if isinstance(m, Int4Linear))
    after = _logits(model)
    assert float((after - before).abs().max()) <= 0.05 * float(before.abs().max())
    again = apply_measured_kernels(load_rank_model(directory), directory, threads=1)
    assert again["measured"] is False and again["choices"] == record["choices"]
    # other kernels (a changed source, compiler or torch builds another library): measured again
    monkeypatch.setattr(native, "_state", {"loaded": True, "library": "0123456789abcdef"})
    assert apply_measured_kernels(load_rank_model(directory), directory, threads=1)["measured"]
    monkeypatch.setattr(native, "_state", {"loaded": False})  # a machine without a compiler
    monkeypatch.setattr(kernels, "time_kernels", measured)
    assert apply_measured_kernels(load_rank_model(directory), directory, threads=1)["measured"]


def test_a_forced_kernel_serves_every_quantized_matrix_and_bad_names_list_the_allowed(engines):
    model = load_rank_model(engines["int4"].directory)
    kernels.force_kernels(model, "native")
    tables = [m.by_bucket for m in model.modules() if isinstance(m, ChosenKernels)]
    assert tables and all(len(t) == len(kernels.ROW_BUCKETS) for t in tables)
    with pytest.raises(ValueError, match="expected one of torch, native"):
        kernels.force_kernels(load_rank_model(engines["int4"].directory), "fastest")
