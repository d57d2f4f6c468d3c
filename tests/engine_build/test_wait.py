"""`nemotron-build wait`: what the chart's server pods run until the build Job's engine is there."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine_build.build import BuildRequest, build_engine
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from engine_build.synthetic import write_synthetic_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("wait") / "ckpt")


def _wait(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine_build", "wait", "--interval", "0.2", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _build(checkpoint, repo, precision=None) -> None:
    request = BuildRequest(checkpoint, load_profiles().get("cpu"), precision=precision)
    build_engine(request, EngineRepository(repo))


def test_wait_blocks_until_the_engine_is_committed_then_prints_it(checkpoint, tmp_path):
    repo = tmp_path / "not-created-yet"
    waiting = _wait("--profile", "cpu", "--repo", str(repo), "--backend", "torch")
    with pytest.raises(subprocess.TimeoutExpired):
        waiting.communicate(timeout=3)  # nothing there yet: still waiting
    _build(checkpoint, repo)
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, err
    entry = EngineRepository(repo).entries()[0]
    assert out.strip() == f"torch-cpu-bf16-tp1 ({entry.engine_id}) ready: {entry.directory}"


def test_wait_ignores_engines_of_another_precision_and_times_out_saying_why(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    _build(checkpoint, repo, precision="fp32")
    waiting = _wait(
        "--profile", "cpu", "--precision", "bf16", "--repo", str(repo), "--timeout", "1"
    )
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 2 and out == ""
    assert "no engine for profile cpu on cpu, precision bf16 appeared" in err
    assert "torch-cpu-fp32-tp1" in err and "precision fp32, not bf16" in err
    assert "nemotron-build build --profile cpu --precision bf16" in err


def test_wait_does_not_accept_an_engine_with_missing_files(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    _build(checkpoint, repo)
    entry = EngineRepository(repo).entries()[0]
    (entry.directory / "engine.json").unlink()
    waiting = _wait("--profile", "cpu", "--repo", str(repo), "--timeout", "0")
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 2
    assert "file engine.json is missing" in err


def test_wait_refuses_an_unknown_profile_with_the_valid_ones(tmp_path):
    waiting = _wait("--profile", "h200x3", "--repo", str(tmp_path), "--timeout", "0")
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 2
    assert "unknown profile 'h200x3'" in err and "a100x4" in err
