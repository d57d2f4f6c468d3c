"""A tool conversation over the gRPC API: the call ids the server returns reach the template."""

from __future__ import annotations

import asyncio

import pytest
from google.protobuf import json_format
from nemotron.v1 import generation_pb2 as pb

from service.chat.formats import family_of, load_families
from service.chat.turns import ChatContext
from tests.service.chat.chat_templates import byte_tokenizer
from tests.service.scripted_engine import Reply, ScriptedEngine
from tests.service.server.grpc_in_process import grpc_stub

# A generic ChatML template that writes an assistant turn's calls and a tool turn's call id.
TOOL_TEMPLATE = (
    "{% if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.tool_call_id is defined %}(answers {{ m.tool_call_id }}) {% endif %}"
    "{{ m['content'] }}"
    "{% for c in m.tool_calls or [] %}"
    "<call id={{ c.id }}>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The model's arguments; sent back over the API, they render with sorted keys (a Struct is a map).
FORECAST_CALL = (
    '<TOOLCALL>[{"name": "forecast", "arguments": {"days": 2, "city": "Paris"}}]</TOOLCALL>'
)
QUESTION = pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?")
FORECAST = pb.Tool(name="forecast", description="Weather for a city.")


@pytest.fixture
def engine(tmp_path) -> ScriptedEngine:
    """The model asks for the forecast, then answers from the tool's result."""
    tokenizer = byte_tokenizer(tmp_path / "tokenizer", TOOL_TEMPLATE)
    return ScriptedEngine(tokenizer, [Reply(FORECAST_CALL), Reply("Sunny.")])


async def _two_turns(
    engine: ScriptedEngine,
) -> tuple[list[pb.ChatStreamResponse], pb.ChatResponse]:
    """Turn one streamed; turn two sends back the call it returned with the tool's result."""
    family = family_of(engine.tokenizer.chat_template_source, load_families())
    async with grpc_stub(ChatContext(engine, family)) as stub:
        request = pb.ChatStreamRequest(messages=[QUESTION], tools=[FORECAST])
        first = [m async for m in stub.ChatStream(request, timeout=10)]
        (call,) = first[-1].tool_calls
        messages = [
            QUESTION,
            pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
            pb.ChatMessage(role=pb.ROLE_TOOL, content="sunny", tool_call_id=call.id),
        ]
        second_request = pb.ChatRequest(messages=messages, tools=[FORECAST])
        second = await stub.Chat(second_request, timeout=10)
    return first, second


def test_a_returned_call_id_comes_back_into_the_prompt_of_the_next_turn(engine):
    first, second = asyncio.run(_two_turns(engine))
    (call,) = first[-1].tool_calls
    assert call.id.startswith("call_") and call.name == "forecast"
    assert json_format.MessageToDict(call.arguments) == {"city": "Paris", "days": 2}
    assert first[-1].finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert (second.content, second.tool_calls, second.finish_reason) == (
        "Sunny.",
        [],
        pb.FINISH_REASON_STOP,
    )
    prompt = engine.tokenizer.decode(engine.requests[1].prompt_ids)
    assert prompt == (
        '<tools>[{"type": "function", "function": {"name": "forecast", "description": '
        '"Weather for a city.", "parameters": {}}}]</tools>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        f'<|im_start|>assistant\n<call id={call.id}>forecast {{"city": "Paris", "days": 2}}'
        "</call><|im_end|>\n"
        f"<|im_start|>tool\n(answers {call.id}) sunny<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
