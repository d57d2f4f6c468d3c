"""Chat turns over an engine: the prompt it gets, the reasoning budget, usage and finish reasons."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.chat.formats import Reasoning, ToolSpec, family_of, load_families
from service.chat.turns import ChatContext, ChatDelta, ChatTurn, render_prompt, run_chat_turn
from service.runtime.interface import (
    FinishReason,
    RequestError,
    RequestFailedError,
    RequestLimits,
    Timings,
)
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.tokenizer import ChatMessage, TextTokenizer
from tests.service.chat.chat_templates import (
    BOS,
    CHATML_TOOLS_TEMPLATE,
    NEMOTRON_V1_5_TEMPLATE,
    byte_tokenizer,
)
from tests.service.scripted_engine import FIRST_TIMINGS, Reply, ScriptedEngine

QUESTION = (ChatMessage("system", "Be brief."), ChatMessage("user", "Capital of France?"))
SECOND_TIMINGS = Timings(0.02, 0.03, 0.25)
# Longer than any budget below: the thinking is cut while the model is still at it.
LONG_THINKING = "<think>Paris is the capital of France, and has been for a long time."
FORECAST = ToolSpec(
    "forecast", "Weather for a city.", {"type": "object", "properties": {"city": {}}}
)
FORECAST_CALL = '<TOOLCALL>[{"name": "forecast", "arguments": {"city": "Paris"}}]</TOOLCALL>'


@pytest.fixture(scope="module")
def v1_5_tokenizer(tmp_path_factory) -> TextTokenizer:
    return byte_tokenizer(tmp_path_factory.mktemp("v1_5"), NEMOTRON_V1_5_TEMPLATE)


@pytest.fixture(scope="module")
def chatml_tokenizer(tmp_path_factory) -> TextTokenizer:
    return byte_tokenizer(tmp_path_factory.mktemp("chatml"), CHATML_TOOLS_TEMPLATE)


def _turn(
    max_new_tokens: int | None = 100,
    budget: int | None = None,
    reasoning: Reasoning = Reasoning.DEFAULT,
    **fields,
) -> ChatTurn:
    options = RequestOptions(max_new_tokens=max_new_tokens)
    return ChatTurn("chat-1", QUESTION, reasoning, budget, options=options, **fields)


def _run(engine: ScriptedEngine, turn: ChatTurn) -> list[ChatDelta]:
    """All deltas of the turn; the family is the one the engine's chat template names."""
    family = family_of(engine.tokenizer.chat_template_source, load_families())

    async def collect() -> list[ChatDelta]:
        return [delta async for delta in run_chat_turn(ChatContext(engine, family), turn)]

    return asyncio.run(collect())


def _texts(deltas: list[ChatDelta]) -> tuple[str, str]:
    return "".join(d.reasoning for d in deltas), "".join(d.content for d in deltas)


@pytest.fixture
def budgeted(v1_5_tokenizer) -> tuple[ScriptedEngine, list[ChatDelta]]:
    """A v1.5 turn (reasoning on by default) whose thinking is cut at a budget of 16 tokens."""
    replies = [Reply(LONG_THINKING), Reply("Paris.", timings=SECOND_TIMINGS)]
    engine = ScriptedEngine(v1_5_tokenizer, replies)
    return engine, _run(engine, _turn(max_new_tokens=100, budget=16))


# --- the prompt ------------------------------------------------------------------------------


def test_the_engine_gets_the_prompt_rendered_with_the_family_switch(v1_5_tokenizer):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply("Paris.")])
    _run(engine, _turn(reasoning=Reasoning.OFF))
    assert v1_5_tokenizer.decode(engine.requests[0].prompt_ids) == (
        f"{BOS}<|start_header_id|>system<|end_header_id|>\n\nBe brief.\n/no_think<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nCapital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n\n</think>\n\n"
    )


