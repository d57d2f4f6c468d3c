"""Serving a TensorRT-LLM engine end to end, against a TEST DOUBLE of TensorRT-LLM's LLM API.

TensorRT-LLM cannot be installed here, so `tests/doubles/trtllm_site/tensorrt_llm` stands in for
it: a server subprocess gets that directory on its PYTHONPATH (no other test does), selects the
committed tensorrt-llm engine, opens it with `TensorRTLLMRuntime`, and streams the double's
fixed answer. The double checks every argument against the contract fixture
(tests/data/trtllm_contract.json), so what passes here passes TensorRT-LLM's real signatures;
what the real package does with them (CUDA, the engine plans, MPI for tp=2) has still not run.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from nemotron.v1 import generation_pb2 as pb

from engine_build.profiles import load_profiles
from service.runtime.factory import open_engine
from service.runtime.interface import FinishReason, GenerationRequest
from service.runtime.options import RequestOptions
from service.runtime.trtllm_runtime import TensorRTLLMRuntime
from tests.service.server_process import wait_until
from tests.service.trtllm_engine import (
    DOUBLE_SITE,
    REPO_ROOT,
    commit_trtllm_engine,
    double_env,
    holding,
    seen_events,
    serving_with_double,
)

# The double's fixed answer (tests/doubles/trtllm_site/tensorrt_llm/_double.py: ANSWER); its
# byte tokenizer makes one token per character.
ANSWER = "Hello from the TensorRT-LLM test double."
HI = [pb.ChatMessage(role=pb.ROLE_USER, content="Hi")]


# -- the double on its own ------------------------------------------------------------------


def test_the_double_refuses_what_tensorrt_llm_would_refuse(double, tmp_path):
    from tensorrt_llm import SamplingParams
    from tensorrt_llm._tensorrt_engine import LLM
    from tensorrt_llm.llmapi import KvCacheConfig

    with pytest.raises(TypeError, match="unknown field 'foo'"):
        SamplingParams(foo=1)
    with pytest.raises(TypeError, match="unknown field 'free_memory_fraction'"):
        KvCacheConfig(free_memory_fraction=0.9)
    with pytest.raises(TypeError, match="unknown keyword 'kv_cache_free_fraction'"):
        LLM(model="/engines/x", kv_cache_free_fraction=0.9)
    with pytest.raises(TypeError, match="required parameter 'model' missing"):
        LLM(tokenizer="/engines/x")
    entry = commit_trtllm_engine(tmp_path / "repo")
    llm = LLM(str(entry.directory), tokenizer=str(entry.directory))  # positional model: allowed
    with pytest.raises(TypeError, match="unknown keyword 'prompt_token_ids'"):
        llm.generate_async(prompt_token_ids=[1, 2])
    with pytest.raises(TypeError, match="required parameter 'inputs' missing"):
        llm.generate_async(sampling_params=SamplingParams())
    with pytest.raises(ValueError, match="gather_generation_logits=True"):
        llm.generate_async([1, 2], SamplingParams(logprobs=1))
    with pytest.raises(TypeError, match="unknown keyword 'wait'"):
        llm.get_stats(wait=1)
    assert llm.get_stats(timeout=0) == []


def test_the_double_offers_only_what_the_contract_lists(double):
    from tensorrt_llm import _double

    contract = _double.CONTRACT["classes"]
    output = contract[_double.COMPLETION_OUTPUT]
    cls = _double.CompletionOutput
    assert set(cls.__slots__) == set(output["fields"]) | set(output["non_init_fields"])
    properties = {n for n in dir(cls) if isinstance(getattr(cls, n, None), property)}
    assert properties == set(output["properties"])
    result = contract[_double.GENERATION_RESULT]
    offered = {n for n in vars(_double.GenerationResult) if not n.startswith("_")}
    offered |= {n for n in ("__aiter__", "__anext__") if n in vars(_double.GenerationResult)}
    assert offered <= set(result["methods"]) | set(result["properties"])
    assert set(_double.Logprob.__slots__) == set(contract[_double.LOGPROB]["fields"])
    functions = _double.CONTRACT["functions"]
    methods = {n for n in vars(_double.LLM) if not n.startswith("_")}
    assert {f"{_double.LLM_NAME}.{m}" for m in methods} <= set(functions)


def _request(request_id: str, **options) -> GenerationRequest:
    return GenerationRequest(request_id, (72, 105), RequestOptions(**options))


async def _collect(engine, request):
    return [event async for event in engine.generate(request)]


def test_the_runtime_streams_cuts_at_max_tokens_gives_logprobs_and_aborts(double, tmp_path):
    from tensorrt_llm import _double

    entry = commit_trtllm_engine(tmp_path / "repo")
    engine = open_engine(entry, load_profiles().get("h100x2").limits)
    assert isinstance(engine, TensorRTLLMRuntime)

    async def scenario():
        await engine.start()
        whole = await _collect(engine, _request("whole", max_new_tokens=100))
        short = await _collect(engine, _request("short", max_new_tokens=5, logprobs=0))
        stream = engine.generate(_request("aborted", max_new_tokens=100))
        first = await anext(stream)
        assert engine.abort("aborted") and not engine.abort("unknown")
        rest = [event async for event in stream]
        stats = engine.stats()
        await engine.shutdown()
        return whole, short, [first, *rest], stats

    whole, short, aborted, stats = asyncio.run(scenario())
    assert "".join(e.text for e in whole) == ANSWER
    assert [len(e.token_ids) for e in whole] == [1] * len(ANSWER)
    assert whole[-1].finish_reason is FinishReason.STOP
    assert (whole[-1].usage.prompt_tokens, whole[-1].usage.completion_tokens) == (2, len(ANSWER))
    assert "".join(e.text for e in short) == ANSWER[:5]
    assert short[-1].finish_reason is FinishReason.LENGTH
    assert [lp.logprob for e in short for lp in e.logprobs] == [_double.CHOSEN_LOGPROB] * 5
    assert aborted[-1].finish_reason is FinishReason.ABORTED
    # Every last event carries timings: the chat layer reads them (it failed without).
    for last in (whole[-1], short[-1], aborted[-1]):
        assert 0 < last.timings.time_to_first_token_s <= last.timings.total_s
    assert sum(len(e.token_ids) for e in aborted) < len(ANSWER)
    assert stats.running == 0 and stats.kv_blocks_total == 1024 and stats.kv_block_size == 32
    events = _double.EVENTS
    assert [e["event"] for e in events if e["event"] in ("llm", "shutdown")] == ["llm", "shutdown"]
    sampling = [e["sampling_params"] for e in events if e["event"] == "generate_async"]
    assert sampling[0]["top_k"] == 1 and "temperature" not in sampling[0]  # greedy: top_k=1
    assert sampling[1] == sampling[1] | {"max_tokens": 5, "logprobs": 1}
    assert any(e["event"] == "abort" and not e["finished"] for e in events)


def test_a_stream_dropped_before_its_first_event_aborts_the_request(double, tmp_path):
    from tensorrt_llm import _double

    entry = commit_trtllm_engine(tmp_path / "repo")
    engine = open_engine(entry, load_profiles().get("h100x2").limits)

    async def scenario():
        await engine.start()
        stream = engine.generate(_request("dropped", max_new_tokens=100))
        del stream  # the client went away between admission and the first token
        gc.collect()
        closed = engine.generate(_request("closed", max_new_tokens=100))
        await closed.aclose()
        again = await _collect(engine, _request("dropped", max_new_tokens=3))  # id free again
        await engine.shutdown()
        return again

    again = asyncio.run(scenario())
    assert "".join(e.text for e in again) == ANSWER[:3]
    aborted = [e["request_id"] for e in _double.EVENTS if e["event"] == "abort"]
    submitted = [e["request_id"] for e in _double.EVENTS if e["event"] == "generate_async"]
    assert aborted[:2] == submitted[:2]  # both abandoned requests were aborted in TensorRT-LLM


# -- the real server ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `nemotron-serve` on a directory holding one tensorrt-llm h100x2 engine, the double
    standing in for TensorRT-LLM."""
    root = tmp_path_factory.mktemp("trtllm-serving")
    entry = commit_trtllm_engine(root / "repo")
    events = root / "double-events.jsonl"
    env = double_env(events)
    # The subprocess runs this checkout's code and the double (not an installed copy of either).
    probe = "import service, tensorrt_llm; print(service.__file__); print(tensorrt_llm.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
    ).stdout.split()
    assert Path(where[0]).is_relative_to(REPO_ROOT / "service"), where
    assert Path(where[1]).is_relative_to(DOUBLE_SITE), where
    with serving_with_double(root, "tensorrt-llm", root / "repo", events) as server:
        yield server, entry, events


