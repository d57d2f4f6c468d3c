"""The sampling defaults a chat ran with, as each gRPC response reports them: a Nemotron v1 and
v1.5 turn with reasoning on runs at temperature 0.6 / top-p 0.95, with it off greedily, a
request's own fields win (and are not reported as defaults), `--sampling-defaults none` reports
nothing. Each report is checked against what the engine was really asked to run."""

from __future__ import annotations

import asyncio
import json

import pytest
from google.protobuf import json_format
from nemotron.v1 import generation_pb2 as pb

from service.chat.formats import family_of, load_families
from service.chat.sampling import model_defaults
from service.chat.turns import ChatContext
from tests.service.chat.chat_templates import (
    CHATML_TOOLS_TEMPLATE,
    NEMOTRON_V1_5_TEMPLATE,
    NEMOTRON_V1_TEMPLATE,
    byte_tokenizer,
)
from tests.service.scripted_engine import Reply, ScriptedEngine
from tests.service.server.grpc_in_process import grpc_stub
from tests.service.server.http_in_process import MODEL, http_in_process

HELLO = pb.ChatMessage(role=pb.ROLE_USER, content="Write a haiku about Kubernetes.")
ANSWER = "<think>Pods.</think>Ships sail."
FAMILIES = [(NEMOTRON_V1_TEMPLATE, "nemotron-v1"), (NEMOTRON_V1_5_TEMPLATE, "nemotron-v1.5")]


async def _turns(
    context: ChatContext, requests: list[pb.ChatRequest]
) -> list[tuple[pb.ChatResponse, pb.ChatStreamResponse]]:
    """Each request as a Chat and as a ChatStream (its last message) on a real gRPC server."""
    out = []
    async with grpc_stub(context) as stub:
        for request in requests:
            whole = await stub.Chat(request, timeout=30)
            streamed = pb.ChatStreamRequest()
            streamed.ParseFromString(request.SerializeToString())  # the same fields
            messages = [m async for m in stub.ChatStream(streamed, timeout=30)]
            assert not any(m.HasField("sampling_defaults_applied") for m in messages[:-1])
            out.append((whole, messages[-1]))
    return out


def _reported(message: pb.ChatResponse | pb.ChatStreamResponse) -> dict[str, float] | None:
    if not message.HasField("sampling_defaults_applied"):
        return None
    values = json_format.MessageToDict(
        message.sampling_defaults_applied, preserving_proto_field_name=True
    )
    return {name: round(value, 6) for name, value in values.items()}


def _context(tmp_path, template: str, choice: str, replies: int | list[Reply]) -> ChatContext:
    """A scripted model of `template`'s family: `replies` of its own, or that many ANSWERs."""
    tokenizer = byte_tokenizer(tmp_path, template)
    family = family_of(template, load_families())
    defaults = model_defaults(choice, family.sampling_on, family.sampling_off, tmp_path)
    script = replies if isinstance(replies, list) else [Reply(ANSWER)] * replies
    engine = ScriptedEngine(tokenizer, script)
    return ChatContext(engine, family, defaults)


@pytest.mark.parametrize(("template", "family"), FAMILIES)
def test_each_response_reports_the_defaults_its_reasoning_mode_ran_with(tmp_path, template, family):
    requests = [
        pb.ChatRequest(messages=[HELLO], reasoning=pb.REASONING_MODE_ON),
        pb.ChatRequest(messages=[HELLO], reasoning=pb.REASONING_MODE_OFF),
        pb.ChatRequest(
            messages=[HELLO],
            reasoning=pb.REASONING_MODE_ON,
            sampling=pb.SamplingParams(temperature=0.3),
        ),
    ]
    context = _context(tmp_path, template, "model", 2 * len(requests))
    assert context.family.name == family
    turns = asyncio.run(_turns(context, requests))
    expected = [
        {"temperature": 0.6, "top_p": 0.95},  # the card's reasoning-on values
        {"temperature": 0.0, "top_p": 1.0},  # greedy with reasoning off
        {"top_p": 0.95},  # the request's own temperature wins and is not a default
    ]
    ran = [request.options.sampling for request in context.engine.requests]  # type: ignore[attr-defined]
    for index, ((whole, last), want) in enumerate(zip(turns, expected, strict=True)):
        assert _reported(whole) == _reported(last) == want, index
        for sampling in ran[2 * index : 2 * index + 2]:  # what the engine really ran
            assert (round(sampling.temperature, 6), round(sampling.top_p, 6)) == (
                want.get("temperature", 0.3),
                want["top_p"],
            )


