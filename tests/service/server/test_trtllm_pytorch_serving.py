"""Serving a TensorRT-LLM PyTorch-flow engine end to end, against the TEST DOUBLE of TensorRT-LLM.

The engine is built by `nemotron-build build --backend tensorrt-llm-pytorch` (bf16: the
checkpoint placed as the flow loads it), and `nemotron-serve --backend tensorrt-llm-pytorch`
opens it with `tensorrt_llm.LLM`, the double standing in for the package and checking every
argument against TorchLlmArgs and the LLM's signature in the contract fixture. What the real
PyTorch flow does with them (CUDA, its NemotronNAS model, tensor parallelism) has not run here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from nemotron.v1 import generation_pb2 as pb

from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from engine_build.synthetic import write_synthetic_checkpoint
from service.runtime.factory import open_engine
from service.runtime.interface import FinishReason, GenerationRequest
from service.runtime.options import RequestOptions
from service.runtime.trtllm_runtime import PYTORCH_LLM_CLASS, TensorRTLLMRuntime
from tests.service.trtllm_engine import (
    double_env,
    holding,
    publish_like_nvidia,
    seen_events,
    serving_with_double,
)

ANSWER = "Hello from the TensorRT-LLM test double."  # the double's (see _double.py)
HI = [pb.ChatMessage(role=pb.ROLE_USER, content="Hi")]


def _build_engine(root: Path, env: dict[str, str]) -> Path:
    """`nemotron-build build` in a subprocess that imports the double as tensorrt_llm."""
    checkpoint = publish_like_nvidia(write_synthetic_checkpoint(root / "ckpt"))
    repo = root / "repo"
    subprocess.run(
        [sys.executable, "-m", "engine_build", "build", "--profile", "h100x2",
         "--precision", "bf16", "--backend", "tensorrt-llm-pytorch",
         "--checkpoint", str(checkpoint), "--repo", str(repo)],
        env={**os.environ, **env}, check=True, capture_output=True, cwd=root,
    )  # fmt: skip
    return repo


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("trtllm-pytorch-serving")
    events = root / "double-events.jsonl"
    env = double_env(events)
    repo = _build_engine(root, env)
    (entry,) = EngineRepository(repo).entries()
    with serving_with_double(root, "tensorrt-llm-pytorch", repo, events) as server:
        yield server, entry, events


def test_the_server_opens_the_pytorch_flow_engine_with_the_profiles_limits(served):
    server, entry, events = served
    info = server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.backend, info.profile, info.tensor_parallel) == (
        "tensorrt-llm-pytorch",
        "h100x2",
        2,
    )
    assert (info.engine_id, info.precision) == (entry.engine_id, "bf16")
    (llm,) = [e for e in seen_events(events) if e["event"] == "llm"]
    limits = load_profiles().get("h100x2").limits
    kwargs = llm["kwargs"]
    assert kwargs["model"] == kwargs["tokenizer"] == str(entry.directory)
    assert kwargs["trust_remote_code"] is True and kwargs["tensor_parallel_size"] == 2
    assert (kwargs["max_batch_size"], kwargs["max_num_tokens"], kwargs["max_seq_len"]) == (
        limits.max_batch_size, limits.max_num_tokens, limits.max_seq_len
    )  # fmt: skip
    assert kwargs["max_input_len"] == limits.max_seq_len
    assert kwargs["enable_chunked_prefill"] is True and kwargs["enable_iter_perf_stats"] is True
    assert "gather_generation_logits" not in kwargs  # TensorRT-engine only
    assert kwargs["kv_cache_config"] == {
        "free_gpu_memory_fraction": limits.kv_cache_free_fraction,
        "enable_block_reuse": True,
        "dtype": "auto",
    }
    assert llm["world_size"] == 2


def test_a_streamed_chat_and_stats_during_it(served):
    server, _, events = served
    with holding(events):  # in flight while the stats are read
        call = server.api.ChatStream(pb.ChatStreamRequest(messages=HI), timeout=60)
        first = next(call)
        during = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)
    rest = list(call)
    assert first.content + "".join(m.content for m in rest) == ANSWER
    assert rest[-1].finish_reason == pb.FINISH_REASON_STOP
    # The PyTorch flow keeps iteration stats only with enable_iter_perf_stats (the double too).
    assert during.running_requests == 1 and during.kv_blocks_total == 1024


def test_logprobs_need_no_gathered_logits_in_this_flow(double, tmp_path):
    env_events = tmp_path / "events.jsonl"
    repo = _build_engine(tmp_path, double_env(env_events))
    (entry,) = EngineRepository(repo).entries()
    engine = open_engine(entry, load_profiles().get("h100x2").limits)
    assert isinstance(engine, TensorRTLLMRuntime) and engine.llm_class == PYTORCH_LLM_CLASS
    request = GenerationRequest("lp", (72, 105), RequestOptions(max_new_tokens=3, logprobs=0))

    async def scenario():
        await engine.start()
        events = [event async for event in engine.generate(request)]
        await engine.shutdown()
        return events

    events = asyncio.run(scenario())
    assert "".join(e.text for e in events) == ANSWER[:3]
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert [lp.logprob for e in events for lp in e.logprobs] == [double._double.CHOSEN_LOGPROB] * 3
