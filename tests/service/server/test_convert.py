"""Protobuf <-> domain conversion: sampling and request options, multi-turn tool conversations."""

from __future__ import annotations

import pytest
from google.protobuf import json_format, struct_pb2
from nemotron.v1 import generation_pb2 as pb

from service.chat.turns import ChatDelta
from service.runtime.interface import FinishReason, RequestError
from service.runtime.options import SamplingParams
from service.runtime.tokenizer import ChatMessage
from service.server.convert import (
    chat_delta_to_pb,
    chat_from_pb,
    chat_response_to_pb,
    messages_from_pb,
    options_from_pb,
    sampling_from_pb,
)

CALL_ID = "call_0123456789abcdef01234567"
FORECAST_CALL = {"id": CALL_ID, "name": "forecast", "arguments": {"city": "Paris", "days": 3}}


def test_the_api_and_the_domain_carry_the_same_sampling_options():
    assert set(SamplingParams.option_names()) == set(pb.SamplingParams.DESCRIPTOR.fields_by_name)


def test_every_sampling_option_set_in_the_api_reaches_the_domain():
    values = dict(
        temperature=0.5,
        top_p=0.75,
        top_k=7,
        min_p=0.25,
        repetition_penalty=1.5,
        frequency_penalty=-0.5,
        presence_penalty=0.5,
        seed=2**63 + 5,  # uint64 in the API: passed on as sent, validation judges it
    )
    converted = sampling_from_pb(pb.SamplingParams(**values))
    assert (converted.top_k, converted.seed) == (7, 2**63 + 5)  # integers exactly
    assert {name: getattr(converted, name) for name in values} == pytest.approx(values)


def test_unset_options_keep_the_domain_defaults():
    assert sampling_from_pb(pb.SamplingParams(top_k=3)) == SamplingParams(top_k=3)


def test_request_options_leave_an_unset_token_limit_unset():
    limits = pb.GenerationLimits(stop_sequences=["\n\n"], ignore_eos=True)
    options = options_from_pb(pb.SamplingParams(), limits, deadline=12.5)
    assert options.max_new_tokens is None and options.logprobs is None
    assert (options.stop_strings, options.ignore_eos, options.deadline) == (("\n\n",), True, 12.5)
    limited = options_from_pb(pb.SamplingParams(), pb.GenerationLimits(max_new_tokens=0), None)
    assert limited.max_new_tokens == 0  # set, so validation refuses it rather than defaulting


def _arguments(value: dict) -> struct_pb2.Struct:
    arguments = struct_pb2.Struct()
    arguments.update(value)
    return arguments


def _tool_conversation() -> list[pb.ChatMessage]:
    """A user question, the assistant's call, the tool's result and a follow-up question."""
    call = pb.ToolCall(
        id=CALL_ID, name="forecast", arguments=_arguments({"city": "Paris", "days": 3})
    )
    return [
        pb.ChatMessage(role=pb.ROLE_SYSTEM, content="Be brief."),
        pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?"),
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call]),
        pb.ChatMessage(role=pb.ROLE_TOOL, content='{"sky": "sunny"}', tool_call_id=CALL_ID),
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, content="Sunny."),
        pb.ChatMessage(role=pb.ROLE_USER, content="And tomorrow?"),
    ]


def test_a_multi_turn_tool_conversation_reaches_the_domain_with_calls_and_call_ids():
    assert messages_from_pb(_tool_conversation()) == (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(FORECAST_CALL,)),
        ChatMessage("tool", '{"sky": "sunny"}', tool_call_id=CALL_ID),
        ChatMessage("assistant", "Sunny."),
        ChatMessage("user", "And tomorrow?"),
    )


def test_struct_arguments_and_parameters_come_back_with_sorted_keys_and_whole_ints():
    arguments = {
        "zone": "eu",
        "days": 3,
        "ratio": 0.5,
        "nested": {"n": -4, "big": 2.0**60, "a": [1]},
    }
    call = pb.ToolCall(id=CALL_ID, name="f", arguments=_arguments(arguments))
    (message,) = messages_from_pb([pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call])])
    converted = message.tool_calls[0]["arguments"]
    assert converted == arguments
    assert list(converted) == ["days", "nested", "ratio", "zone"]
    assert list(converted["nested"]) == ["a", "big", "n"]
    assert [type(converted["days"]), type(converted["nested"]["big"])] == [int, float]
    schema = {"type": "object", "properties": {"days": {"type": "integer", "maximum": 16}}}
    tool = pb.Tool(name="forecast", parameters=_arguments(schema))
    turn = chat_from_pb(pb.ChatRequest(messages=_tool_conversation(), tools=[tool]), "r", None)
    assert turn.tools[0].parameters == schema
    assert list(turn.tools[0].parameters) == ["properties", "type"]
    assert type(turn.tools[0].parameters["properties"]["days"]["maximum"]) is int


def test_a_call_without_arguments_has_an_empty_object():
    call = pb.ToolCall(id=CALL_ID, name="now")
    (message,) = messages_from_pb([pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[call])])
    assert message.tool_calls == ({"id": CALL_ID, "name": "now", "arguments": {}},)


