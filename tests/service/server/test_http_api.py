"""The HTTP API end to end: a real `nemotron-serve` process, the embedded model, real clients.

The `openai` SDK and httpx call the OpenAI-compatible port; the gRPC API of the same process is
the reference (same engine: greedy output and usage must agree token for token).
"""

from __future__ import annotations

import json
import signal

import httpx
import openai
import pytest
from nemotron.v1 import generation_pb2 as pb

from bench.prompts import GREEDY_TEXT_PROMPTS
from service.runtime.tokenizer import TextTokenizer
from tests.service.server_process import (
    WAIT_S,
    start_server,
    stop_server,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.slow

PARIS = "What is the capital of France?"
PROMPTS = GREEDY_TEXT_PROMPTS  # bench/prompts.py: the GPU check uses the same set


@pytest.fixture(scope="module")
def model(server) -> str:
    """The served model name, as a client discovers it."""
    return httpx.get(f"{server.http_url}/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0)


def test_models_health_version_and_tokens(server, client, model):
    (listed,) = client.models.list().data
    assert listed.id == model and listed.owned_by == "nemotron-serve"
    info = server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert listed.model_extra["max_model_len"] == info.max_context_tokens
    for path in ("/v1/health/live", "/v1/health/ready"):
        assert httpx.get(server.http_url + path, timeout=10).status_code == 200
    assert httpx.get(f"{server.http_url}/v1/version", timeout=10).json()["release"]
    ids = httpx.post(
        f"{server.http_url}/tokenize", json={"prompt": "Hello world"}, timeout=10
    ).json()
    grpc_ids = server.api.Tokenize(pb.TokenizeRequest(text="Hello world"), timeout=10)
    assert ids["tokens"] == list(grpc_ids.token_ids) and ids["count"] == grpc_ids.count
    text = httpx.post(f"{server.http_url}/detokenize", json={"tokens": ids["tokens"]}, timeout=10)
    assert text.json() == {"prompt": "Hello world"}


def test_chat_and_streamed_chat_agree_with_grpc_usage_included(server, client, model):
    messages = [{"role": "user", "content": PARIS}]
    whole = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=30
    )
    assert "Paris" in whole.choices[0].message.content
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    grpc_answer = server.api.Chat(
        pb.ChatRequest(
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content=PARIS)],
            limits=pb.GenerationLimits(max_new_tokens=30),
        ),
        timeout=120,
    )
    assert grpc_answer.content == streamed
    for usage in (whole.usage, usage_chunk.usage):
        assert usage.prompt_tokens == grpc_answer.usage.prompt_tokens
        assert usage.completion_tokens == grpc_answer.usage.completion_tokens
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_output_through_http_equals_grpc_token_for_token(
    server, client, model, cached_embedded_checkpoint
):
    tokenizer = TextTokenizer(cached_embedded_checkpoint)
    for prompt in PROMPTS:
        http = client.completions.create(
            model=model, prompt=prompt, max_tokens=12, temperature=0, logprobs=0
        )
        grpc_answer = server.api.Generate(
            pb.GenerateRequest(
                prompt=pb.Prompt(text=prompt), limits=pb.GenerationLimits(max_new_tokens=12)
            ),
            timeout=60,
        )
        expected = [tokenizer.decode([t], skip_special_tokens=False) for t in grpc_answer.token_ids]
        choice = http.choices[0]
        assert choice.logprobs.tokens == expected, prompt
        assert choice.text == grpc_answer.text, prompt
        assert http.usage.completion_tokens == len(grpc_answer.token_ids)


def test_completions_with_logprobs_several_prompts_and_token_prompts(client, model):
    answer = client.completions.create(
        model=model, prompt=["The capital of France is", "1, 2, 3,"], max_tokens=4, logprobs=2
    )
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        logprobs = choice.logprobs
        assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
        assert all(len(top) == 2 for top in logprobs.top_logprobs)
        assert all(lp <= 0 for lp in logprobs.token_logprobs)
        assert logprobs.text_offset[0] == 0
    assert answer.usage.completion_tokens == 8
    ids = client.completions.create(model=model, prompt=[504, 3575], max_tokens=2)
    assert ids.usage.prompt_tokens == 2 and ids.usage.completion_tokens == 2
    echoed = client.completions.create(
        model=model, prompt="Water boils at", max_tokens=3, echo=True, temperature=0
    )
    assert echoed.choices[0].text.startswith("Water boils at")
    assert echoed.choices[0].finish_reason == "length"


# (what is sent, expected status, words the message must contain)
BAD_BODIES: tuple[tuple[bytes | dict, int, str], ...] = (
    (b'{"model": "x", "messages": [', 400, "not valid JSON"),
    (b"[1, 2, 3]", 400, "JSON object"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": True}, 400, "frobnicate"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 7}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    (
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    ({"messages": [{"role": "tool", "content": "42"}]}, 400, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}] * 10_000}, 400, "prompt"),
)