def test_startup_selects_the_tensorrt_llm_engine_and_model_info_reports_it(served):
    server, entry, events = served
    info = server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert (info.backend, info.profile, info.tensor_parallel) == ("tensorrt-llm", "h100x2", 2)
    assert (info.engine_id, info.precision) == (entry.engine_id, "fp8")
    assert info.versions["tensorrt-llm"] == "1.2.1"
    (llm,) = [e for e in seen_events(events) if e["event"] == "llm"]
    limits = load_profiles().get("h100x2").limits
    assert llm["kwargs"]["model"] == llm["kwargs"]["tokenizer"] == str(entry.directory)
    assert llm["kwargs"]["gather_generation_logits"] is True
    assert llm["kwargs"]["kv_cache_config"] == {
        "free_gpu_memory_fraction": limits.kv_cache_free_fraction,
        "enable_block_reuse": True,
    }
    assert llm["world_size"] == 2
    selected = server.wait_for_log(lambda line: line["event"] == "engine_selected", "selection")
    assert selected[0]["id"] == entry.engine_id


def test_a_streamed_chat_returns_the_doubles_answer_and_usage(served):
    server, _, events = served
    request = pb.ChatStreamRequest(request_id="chat-1", messages=HI)
    stream = list(server.api.ChatStream(request, timeout=60))
    assert "".join(m.content for m in stream) == ANSWER
    assert stream[-1].finish_reason == pb.FINISH_REASON_STOP
    assert stream[-1].usage.completion_tokens == len(ANSWER)
    assert stream[-1].usage.prompt_tokens == len("<user>Hi\n<assistant>")  # byte tokenizer
    (sent,) = [e for e in seen_events(events) if e["event"] == "generate_async"]
    assert sent["streaming"] is True and sent["prompt_tokens"] == stream[-1].usage.prompt_tokens


