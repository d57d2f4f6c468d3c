"""Kernels chosen by measurement on this machine, cached per machine identity."""

from __future__ import annotations

import json

import pytest
import torch

from engine_build.build import BuildRequest, build_engine
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from engine_build.synthetic import synthetic_config, write_synthetic_checkpoint
from service.runtime import kernels
from service.runtime.kernels import (
    ChosenKernels,
    apply_measured_kernels,
    bucket_of,
    choices_file,
    machine_identity,
)
from service.runtime.loader import load_rank_model
from service.runtime.memory import MemoryBudget
from service.server.flags import parse_serve_config


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kernels")
    checkpoint = write_synthetic_checkpoint(root / "ckpt", synthetic_config())
    repository = EngineRepository(root / "repo")
    cpu = load_profiles().get("cpu")
    return {
        precision: build_engine(BuildRequest(checkpoint, cpu, precision), repository).entry
        for precision in ("bf16", "int4", "fp32")
    }


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([[1, 5, 9, 200, 33, 7]])).float()


def test_rows_map_to_the_nearest_measured_count():
    assert [bucket_of(r) for r in (1, 2, 3, 6, 7, 12, 40, 500)] == [1, 4, 4, 4, 4, 16, 64, 64]


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
    assert {s.split(":")[0] for s in signatures} == {"int4", "bf16"}  # body, bf16 lm_head
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
            assert set(table.values()) == {"int4"}
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
