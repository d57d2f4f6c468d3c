"""One validation for both APIs: the refusals a hostile-client probe found inconsistent.

Each case was accepted (or silently ignored) before: Chat took `max_new_tokens 0` that
Generate refuses, `reasoning=99` fell back to the default while `role=99` was refused, Chat took
`logprobs 99` and returned none, Tokenize rendered an empty conversation Chat refuses, a tool
schema with `required: "x"` reached the prompt, tools vanished for a model whose chat template
cannot show them, a 100 kB `request_id` went into every log line, and `seed` (uint64 in the
proto) was refused from 2**63 up.
"""

from __future__ import annotations

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from nemotron.v1 import generation_pb2 as pb

from tests.service.server_process import RunningServer

pytestmark = pytest.mark.slow

HI = [pb.ChatMessage(role=pb.ROLE_USER, content="Hi")]
ONE = pb.GenerationLimits(max_new_tokens=1)


def _refusal(call) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    return refused.value.details()


def _schema(**fields) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(fields)
    return struct


def test_chat_refuses_max_new_tokens_0_as_generate_does(server: RunningServer):
    zero = pb.GenerationLimits(max_new_tokens=0)
    generate = _refusal(
        lambda: server.api.Generate(
            pb.GenerateRequest(prompt=pb.Prompt(text="Hi"), limits=zero), timeout=60
        )
    )
    chat = _refusal(lambda: server.api.Chat(pb.ChatRequest(messages=HI, limits=zero), timeout=60))
    assert generate.startswith("max_new_tokens 0 is outside [1, ")
    assert chat.startswith("max_new_tokens 0 is outside [1, ")


def test_an_undefined_reasoning_mode_is_refused_like_an_undefined_role(server: RunningServer):
    message = _refusal(
        lambda: server.api.Chat(pb.ChatRequest(messages=HI, reasoning=99, limits=ONE), timeout=60)
    )
    assert message == (
        "reasoning: 99 is not allowed; use REASONING_MODE_UNSPECIFIED, REASONING_MODE_ON, "
        "REASONING_MODE_OFF"
    )


def test_chat_logprobs_are_range_checked_and_returned(server: RunningServer):
    bad = pb.GenerationLimits(max_new_tokens=1, logprobs=99)
    message = _refusal(lambda: server.api.Chat(pb.ChatRequest(messages=HI, limits=bad), timeout=60))
    assert message == "logprobs 99 is outside [0, 20]"
    asked = pb.GenerationLimits(max_new_tokens=3, logprobs=2, ignore_eos=True)
    reply = server.api.Chat(pb.ChatRequest(messages=HI, limits=asked), timeout=60)
    assert len(reply.logprobs) == 3 and all(len(lp.top_logprobs) == 2 for lp in reply.logprobs)
    stream = list(
        server.api.ChatStream(pb.ChatStreamRequest(messages=HI, limits=asked), timeout=60)
    )
    assert sum(len(m.logprobs) for m in stream) == 3


def test_tokenize_refuses_an_empty_conversation_as_chat_does(server: RunningServer):
    empty = pb.TokenizeRequest(chat=pb.ChatMessages(messages=[]))
    assert _refusal(lambda: server.api.Tokenize(empty, timeout=60)) == "messages must not be empty"
    chat = _refusal(lambda: server.api.Chat(pb.ChatRequest(messages=[], limits=ONE), timeout=60))
    assert chat == "messages must not be empty"
    reply = httpx.post(f"{server.http_url}/tokenize", json={"messages": []}, timeout=60)
    assert reply.status_code == 400
    assert reply.json()["error"]["message"] == "messages must not be empty"


def test_a_tool_schema_that_is_not_json_schema_is_refused_naming_where(server: RunningServer):
    tool = pb.Tool(name="f", parameters=_schema(type="object", required="x"))
    message = _refusal(
        lambda: server.api.Chat(pb.ChatRequest(messages=HI, tools=[tool], limits=ONE), timeout=60)
    )
    assert message == (
        "tools[0].parameters.required is not a valid JSON schema: 'x' is not of type 'array'"
    )


