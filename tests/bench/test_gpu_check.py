"""bench/gpu_check.py on the CPU: every part's code path at small sizes, the report, the exit code.

The CUDA parts (the runtime, the slice and the server on a GPU) run only where torch sees a GPU;
elsewhere that test is skipped saying so. tools/gpu_check.sh itself runs here with `--device cpu
--tiny`, which checks the code paths and the report, not any GPU figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from engine_build.graph import ModelGraph
from engine_build.model import NemotronModel
from engine_build.synthetic import write_synthetic_checkpoint
from service.startup.selection import StartupOptions, resolve_engine
from tests.conftest import REFERENCE_49B, REPO_ROOT

SCRIPT = REPO_ROOT / "tools" / "gpu_check.sh"
# One compute thread: the CPU parts run beside other work (two threads on two busy cores made
# the embedded part ten times slower through OpenMP spinning).
TINY = ["--device", "cpu", "--tiny", "--threads", "1", "--context", "64", "--steps", "10"]


def test_prompts_are_the_parity_tests_prompts():
    from tests.parity import test_transformers_parity as parity
    from tests.service.server import test_http_api as http_api

    http, chat = http_api.PROMPTS, parity.PROMPTS
    assert http == gpu_check.TEXT_PROMPTS and len(http) == 10
    assert chat == gpu_check.CHAT_PROMPTS


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 4.8),
        ("NVIDIA H200 NVL", 4.8),
        ("NVIDIA H100 80GB HBM3", 3.35),
        ("NVIDIA H100 NVL", 3.9),
        ("NVIDIA H100 PCIe", 2.0),
        ("NVIDIA A100-SXM4-80GB", 2.039),
        ("NVIDIA A100 80GB PCIe", 1.935),
        ("NVIDIA A100-SXM4-40GB", 1.555),
        ("NVIDIA GH200 480GB", None),  # HBM3 or HBM3e: the name does not say
        ("Tesla T4", None),
    ],
)
def test_peak_bandwidth_by_device_name(name, peak):
    found, source = gpu_check.peak_bandwidth(name)
    assert found == peak
    assert source


def test_agreement_counts_tokens_before_the_first_divergence():
    reference = [[1, 2, 3, 4], [5, 6, 7, 8]]
    found = gpu_check.agreement(reference, [[1, 2, 9, 4], [5, 6, 7, 8]])
    assert found["identical_prompts"] == 1 and found["prompts"] == 2
    assert found["tokens_before_divergence"] == 6 and found["rate"] == 0.75
    assert found["first_divergence"] == [2, None]
    assert gpu_check.agreement(reference, [[1, 2, 3], [5, 6, 7, 8]])["first_divergence"] == [
        3,
        None,
    ]


def test_the_slice_has_the_real_49b_widths():
    reference = json.loads(REFERENCE_49B.read_text())
    graph = ModelGraph.from_hf_config(gpu_check.slice_config(reference, (0, 8)))
    assert (graph.hidden_size, graph.num_attention_heads, graph.head_dim) == (8192, 64, 128)
    assert graph.kv_heads_per_layer == (8, 8, 8, 8, 8, 8, 0, 0)
    assert [b.ffn.intermediate_size for b in graph.blocks] == [14336] + [28672] * 5 + [14336] * 2
    assert graph.vocab_size == 128256
    with torch.device("meta"):
        model = NemotronModel(graph).to(torch.bfloat16)
    read = gpu_check.step_bytes(model, graph, context=512)
    assert 13.0e9 < read["matrices"] < 13.2e9  # 5.49 G layer weights + 1.05 G LM head, bf16
    assert read["kv_cache"] == 512 * 6 * 2 * 8 * 128 * 2


def test_the_written_gpu_profile_makes_the_server_choose_cuda(tmp_path):
    """Up to opening the engine: the profile validates, the engine builds, the device is cuda."""
    checkpoint = write_synthetic_checkpoint(tmp_path / "checkpoint")
    profiles = tmp_path / "profiles.yaml"
    profiles.write_text(gpu_check.gpu_profile_yaml("NVIDIA H200", "9.0", 143.8))
    options = StartupOptions(
        cache_dir=tmp_path / "cache",
        profile=gpu_check.PROFILE_NAME,
        checkpoint=checkpoint,
        precision="bf16",
        backend="torch",
        build_if_missing=True,
        profile_files=(profiles,),
    )
    choice = resolve_engine(options, {})
    assert choice.device == "cuda" and choice.built
    assert choice.entry.key.target == "sm90" and choice.entry.key.backend == "torch"


def run_script(out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *flags],
        capture_output=True,
        text=True,
        timeout=600,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
        check=False,
    )


def test_the_script_runs_every_part_on_the_cpu_and_writes_the_report(tmp_path):
    done = run_script(tmp_path / "out", *TINY)
    out = tmp_path / "out"
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "report.json").read_text())
    parts = {p["part"]: p for p in report["parts"]}
    assert report["overall"] == "PASS" and list(parts) == list(gpu_check.PARTS)
    assert all(p["status"] == "pass" for p in parts.values()), parts
    embedded = parts["embedded"]["details"]
    assert embedded["prompts"] == 16 and embedded["fp32_device_vs_fp32_cpu"]["rate"] == 1.0
    assert 0 <= embedded["bf16_device_vs_fp32_cpu"]["rate"] <= 1
    assert all(len(tokens) == 32 for tokens in embedded["tokens"]["bf16_device"])
    measures = [row["measure"] for row in parts["slice"]["details"]["rows"]]
    assert measures[:3] == [
        "bf16 decode step",
        "bf16 GEMV stream",
        "fp8 engine decode step (served as bf16)",
    ]
    server = parts["server"]["details"]
    assert server["model_info"]["profile"] == "cpu" and server["chat"]["answer"]
    assert server["server_exit"] == 0  # stopped by SIGTERM, cleanly
    text = (out / "report.md").read_text()
    assert text.startswith("# GPU check: PASS") and "| slice | pass |" in text
    assert "code paths only" in text


def test_a_failing_or_overrunning_part_fails_the_run(tmp_path):
    # A part past its budget is killed and reported; the parts after a failed preflight are
    # not run; the exit code says so.
    done = run_script(tmp_path / "out", *TINY, "--budget-scale", "0.001")
    assert done.returncode == 1, done.stdout + done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    statuses = {p["part"]: (p["status"], p["summary"]) for p in report["parts"]}
    assert statuses["preflight"][0] == "fail" and "budget" in statuses["preflight"][1]
    assert statuses["server"] == ("skip", "not run: the preflight failed")
    assert (tmp_path / "out" / "report.md").read_text().startswith("# GPU check: FAIL")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_the_gpu_check_fails_in_its_preflight(tmp_path):
    done = run_script(tmp_path / "out", "--parts", "preflight")
    assert done.returncode == 1
    (preflight, *_) = json.loads((tmp_path / "out" / "report.json").read_text())["parts"]
    assert "CUDA is not available" in preflight["summary"]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA PyTorch and an NVIDIA GPU: the runtime, the slice and the server on the "
    "GPU run only on a GPU machine (bash tools/gpu_check.sh OUTDIR)",
)
def test_the_cuda_parts_at_small_sizes(tmp_path):
    done = run_script(tmp_path / "out", "--device", "cuda", "--tiny", "--context", "64")
    assert done.returncode == 0, done.stdout + done.stderr
