"""The official `openai` SDK against the HTTP API over a scripted engine: tools, errors, retries.

The scripted engine stands in for a model that calls tools (the embedded one does not) and for
failures a healthy model never shows (an overloaded queue, an engine error mid-stream).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from service.runtime.interface import FinishReason, OverloadedError
from service.runtime.tokenizer import TextTokenizer
from tests.service.chat.chat_templates import NEMOTRON_V1_5_TEMPLATE, byte_tokenizer
from tests.service.scripted_engine import Reply, ScriptedEngine
from tests.service.server.http_in_process import MODEL, http_in_process

FORECAST_TOOL = {
    "type": "function",
    "function": {
        "name": "forecast",
        "description": "Weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
FORECAST_CALL = '<TOOLCALL>[{"name": "forecast", "arguments": {"city": "Paris"}}]</TOOLCALL>'
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TextTokenizer:
    return byte_tokenizer(tmp_path_factory.mktemp("v1_5"), NEMOTRON_V1_5_TEMPLATE)


def _client(server, **options) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.base_url, api_key=options.pop("api_key", "none"), **options
    )


def test_a_tool_round_trip_with_call_ids(tokenizer):
    replies = [
        Reply(f"<think>Ask.</think>{FORECAST_CALL}"),
        Reply("<think>Answer.</think>Sunny in Paris."),
    ]
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        client = _client(server)
        first = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[FORECAST_TOOL], max_tokens=200
        )
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "forecast"
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        assert choice.message.reasoning_content == "Ask."  # NIM's and vLLM's field
        history = [
            *QUESTION,
            choice.message,  # sent back as the SDK returned it
            {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
        ]
        second = client.chat.completions.create(
            model=MODEL, messages=history, tools=[FORECAST_TOOL], max_tokens=200
        )
        assert second.choices[0].message.content == "Sunny in Paris."
        assert second.choices[0].finish_reason == "stop"
        prompt = tokenizer.decode(server.engine.requests[1].prompt_ids, skip_special_tokens=False)
        assert '"name": "forecast"' in prompt and '{"sky": "sunny"}' in prompt


def test_tool_calls_stream_as_openai_streams_them(tokenizer):
    replies = [Reply(f"<think>Ask.</think>{FORECAST_CALL}")]
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        stream = _client(server).chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[FORECAST_TOOL], max_tokens=200, stream=True
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    reasoning = "".join(
        getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks
    )
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or ()]
    assert reasoning == "Ask."
    (call,) = calls
    assert call.index == 0 and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_every_error_class_raises_the_sdks_typed_exception(tokenizer, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("full-key\nchat-only Chat,ChatStream\n")
    replies = [
        Reply("", refusal=OverloadedError("the queue is full", retry_after_s=0.25)),
        Reply("", FinishReason.ERROR, error="step failed: CUDA error 700"),
    ]
    with http_in_process(ScriptedEngine(tokenizer, replies), api_keys_file=keys) as server:
        chat = dict(model=MODEL, messages=QUESTION, max_tokens=5)
        full = _client(server, api_key="full-key", max_retries=0)
        cases = [
            (openai.BadRequestError, full, "chat", {"n": 2}),
            (openai.AuthenticationError, _client(server, api_key="wrong"), "chat", {}),
            (openai.PermissionDeniedError, _client(server, api_key="chat-only"), "models", {}),
            (openai.NotFoundError, full, "chat", {"model": "gpt-4o"}),
            (openai.RateLimitError, full, "chat", {}),
            (openai.InternalServerError, full, "chat", {}),
        ]
        for error, client, route, fields in cases:
            with pytest.raises(error) as raised:
                if route == "models":
                    client.models.list()
                else:
                    client.chat.completions.create(**(chat | fields))
            body = raised.value.body
            assert isinstance(body, dict) and body["message"], (error, body)
            if error is openai.InternalServerError:
                assert "incident" in body["message"] and "CUDA" not in body["message"]
            if error is openai.NotFoundError:
                assert body["code"] == "model_not_found" and body["param"] == "model"
            if error is openai.RateLimitError:
                assert raised.value.response.headers["retry-after"] == "1"
                assert raised.value.response.headers["retry-after-ms"] == "250"


def test_the_sdks_retry_honours_retry_after(tokenizer):
    replies = [
        Reply("", refusal=OverloadedError("the queue is full", retry_after_s=0.8)),
        Reply("<think>Easy.</think>Paris."),
    ]
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        started = time.monotonic()
        answer = _client(server, max_retries=1).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=50
        )
        waited = time.monotonic() - started
    assert answer.choices[0].message.content == "Paris."
    assert waited >= 0.8  # the SDK waited as told (its own backoff alone starts at 0.5 s)


def test_an_error_after_the_stream_started_is_an_error_event(tokenizer):
    replies = [Reply("<think>Par", FinishReason.ERROR, error="step failed")] * 2
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        stream = _client(server, max_retries=0).chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=20, stream=True
        )
        seen = []
        with pytest.raises(openai.APIError) as raised:
            for chunk in stream:
                seen.append(getattr(chunk.choices[0].delta, "reasoning_content", None) or "")
        assert "".join(seen) == "Par"
        assert "incident" in str(raised.value)
        with httpx.stream(
            "POST",
            f"{server.base_url}/chat/completions",
            json={"model": MODEL, "messages": QUESTION, "stream": True},
        ) as raw:
            lines = [line for line in raw.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"  # raw SSE: the stream still ends as OpenAI's do


def test_errors_before_the_first_byte_keep_their_status_when_streaming(tokenizer):
    replies = [Reply("", refusal=OverloadedError("the queue is full", retry_after_s=1.0))]
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        client = _client(server, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=5, stream=True
            )


def test_reasoning_switches_as_nim_and_vllm_users_send_them(tokenizer):
    replies = [Reply("Paris.")] * 2
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        client = _client(server)
        typed = client.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=50,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}},
        )
        in_prompt = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "/no_think"}, *QUESTION],
            max_tokens=50,
        )
        prompts = [
            tokenizer.decode(r.prompt_ids, skip_special_tokens=False)
            for r in server.engine.requests
        ]
    for answer, prompt in zip((typed, in_prompt), prompts, strict=True):
        assert answer.choices[0].message.content == "Paris."  # no thinking to split off
        assert "/no_think" in prompt and prompt.endswith("<think>\n\n</think>\n\n")


def test_what_clients_send_back_and_optional_nulls_are_taken_and_unserved_fields_named(
    tokenizer,
):
    replies = [Reply(f"<think>Ask.</think>{FORECAST_CALL}"), Reply("<think>.</think>Sunny.")]
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        client = _client(server, max_retries=0)
        first = client.chat.completions.create(
            model=MODEL, messages=QUESTION, tools=[FORECAST_TOOL], max_tokens=200
        )
        returned = first.choices[0].message.model_dump()  # every field, nulls included
        assert returned["content"] is None  # written as null beside tool calls, as OpenAI does
        call = returned["tool_calls"][0] | {"index": 0}  # as rebuilt from a stream
        history = [
            *QUESTION,
            returned | {"tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]
        second = client.chat.completions.create(
            model=MODEL,
            messages=history,
            max_tokens=200,
            extra_body={"stream": None, "logprobs": None, "prompt_cache_key": "user-7"},
        )
        assert second.choices[0].message.content == "Sunny."
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(
                model=MODEL, messages=QUESTION, max_tokens=5, reasoning_effort="low"
            )
        assert "reasoning_effort" in refused.value.body["message"]


def test_chunks_carry_finish_reason_null_and_a_reused_request_id_does_not_collide(tokenizer):
    replies = [Reply("<think>.</think>Paris.")] * 2
    with http_in_process(ScriptedEngine(tokenizer, replies)) as server:
        body = {"model": MODEL, "messages": QUESTION, "max_tokens": 50, "stream": True}
        headers = {"x-request-id": "retried-1"}
        with httpx.Client(base_url=server.base_url, timeout=60) as http:
            for _ in range(2):  # a gateway's retry keeps the header
                with http.stream("POST", "/chat/completions", json=body, headers=headers) as r:
                    assert r.status_code == 200 and r.headers["x-request-id"] == "retried-1"
                    chunks = [
                        json.loads(line[6:])
                        for line in r.iter_lines()
                        if line.startswith("data: {")
                    ]
                assert all("finish_reason" in c["choices"][0] for c in chunks)
                assert chunks[0]["choices"][0]["finish_reason"] is None
                assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        engine_ids = {r.request_id for r in server.engine.requests}
        assert len(engine_ids) == 2 and "retried-1" not in engine_ids  # the server's own ids


def test_a_failure_after_admission_is_an_error_event_even_before_the_first_token(tokenizer):
    # The response starts when the engine admits the request (as vLLM's do), so a prefill
    # that fails comes as an error event after the role chunk, not as a status.
    replies = [Reply("", FinishReason.ERROR, error="prefill failed: CUDA error 700")]
    with (
        http_in_process(ScriptedEngine(tokenizer, replies)) as server,
        httpx.stream(
            "POST",
            f"{server.base_url}/chat/completions",
            json={"model": MODEL, "messages": QUESTION, "stream": True},
        ) as raw,
    ):
        assert raw.status_code == 200
        events = [line[6:] for line in raw.iter_lines() if line.startswith("data: ")]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    error = json.loads(events[-2])["error"]
    assert "incident" in error["message"] and "CUDA" not in error["message"]
    assert events[-1] == "[DONE]"