def test_tools_are_refused_for_a_model_whose_chat_template_cannot_show_them(
    server: RunningServer,
):
    """The embedded SmolLM2's template has no tools: before, 1,000 tools left the prompt as is."""
    tools = [pb.Tool(name=f"f{i}") for i in range(1000)]
    message = _refusal(
        lambda: server.api.Chat(pb.ChatRequest(messages=HI, tools=tools, limits=ONE), timeout=60)
    )
    assert message.startswith("tools: this model (chat format 'generic') has no way to be offered")
    body = {
        "model": httpx.get(f"{server.http_url}/v1/models", timeout=60).json()["data"][0]["id"],
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    reply = httpx.post(f"{server.http_url}/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["message"] == message


@pytest.mark.parametrize(
    ("request_id", "problem"),
    [
        ("x" * 100_000, "request_id has 100000 characters; allowed: 1 to 128"),
        ("a b", "request_id may hold only letters, digits and . _ : - (at most 128)"),
        ("tenant/1", "request_id may hold only letters, digits and . _ : - (at most 128)"),
    ],
)
def test_a_request_id_is_capped_and_kept_to_safe_characters(
    server: RunningServer, request_id: str, problem: str
):
    asked = pb.GenerateRequest(request_id=request_id, prompt=pb.Prompt(text="Hi"), limits=ONE)
    assert _refusal(lambda: server.api.Generate(asked, timeout=60)) == problem
    lines = server.wait_for_log(
        lambda line: line["event"] == "rpc_finished" and line.get("error") == problem, "the call"
    )
    assert request_id not in lines[-1]["request_id"]  # the call is named by an id of its own
    # On HTTP the header only names the call in logs: an unusable one is replaced, not logged.
    header = {"x-request-id": request_id}
    reply = httpx.post(f"{server.http_url}/tokenize", json={"prompt": "Hi"}, headers=header)
    assert reply.status_code == 200 and reply.headers["x-request-id"] != request_id
    ok = "req-0123_abc:DEF.9"
    assert (
        server.api.Generate(
            pb.GenerateRequest(request_id=ok, prompt=pb.Prompt(text="Hi"), limits=ONE), timeout=60
        ).request_id
        == ok
    )


@pytest.mark.parametrize("seed", [2**63, 2**64 - 1])
def test_every_uint64_seed_is_accepted(server: RunningServer, seed: int):
    sampling = pb.SamplingParams(seed=seed, temperature=1.0)
    reply = server.api.Generate(
        pb.GenerateRequest(prompt=pb.Prompt(text="Hi"), sampling=sampling, limits=ONE), timeout=60
    )
    assert len(reply.token_ids) == 1


SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_undecodable_requests_are_invalid_argument_and_recorded_on_every_rpc(
    server: RunningServer, method: str
):
    """Before: UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>", unlogged."""
    descriptor = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    make = (
        server.channel.unary_stream if descriptor.server_streaming else server.channel.unary_unary
    )
    call = make(path, request_serializer=None, response_deserializer=None)
    bodies = {"corrupt": b"\x0a\x05ab"}  # field 1 says 5 bytes follow; 2 do
    first = descriptor.input_type.fields_by_number.get(1)
    if first is not None and first.type == first.TYPE_STRING:
        bodies["invalid UTF-8"] = b"\x0a\x02\xff\xfe"  # field 1 (a string) holds 2 bad bytes
    for what, body in bodies.items():
        with pytest.raises(grpc.RpcError) as refused:
            reply = call(body, timeout=30)
            if descriptor.server_streaming:
                list(reply)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
        assert refused.value.details() == (
            f"the request is not a valid {descriptor.input_type.full_name} message (a corrupt "
            "protobuf encoding, or a string field that is not valid UTF-8)"
        )
    server.wait_for_log(
        lambda line: (
            line["event"] == "rpc_finished"
            and line.get("method") == method
            and line.get("code") == "INVALID_ARGUMENT"
            and "is not a valid" in line.get("error", "")
        ),
        f"{method}'s refusals",
        count=len(bodies),
    )
    assert server.status("readiness") == 1  # SERVING


def test_a_response_over_the_message_limit_is_refused_not_failed_as_overload(
    server: RunningServer,
):
    """3.6 MiB of CJK text (under the 4 MiB request limit) is ~6.7 MB of token ids: before, the
    client got RESOURCE_EXHAUSTED ("overloaded, retry later") and the log said OK."""
    text = "中文测试样本，" * (3_600_000 // 21)
    assert len(text.encode()) < 4 * 2**20
    asked = pb.TokenizeRequest(text=text)
    message = _refusal(lambda: server.api.Tokenize(asked, timeout=120))
    assert message.startswith("the response would be ")
    assert "over the server's message limit of 4194304 bytes (--max-message-bytes)" in message
    server.wait_for_log(
        lambda line: (
            line["event"] == "rpc_finished"
            and line.get("method") == "Tokenize"
            and line.get("code") == "INVALID_ARGUMENT"
            and line.get("error", "").startswith("the response would be")
        ),
        "the refusal recorded as the client saw it",
    )
    small = server.api.Tokenize(pb.TokenizeRequest(text=text[:1000]), timeout=60)
    assert small.count > 0