def test_the_abort_rpc_and_a_cancelled_call_both_abort_the_tensorrt_llm_request(served):
    server, _, events = served
    request = pb.ChatStreamRequest(request_id="abort-me", messages=HI)
    aborts = lambda: [e for e in seen_events(events) if e["event"] == "abort"]  # noqa: E731
    with holding(events):  # each stream is in flight, whatever the machine's speed
        call = server.api.ChatStream(request, timeout=60)
        first = next(call)
        assert server.api.Abort(pb.AbortRequest(request_id="abort-me"), timeout=5).aborted
        rest = list(call)
        assert rest[-1].finish_reason == pb.FINISH_REASON_ABORTED
        assert len(first.content + "".join(m.content for m in rest)) < len(ANSWER)
        assert len(aborts()) == 1 and not aborts()[0]["finished"]
        call = server.api.ChatStream(pb.ChatStreamRequest(messages=HI), timeout=60)
        next(call)
        call.cancel()  # the client goes away: the server closes the stream, the runtime aborts
        wait_until(lambda: len(aborts()) == 2, "the double to see the cancelled call's abort")
    assert not aborts()[1]["finished"]


def test_engine_stats_come_from_the_doubles_iteration_stats(served):
    server, _, events = served
    with holding(events):  # the stream is in flight while the stats are read
        call = server.api.ChatStream(pb.ChatStreamRequest(messages=HI), timeout=60)
        next(call)
        during = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)
    assert (during.kv_blocks_total, during.kv_block_size) == (1024, 32)
    assert during.running_requests == 1 and 0 < during.kv_blocks_used < 1024
    assert list(call)[-1].finish_reason == pb.FINISH_REASON_STOP
    after = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)
    assert after.running_requests == 0 and after.waiting_requests == 0


def test_the_http_api_streams_the_same_answer(served):
    server, _, _ = served
    model = httpx.get(f"{server.http_url}/v1/models", timeout=30).json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream(
        "POST", f"{server.http_url}/v1/chat/completions", json=body, timeout=60
    ) as reply:
        assert reply.status_code == 200, reply.read()
        chunks = [
            json.loads(line.removeprefix("data: "))
            for line in reply.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"
        ]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == ANSWER
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == len(ANSWER)


def test_sigterm_drains_the_inflight_stream_then_shuts_the_llm_down(served):
    server, _, events = served
    with holding(events):  # in flight when the signal comes; let go once the server has it
        call = server.api.ChatStream(pb.ChatStreamRequest(request_id="drained", messages=HI))
        first = next(call)
        server.process.send_signal(signal.SIGTERM)
        server.wait_for_log(lambda line: line["event"] == "signal_received", "the SIGTERM")
    rest: list = []
    reader = threading.Thread(target=lambda: rest.extend(call), daemon=True)
    reader.start()
    reader.join(timeout=60)
    assert first.content + "".join(m.content for m in rest) == ANSWER
    assert rest[-1].finish_reason == pb.FINISH_REASON_STOP
    assert server.process.wait(timeout=60) == 0
    seen = [e["event"] for e in seen_events(events)]
    assert seen[-1] == "shutdown"
    with pytest.raises(grpc.RpcError):
        server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=2)
