"""Tensor-parallel runtimes: workers give tp=1's greedy tokens; a dead worker is reported."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from engine_build.build import BuildRequest, build_engine
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from service.runtime.interface import EngineState, FinishReason, GenerationRequest, NotReadyError
from service.runtime.options import RequestOptions
from tests.service.runtime.conftest import collect, run_with_runtime, tokens_of

REQUESTS = [
    GenerationRequest(
        f"r{i}", tuple(range(3 + i, 20 + 3 * i)), RequestOptions(max_new_tokens=12, ignore_eos=True)
    )
    for i in range(6)
]


def _engine(checkpoint, profile, profiles_file, repo, precision="fp32"):
    profiles = load_profiles([profiles_file])
    request = BuildRequest(checkpoint, profiles.get(profile), precision=precision)
    return build_engine(request, EngineRepository(repo)).entry.directory


def _greedy_tokens(engine_dir, **options) -> list[list[int]]:
    async def body(runtime):
        results = await asyncio.gather(*(collect(runtime, r) for r in REQUESTS))
        return [tokens_of(events) for events in results]

    return run_with_runtime(engine_dir, body, **options)


def test_tp2_workers_give_the_tokens_of_tp1(synthetic_checkpoint, test_profiles_file, tmp_path):
    tp2 = _engine(synthetic_checkpoint, "cpu-tp2", test_profiles_file, tmp_path / "repo")
    tp1 = _engine(synthetic_checkpoint, "cpu", test_profiles_file, tmp_path / "repo")
    assert _greedy_tokens(tp2) == _greedy_tokens(tp1)


@pytest.mark.slow
def test_smollm2_tp3_workers_give_the_tokens_of_tp1(
    embedded_checkpoint, test_profiles_file, tmp_path
):
    tp3 = _engine(embedded_checkpoint, "cpu-tp3", test_profiles_file, tmp_path / "repo")
    tp1 = _engine(embedded_checkpoint, "cpu", test_profiles_file, tmp_path / "repo")
    assert _greedy_tokens(tp3) == _greedy_tokens(tp1)


async def _rest(stream) -> list:
    return [event async for event in stream]


def test_a_killed_worker_fails_pending_requests_and_readiness(
    synthetic_checkpoint, test_profiles_file, tmp_path
):
    tp2 = _engine(synthetic_checkpoint, "cpu-tp2", test_profiles_file, tmp_path / "repo")

    async def body(runtime):
        worker = runtime.core.executor.workers[0]
        request = GenerationRequest(
            "long", (5,) * 30, RequestOptions(max_new_tokens=900, ignore_eos=True)
        )
        stream = runtime.generate(request)
        first = await asyncio.wait_for(stream.__anext__(), timeout=120)  # both ranks stepping
        os.kill(worker.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        events = [first, *await asyncio.wait_for(_rest(stream), timeout=30)]
        ended_after = time.monotonic() - killed_at
        with pytest.raises(NotReadyError, match="worker rank 1"):
            runtime.generate(REQUESTS[0])
        return events[-1], runtime.state, ended_after, worker.pid

    last, state, ended_after, pid = run_with_runtime(tp2, body, tp_timeout_s=10)
    assert last.finish_reason is FinishReason.ERROR
    # The step that was running reports it ("engine step failed: ...") or, when the worker
    # monitor sees the death first, the monitor does: the same cause either way.
    assert last.error in (
        f"engine step failed: tensor-parallel worker rank 1 (pid {pid}) exited with code -9",
        f"tensor-parallel worker rank 1 (pid {pid}) exited with code -9",
    )
    assert state is EngineState.FAILED
    assert ended_after < 10