def test_the_json_mapping_refuses_arguments_that_are_not_an_object():
    request = {"role": "ROLE_ASSISTANT", "toolCalls": [{"name": "f", "arguments": '{"a": 1}'}]}
    with pytest.raises(json_format.ParseError, match="arguments"):
        json_format.ParseDict(request, pb.ChatMessage())


def _call(**fields) -> pb.ToolCall:
    return pb.ToolCall(**{"id": CALL_ID, "name": "forecast", **fields})


REFUSED_MESSAGES = {
    "calls_on_a_user_message": (
        pb.ChatMessage(role=pb.ROLE_USER, content="hi", tool_calls=[_call()]),
        "messages[1].tool_calls: only ROLE_ASSISTANT messages carry tool calls, not ROLE_USER",
    ),
    "calls_on_a_tool_message": (
        pb.ChatMessage(role=pb.ROLE_TOOL, tool_call_id=CALL_ID, tool_calls=[_call()]),
        "messages[1].tool_calls: only ROLE_ASSISTANT messages carry tool calls, not ROLE_TOOL",
    ),
    "tool_message_without_a_call_id": (
        pb.ChatMessage(role=pb.ROLE_TOOL, content="sunny"),
        "messages[1].tool_call_id: a ROLE_TOOL message needs the id of the call it answers",
    ),
    "tool_message_with_an_empty_call_id": (
        pb.ChatMessage(role=pb.ROLE_TOOL, content="sunny", tool_call_id=""),
        "messages[1].tool_call_id: a ROLE_TOOL message needs the id of the call it answers",
    ),
    "call_id_on_a_user_message": (
        pb.ChatMessage(role=pb.ROLE_USER, content="hi", tool_call_id=""),
        "messages[1].tool_call_id: only ROLE_TOOL messages answer a call, not ROLE_USER",
    ),
    "call_id_on_an_assistant_message": (
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[_call()], tool_call_id=CALL_ID),
        "messages[1].tool_call_id: only ROLE_TOOL messages answer a call, not ROLE_ASSISTANT",
    ),
    "call_without_a_name": (
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=[_call(), _call(name="")]),
        "messages[1].tool_calls[1].name: a tool call needs the name of the function it calls",
    ),
    "arguments_that_are_not_json": (
        pb.ChatMessage(
            role=pb.ROLE_ASSISTANT, tool_calls=[_call(arguments=_arguments({"x": float("nan")}))]
        ),
        "messages[1].tool_calls[0].arguments: must be a JSON object (Fail to serialize NaN",
    ),
}


@pytest.mark.parametrize("message, error", REFUSED_MESSAGES.values(), ids=REFUSED_MESSAGES)
def test_tool_fields_where_they_do_not_belong_are_refused_naming_the_field(message, error):
    messages = [pb.ChatMessage(role=pb.ROLE_USER, content="Weather?"), message]
    with pytest.raises(RequestError) as refused:
        messages_from_pb(messages)
    assert str(refused.value).startswith(error)


def test_tool_parameters_that_are_not_json_are_refused_naming_the_tool():
    tool = pb.Tool(name="f", parameters=_arguments({"maximum": float("inf")}))
    request = pb.ChatRequest(messages=_tool_conversation(), tools=[tool])
    with pytest.raises(RequestError, match=r"^tools\[0\]\.parameters: must be a JSON object"):
        chat_from_pb(request, "r", None)


def test_a_chat_response_carries_each_call_with_its_id():
    other = {"id": "call_abc", "name": "now", "arguments": {}}
    final = ChatDelta(tool_calls=(FORECAST_CALL, other), finish_reason=FinishReason.TOOL_CALLS)
    for message in (
        chat_response_to_pb("r", [ChatDelta(content="Let me look."), final]),
        chat_delta_to_pb("r", final),
    ):
        assert message.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        assert [(c.id, c.name) for c in message.tool_calls] == [
            (CALL_ID, "forecast"),
            ("call_abc", "now"),
        ]
        arguments = json_format.MessageToDict(message.tool_calls[0].arguments)
        assert arguments == FORECAST_CALL["arguments"]


def test_a_call_the_domain_left_without_an_id_still_gets_one():
    final = ChatDelta(tool_calls=({"name": "now", "arguments": {}},))
    (call,) = chat_response_to_pb("r", [final]).tool_calls
    assert call.id.startswith("call_") and len(call.id) > len("call_")


def test_calls_returned_by_a_response_come_back_unchanged_in_the_next_request():
    response = chat_response_to_pb("r", [ChatDelta(tool_calls=(FORECAST_CALL,))])
    answer = pb.ChatMessage(role=pb.ROLE_TOOL, content="sunny", tool_call_id=CALL_ID)
    messages = [
        pb.ChatMessage(role=pb.ROLE_USER, content="Weather in Paris?"),
        pb.ChatMessage(role=pb.ROLE_ASSISTANT, tool_calls=response.tool_calls),
        answer,
    ]
    _, assistant, tool = messages_from_pb(messages)
    assert assistant.tool_calls == (FORECAST_CALL,)
    assert tool.tool_call_id == assistant.tool_calls[0]["id"]