def test_with_sampling_defaults_none_nothing_is_reported_and_turns_run_greedily(tmp_path):
    context = _context(tmp_path, NEMOTRON_V1_5_TEMPLATE, "none", 2)
    request = pb.ChatRequest(messages=[HELLO], reasoning=pb.REASONING_MODE_ON)
    ((whole, last),) = asyncio.run(_turns(context, [request]))
    assert _reported(whole) is _reported(last) is None
    assert all(r.options.sampling.greedy for r in context.engine.requests)  # type: ignore[attr-defined]


CARD = {"temperature": 0.2, "top_p": 0.9}  # a checkpoint's generation_config.json values


def _generic(tmp_path, replies: int) -> ChatContext:
    """A model without a reasoning switch whose checkpoint recommends CARD."""
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, **CARD}))
    return _context(tmp_path, CHATML_TOOLS_TEMPLATE, "model", replies)


async def _generations(
    context: ChatContext,
) -> tuple[pb.GenerateResponse, pb.GenerateStreamResponse]:
    prompt = pb.Prompt(token_ids=pb.TokenIds(ids=[72, 105]))
    own_top_p = pb.SamplingParams(top_p=0.5)
    async with grpc_stub(context) as stub:
        whole = await stub.Generate(pb.GenerateRequest(prompt=prompt), timeout=30)
        request = pb.GenerateStreamRequest(prompt=prompt, sampling=own_top_p)
        messages = [m async for m in stub.GenerateStream(request, timeout=30)]
    assert not any(m.HasField("sampling_defaults_applied") for m in messages[:-1])
    return whole, messages[-1]


def test_generate_and_the_last_stream_message_report_the_checkpoints_defaults(tmp_path):
    whole, last = asyncio.run(_generations(_generic(tmp_path, 2)))
    assert _reported(whole) == CARD
    assert _reported(last) == {"temperature": 0.2}  # the request's own top_p is not a default


def test_a_turn_cut_by_its_reasoning_budget_reports_what_both_generations_ran_with(tmp_path):
    # The thinking stops at the budget; the answer is a second generation with the same values.
    replies = [Reply("<think>a long thought"), Reply("Ships sail.")]
    context = _context(tmp_path, NEMOTRON_V1_5_TEMPLATE, "model", replies)
    request = pb.ChatRequest(
        messages=[HELLO], reasoning=pb.REASONING_MODE_ON, reasoning_budget_tokens=3
    )

    async def turn() -> pb.ChatResponse:
        async with grpc_stub(context) as stub:
            return await stub.Chat(request, timeout=30)

    response = asyncio.run(turn())
    assert response.content == "Ships sail."
    assert _reported(response) == {"temperature": 0.6, "top_p": 0.95}
    first, second = context.engine.requests  # type: ignore[attr-defined]
    assert first.options.sampling == second.options.sampling
    assert round(second.options.sampling.temperature, 6) == 0.6


def test_the_http_api_reports_them_to_the_openai_sdk_streamed_and_whole(tmp_path):
    import openai

    context = _generic(tmp_path, 4)
    defaults = context.sampling
    with http_in_process(context.engine, sampling=defaults) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        hello = [{"role": "user", "content": "Hi"}]
        whole = client.chat.completions.create(model=MODEL, messages=hello)
        assert whole.model_extra["sampling_defaults_applied"] == pytest.approx(CARD)
        chunks = list(
            client.chat.completions.create(
                model=MODEL,
                messages=hello,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        reported = [c.model_extra.get("sampling_defaults_applied") for c in chunks]
        finishing = [i for i, c in enumerate(chunks) if c.choices and c.choices[0].finish_reason]
        assert [i for i, r in enumerate(reported) if r] == finishing  # that chunk only
        assert reported[finishing[0]] == pytest.approx({"top_p": 0.9})
        stream = client.completions.create(
            model=MODEL, prompt=["Hi", "Yo"], max_tokens=3, stream=True
        )
        per_choice = [c.model_extra.get("sampling_defaults_applied") for c in stream if c.choices]
        assert [r for r in per_choice if r] == [pytest.approx(CARD)] * 2  # each prompt's end