def test_a_family_without_tools_in_the_system_turn_gets_them_as_template_tools(
    chatml_tokenizer,
):
    engine = ScriptedEngine(chatml_tokenizer, [Reply("Paris.")])
    _run(engine, _turn(tools=(FORECAST,)))
    prompt = chatml_tokenizer.decode(engine.requests[0].prompt_ids)
    listed = prompt.removeprefix("<|im_start|>tools\n").split("<|im_end|>")[0]
    assert json.loads(listed) == [
        {
            "type": "function",
            "function": {
                "name": "forecast",
                "description": "Weather for a city.",
                "parameters": FORECAST.parameters,
            },
        }
    ]


def test_a_turn_without_tools_passes_no_tools_to_the_template(chatml_tokenizer):
    engine = ScriptedEngine(chatml_tokenizer, [Reply("Paris.")])
    _run(engine, _turn())
    assert chatml_tokenizer.decode(engine.requests[0].prompt_ids).startswith("<|im_start|>system")


def test_invalid_tools_are_refused_before_the_engine_is_asked(chatml_tokenizer):
    engine = ScriptedEngine(chatml_tokenizer, [Reply("Paris.")])
    nameless = ToolSpec("", "d", {})
    with pytest.raises(RequestError, match=r"tools\[0\]\.name must not be empty"):
        _run(engine, _turn(tools=(nameless,)))
    assert engine.requests == []


def test_chat_passes_its_options_logprobs_included_to_the_engine(chatml_tokenizer):
    engine = ScriptedEngine(chatml_tokenizer, [Reply("Paris.")])
    sampling = SamplingParams(temperature=0.6, top_p=0.95, seed=7)
    options = RequestOptions(sampling, max_new_tokens=20, stop_strings=("\n",), logprobs=3)
    _run(engine, ChatTurn("chat-1", QUESTION, options=options))
    sent = engine.requests[0].options
    assert sent.logprobs == 3  # the HTTP API returns them (the gRPC Chat reply has no field)
    assert (sent.sampling, sent.max_new_tokens, sent.stop_strings) == (sampling, 20, ("\n",))


# --- the reasoning budget --------------------------------------------------------------------


def test_a_budget_limits_the_first_generation_to_the_budget(budgeted):
    engine, _ = budgeted
    assert engine.requests[0].options.max_new_tokens == 16


def test_thinking_cut_at_the_budget_is_closed_and_answered_by_a_second_generation(
    budgeted, v1_5_tokenizer
):
    engine, _ = budgeted
    first, second = engine.requests
    thinking = v1_5_tokenizer.encode(LONG_THINKING)[:16]
    closing = v1_5_tokenizer.encode("</think>\n\n")
    assert second.prompt_ids == (*first.prompt_ids, *thinking, *closing)
    assert second.request_id == "chat-1-answer"


def test_the_answer_generation_gets_the_token_limit_less_the_thinking(budgeted):
    engine, _ = budgeted
    assert engine.requests[1].options.max_new_tokens == 100 - 16


def test_a_budgeted_turn_streams_the_cut_thinking_as_reasoning_then_the_answer(budgeted):
    _, deltas = budgeted
    assert _texts(deltas) == (LONG_THINKING[len("<think>") : 16], "Paris.")
    assert deltas[-1].finish_reason is FinishReason.STOP


def test_usage_of_a_budgeted_turn_sums_both_generations(budgeted):
    engine, deltas = budgeted
    usage = deltas[-1].usage
    assert usage.prompt_tokens == len(engine.requests[0].prompt_ids)
    assert usage.completion_tokens == 16 + len("Paris.")
    assert usage.reasoning_tokens == len(LONG_THINKING[len("<think>") : 16])


def test_timings_of_a_budgeted_turn_add_up_both_generations(budgeted):
    _, deltas = budgeted
    timings = deltas[-1].timings
    assert (timings.queue_s, timings.time_to_first_token_s) == (0.01, 0.05)  # the first's
    assert timings.total_s == pytest.approx(FIRST_TIMINGS.total_s + SECOND_TIMINGS.total_s)