def _post(server, body: bytes | dict, model: str, path: str = "/v1/chat/completions"):
    if isinstance(body, dict):
        body = json.dumps({"model": model} | body).encode()
    return httpx.post(
        server.http_url + path,
        content=body,
        headers={"content-type": "application/json"},
        timeout=120,
    )


def test_bad_input_gets_the_right_status_and_message_and_the_server_keeps_serving(server, model):
    for body, status, words in BAD_BODIES:
        response = _post(server, body, model)
        assert response.status_code == status, (
            body if len(str(body)) < 200 else words,
            response.text,
        )
        error = response.json()["error"]
        assert words in error["message"] or words == error["param"], (words, error)
        assert error["type"] == "invalid_request_error"
    nan = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
    assert _post(server, nan % model.encode(), model).status_code == 400
    bad_utf8 = b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    assert _post(server, bad_utf8, model).status_code == 400
    huge = b'{"prompt": "' + b"a" * (50 * 1024 * 1024) + b'"}'
    too_large = _post(server, huge, model, "/v1/completions")
    assert too_large.status_code == 413 and "limit" in too_large.json()["error"]["message"]
    many = _post(server, {"prompt": ["a"] * 300}, model, "/v1/completions")
    assert many.status_code == 400 and "at most 256" in many.json()["error"]["message"]
    missing = httpx.get(f"{server.http_url}/v1/nothing-here", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["message"]
    ok = _post(server, {"messages": [{"role": "user", "content": PARIS}], "max_tokens": 8}, model)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]


def _kv_free(server) -> bool:
    stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=5)
    return stats.kv_blocks_used == 0 and stats.running_requests == 0


def test_a_client_that_disconnects_frees_its_kv_blocks(server, model):
    body = {
        "model": model,
        "prompt": "Count: one two three",
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.http_url}/v1/completions", json=body, timeout=60) as reply:
        events = reply.iter_lines()
        for _ in range(3):
            while not next(events).startswith("data: "):
                pass
        stats = server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=5)
        assert stats.kv_blocks_used > 0
    wait_until(lambda: _kv_free(server), "the stream's KV blocks to be freed")
    whole = dict(body, stream=False)
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming request, abandoned
        httpx.post(f"{server.http_url}/v1/completions", json=whole, timeout=1.0)
    wait_until(lambda: _kv_free(server), "the abandoned request's KV blocks to be freed")
    server.wait_for_log(
        lambda line: line.get("method") == "/v1/completions" and line.get("code") == "CANCELLED",
        "the cancelled HTTP calls",
        count=2,
    )
    assert "Exception in ASGI application" not in server.log_path.read_text()  # no traceback


def test_metrics_on_the_http_port_carry_the_routers_gauges_and_the_routes(server, client, model):
    client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )

    def scrape() -> str:
        text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
        return text if 'method="/v1/chat/completions"' in text else ""

    text = wait_until(scrape, "the chat call in the metrics", WAIT_S)
    label = f'model_name="{model}"'
    for name in (
        "vllm:num_requests_waiting",
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
    ):
        assert any(line.startswith(f"{name}{{{label}}}") for line in text.splitlines()), name
    assert 'vllm:cache_config_info{block_size="' in text
    assert 'nemotron_requests_total{code="OK",method="/v1/chat/completions"}' in text
    assert httpx.get(f"{server.http_url}/v1/metrics", timeout=10).status_code == 200


def test_on_sigterm_an_inflight_http_stream_finishes_and_new_requests_are_refused(
    cache_dir, cached_embedded_checkpoint
):
    running = start_server(cache_dir, "--grace-s", "120")
    try:
        wait_ready(running)
        url = running.http_url
        name = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        body = {"model": name, "prompt": "Count:", "max_tokens": 40, "ignore_eos": True}
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json=body | {"stream": True, "stream_options": {"include_usage": True}},
            timeout=120,
        ) as reply:
            lines = reply.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            running.process.send_signal(signal.SIGTERM)
            running.wait_for_log(lambda line: line.get("event") == "server_draining", "the drain")
            with pytest.raises((httpx.ConnectError, httpx.HTTPStatusError)):
                refused = httpx.get(f"{url}/v1/health/ready", timeout=10)
                refused.raise_for_status()  # 503 if the connection still got through
            rest = [line for line in lines if line.startswith("data: ")]
        chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
        assert rest[-1] == "data: [DONE]"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 40  # all of it, after the signal
        assert running.process.wait(timeout=120) == 0
    finally:
        stop_server(running)
