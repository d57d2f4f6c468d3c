"""max_new_tokens at the edge of the context, the same rule in all four generating RPCs.

Unset, it is the default (256) clamped to the room the prompt leaves; set beyond that room,
it is refused naming the room. The server serves the embedded model on a profile with a
320-token context, so a 300-token prompt leaves 20.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from nemotron.v1 import generation_pb2 as pb

from tests.service.server_process import RunningServer, start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

CONTEXT, PROMPT = 320, 300
SHORT_CONTEXT_PROFILE = f"""
profiles:
  cpu-short:
    description: the cpu profile with a {CONTEXT}-token context, for tests at its edge
    device: cpu
    memory_gb: 16
    reserve_gb: 1.0
    tensor_parallel: 1
    precisions: [{{weights: bf16, kv_cache: bf16}}]
    limits: {{max_batch_size: 4, max_seq_len: {CONTEXT}, max_num_tokens: 512,
              kv_cache_free_fraction: 0.1}}
"""


@pytest.fixture(scope="module")
def short_server(
    cache_dir, cached_embedded_checkpoint, tmp_path_factory
) -> Iterator[RunningServer]:
    profiles = tmp_path_factory.mktemp("profiles") / "short.yaml"
    profiles.write_text(SHORT_CONTEXT_PROFILE)
    running = start_server(cache_dir, "--profile", "cpu-short", "--profiles", str(profiles))
    wait_ready(running)
    yield running
    assert stop_server(running) == 0


def _long_prompt(server: RunningServer) -> pb.Prompt:
    """A prompt of exactly PROMPT tokens."""
    text = "The quick brown fox jumps over the lazy dog. " * 60
    ids = server.api.Tokenize(pb.TokenizeRequest(text=text), timeout=30).token_ids
    return pb.Prompt(token_ids=pb.TokenIds(ids=ids[:PROMPT]))


def _long_chat(server: RunningServer) -> list[pb.ChatMessage]:
    """A conversation whose rendered prompt leaves less than 256 tokens of context."""
    words = "Summarize this: " + "the quick brown fox jumps over the lazy dog " * 30
    messages = [pb.ChatMessage(role=pb.ROLE_USER, content=words)]
    count = server.api.Tokenize(
        pb.TokenizeRequest(chat=pb.ChatMessages(messages=messages)), timeout=30
    ).count
    assert CONTEXT - 256 < count < CONTEXT - 1, count
    return messages


def _room_left(usage: pb.Usage) -> None:
    assert usage.completion_tokens >= 1
    assert usage.prompt_tokens + usage.completion_tokens <= CONTEXT


def test_generate_without_max_new_tokens_fits_the_room_left(short_server):
    prompt = _long_prompt(short_server)
    unary = short_server.api.Generate(pb.GenerateRequest(prompt=prompt), timeout=120)
    assert unary.usage.prompt_tokens == PROMPT
    _room_left(unary.usage)
    stream = list(
        short_server.api.GenerateStream(pb.GenerateStreamRequest(prompt=prompt), timeout=120)
    )
    assert stream[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    _room_left(stream[-1].usage)


def test_chat_without_max_new_tokens_fits_the_room_left(short_server):
    messages = _long_chat(short_server)
    unary = short_server.api.Chat(pb.ChatRequest(messages=messages), timeout=120)
    _room_left(unary.usage)
    stream = list(short_server.api.ChatStream(pb.ChatStreamRequest(messages=messages), timeout=120))
    _room_left(stream[-1].usage)


def _refused(call, request) -> str:
    with pytest.raises(grpc.RpcError) as error:
        result = call(request, timeout=60)
        if not hasattr(result, "usage"):  # a stream: the error comes with the first message
            list(result)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return error.value.details()


def test_a_max_new_tokens_beyond_the_room_is_refused_by_every_rpc(short_server):
    api, limits = short_server.api, pb.GenerationLimits(max_new_tokens=256)
    prompt, messages = _long_prompt(short_server), _long_chat(short_server)
    generate = (
        _refused(api.Generate, pb.GenerateRequest(prompt=prompt, limits=limits)),
        _refused(api.GenerateStream, pb.GenerateStreamRequest(prompt=prompt, limits=limits)),
    )
    for message in generate:
        assert message == (
            f"max_new_tokens 256 is outside [1, {CONTEXT - PROMPT}] "
            f"(max sequence length {CONTEXT} minus {PROMPT} prompt tokens)"
        )
    chat = (
        _refused(api.Chat, pb.ChatRequest(messages=messages, limits=limits)),
        _refused(api.ChatStream, pb.ChatStreamRequest(messages=messages, limits=limits)),
    )
    for message in chat:
        assert message.startswith("max_new_tokens 256 is outside [1, ")
        assert f"(max sequence length {CONTEXT} minus " in message