def test_the_answer_gets_the_room_left_less_the_thinking_when_no_limit_is_set(v1_5_tokenizer):
    family = family_of(v1_5_tokenizer.chat_template_source, load_families())
    probe = ChatContext(ScriptedEngine(v1_5_tokenizer, []), family)
    prompt = len(render_prompt(probe, _turn()))
    room = RequestLimits(256, max_seq_len=prompt + 40, max_kv_tokens=10_000)
    replies = [Reply(LONG_THINKING), Reply("Paris.")]
    engine = ScriptedEngine(v1_5_tokenizer, replies, limits=room)
    _run(engine, _turn(max_new_tokens=None, budget=16))
    assert [r.options.max_new_tokens for r in engine.requests] == [16, 40 - 16]


def test_thinking_that_ends_within_the_budget_needs_one_generation(v1_5_tokenizer):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply("<think>Easy.</think>Paris.")])
    deltas = _run(engine, _turn(budget=64))
    assert len(engine.requests) == 1
    assert _texts(deltas) == ("Easy.", "Paris.")
    assert deltas[-1].finish_reason is FinishReason.STOP


def test_an_answer_after_thinking_within_the_budget_is_not_cut_at_the_budget(v1_5_tokenizer):
    replies = [Reply("<think>Easy.</think>The capital is Paris."), Reply(" Done.")]
    engine = ScriptedEngine(v1_5_tokenizer, replies)
    deltas = _run(engine, _turn(max_new_tokens=100, budget=24))
    usage = deltas[-1].usage
    assert not (deltas[-1].finish_reason is FinishReason.LENGTH and usage.completion_tokens < 100)


def test_a_budget_at_or_above_the_token_limit_never_starts_a_second_generation(v1_5_tokenizer):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply(LONG_THINKING)])
    deltas = _run(engine, _turn(max_new_tokens=20, budget=200))
    assert [r.options.max_new_tokens for r in engine.requests] == [20]
    assert _texts(deltas) == (LONG_THINKING[len("<think>") : 20], "")
    assert deltas[-1].finish_reason is FinishReason.LENGTH


def test_the_budget_is_ignored_when_reasoning_is_off(v1_5_tokenizer):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply("Paris is the capital.")])
    deltas = _run(engine, _turn(max_new_tokens=50, budget=4, reasoning=Reasoning.OFF))
    assert [r.options.max_new_tokens for r in engine.requests] == [50]
    assert _texts(deltas) == ("", "Paris is the capital.")


@pytest.mark.parametrize("budget", [0, -5])
def test_a_budget_below_one_is_refused_before_the_engine_is_asked(v1_5_tokenizer, budget):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply("Paris.")])
    with pytest.raises(RequestError, match=rf"reasoning_budget_tokens {budget} must be >= 1"):
        _run(engine, _turn(budget=budget))
    assert engine.requests == []


# --- finish reasons and failures -------------------------------------------------------------


def test_tool_calls_in_a_turn_that_stopped_finish_with_tool_calls(v1_5_tokenizer):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply(f"<think>Ask.</think>{FORECAST_CALL}")])
    final = _run(engine, _turn(tools=(FORECAST,)))[-1]
    (call,) = final.tool_calls
    assert call.pop("id").startswith("call_")  # the id both APIs carry, for the tool's answer
    assert call == {"name": "forecast", "arguments": {"city": "Paris"}}
    assert final.finish_reason is FinishReason.TOOL_CALLS


def test_tool_calls_in_a_turn_cut_by_length_keep_the_length_reason(v1_5_tokenizer):
    text = f"<think>Ask.</think>{FORECAST_CALL} and then more text"
    engine = ScriptedEngine(v1_5_tokenizer, [Reply(text)])
    final = _run(engine, _turn(max_new_tokens=len(text) - 5, tools=(FORECAST,)))[-1]
    assert len(final.tool_calls) == 1
    assert final.finish_reason is FinishReason.LENGTH


def test_an_engine_error_fails_the_turn_with_the_engines_message(v1_5_tokenizer):
    engine = ScriptedEngine(v1_5_tokenizer, [Reply("", FinishReason.ERROR, error="step failed")])
    with pytest.raises(RequestFailedError, match="step failed"):
        _run(engine, _turn())
