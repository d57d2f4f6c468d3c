"""Chat formats: model families and their reasoning switches, tools, and the output splitter."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from service.chat.formats import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOLS_CLOSE,
    TOOLS_OPEN,
    Family,
    OutputSplitter,
    Reasoning,
    ToolSpec,
    family_of,
    load_families,
    prepare_messages,
    validate_tools,
)
from service.runtime.interface import RequestError
from service.runtime.tokenizer import ChatMessage
from tests.service.chat.chat_templates import (
    BOS,
    CHATML_TOOLS_TEMPLATE,
    NEMOTRON_V1_5_TEMPLATE,
    NEMOTRON_V1_TEMPLATE,
    byte_tokenizer,
)

FAMILIES = load_families()
BY_NAME = {f.name: f for f in FAMILIES}
V1, V1_5, GENERIC = BY_NAME["nemotron-v1"], BY_NAME["nemotron-v1.5"], BY_NAME["generic"]
FORECAST = ToolSpec(
    "forecast",
    "Weather forecast for a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)
SYSTEM = ChatMessage("system", "Be brief.")
QUESTION = ChatMessage("user", "Capital of France?")


# --- families -------------------------------------------------------------------------------


def test_shipped_families_are_the_nemotron_ones_then_a_catch_all_generic():
    assert [f.name for f in FAMILIES] == ["nemotron-v1", "nemotron-v1.5", "generic"]
    assert FAMILIES[-1].template_markers == ()


@pytest.mark.parametrize(
    ("template", "name"),
    [
        (NEMOTRON_V1_TEMPLATE, "nemotron-v1"),
        (NEMOTRON_V1_5_TEMPLATE, "nemotron-v1.5"),
        (CHATML_TOOLS_TEMPLATE, "generic"),
        (None, "generic"),
    ],
)
def test_family_is_chosen_by_the_markers_in_the_chat_template(template, name):
    assert family_of(template, FAMILIES).name == name


def test_family_list_without_a_catch_all_is_an_error():
    with pytest.raises(ValueError, match="must end with a family without markers"):
        family_of(CHATML_TOOLS_TEMPLATE, FAMILIES[:-1])


@pytest.mark.parametrize(
    ("family", "asked", "enabled"),
    [
        (V1, Reasoning.DEFAULT, False),
        (V1, Reasoning.ON, True),
        (V1_5, Reasoning.DEFAULT, True),
        (V1_5, Reasoning.OFF, False),
        (GENERIC, Reasoning.DEFAULT, False),
    ],
)
def test_reasoning_is_enabled_by_the_request_or_the_family_default(family, asked, enabled):
    assert family.reasoning_enabled(asked) is enabled


# --- prepare_messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "switch"),
    [
        (Reasoning.ON, "detailed thinking on"),
        (Reasoning.OFF, "detailed thinking off"),
        (Reasoning.DEFAULT, "detailed thinking off"),
    ],
)
def test_v1_system_prompt_is_exactly_the_switch(asked, switch):
    prepared = prepare_messages([SYSTEM, QUESTION], V1, asked, ())
    assert prepared[0] == ChatMessage("system", switch)


def test_v1_moves_all_system_instructions_into_the_first_user_turn():
    second = ChatMessage("system", "Answer in French.")
    prepared = prepare_messages([SYSTEM, QUESTION, second], V1, Reasoning.ON, ())
    assert prepared == [
        ChatMessage("system", "detailed thinking on"),
        ChatMessage("user", "Be brief.\n\nAnswer in French.\n\nCapital of France?"),
    ]


def test_v1_instructions_become_a_user_turn_when_the_conversation_starts_otherwise():
    greeting = ChatMessage("assistant", "Hello!")
    prepared = prepare_messages([SYSTEM, greeting, QUESTION], V1, Reasoning.OFF, ())
    assert prepared == [
        ChatMessage("system", "detailed thinking off"),
        ChatMessage("user", "Be brief."),
        greeting,
        QUESTION,
    ]


def test_v1_lists_tools_with_the_instructions_in_the_user_turn():
    prepared = prepare_messages([QUESTION], V1, Reasoning.ON, [FORECAST])
    listed, question = prepared[1].content.split("\n\n")
    assert prepared[0].content == "detailed thinking on"
    assert _available_tools(listed) == [_tool_json(FORECAST)]
    assert question == QUESTION.content


@pytest.mark.parametrize(
    ("asked", "system"),
    [
        (Reasoning.DEFAULT, "Be brief.\n/think"),
        (Reasoning.ON, "Be brief.\n/think"),
        (Reasoning.OFF, "Be brief.\n/no_think"),
    ],
)
def test_v1_5_appends_the_switch_to_the_system_prompt(asked, system):
    prepared = prepare_messages([SYSTEM, QUESTION], V1_5, asked, ())
    assert prepared == [ChatMessage("system", system), QUESTION]


def test_v1_5_without_a_system_prompt_gets_one_holding_only_the_switch():
    prepared = prepare_messages([QUESTION], V1_5, Reasoning.OFF, ())
    assert prepared == [ChatMessage("system", "/no_think"), QUESTION]


def test_v1_5_lists_tools_in_the_system_turn_before_the_switch():
    prepared = prepare_messages([SYSTEM, QUESTION], V1_5, Reasoning.DEFAULT, [FORECAST])
    instructions, rest = prepared[0].content.split("\n\n")
    listed, switch = rest.split("\n")
    assert (instructions, switch) == ("Be brief.", "/think")
    assert _available_tools(listed) == [_tool_json(FORECAST)]
    assert prepared[1:] == [QUESTION]


@pytest.mark.parametrize("asked", [Reasoning.ON, Reasoning.OFF])
def test_generic_family_refuses_a_reasoning_mode_naming_the_allowed_one(asked):
    with pytest.raises(RequestError, match="allowed reasoning: REASONING_MODE_UNSPECIFIED"):
        prepare_messages([QUESTION], GENERIC, asked, ())


def test_generic_family_keeps_the_conversation_and_leaves_tools_out_of_it():
    prepared = prepare_messages([SYSTEM, QUESTION], GENERIC, Reasoning.DEFAULT, [FORECAST])
    assert prepared == [SYSTEM, QUESTION]


def test_an_empty_conversation_is_refused():
    with pytest.raises(RequestError, match="messages must not be empty"):
        prepare_messages([], V1_5, Reasoning.DEFAULT, ())


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        (ToolSpec(" ", "d", {}), r"tools\[0\]\.name must not be empty"),
        (
            ToolSpec("f", "d", {"type": "object", "properties": []}),
            r"tools\[0\]\.parameters\.properties must be an object",
        ),
    ],
)
def test_tools_without_a_name_or_with_bad_properties_are_refused(tool, message):
    with pytest.raises(RequestError, match=message):
        validate_tools([tool])


def _available_tools(text: str) -> list[dict[str, Any]]:
    assert text.startswith("<AVAILABLE_TOOLS>") and text.endswith("</AVAILABLE_TOOLS>")
    return json.loads(text.removeprefix("<AVAILABLE_TOOLS>").removesuffix("</AVAILABLE_TOOLS>"))


def _tool_json(tool: ToolSpec) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "parameters": tool.parameters}


# --- rendered prompts -----------------------------------------------------------------------


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def _rendered(tmp_path, template: str, family: Family, asked: Reasoning) -> str:
    tokenizer = byte_tokenizer(tmp_path, template)
    prepared = prepare_messages([SYSTEM, QUESTION], family, asked, ())
    return tokenizer.decode(tokenizer.render_chat(prepared))


def test_v1_prompt_has_the_switch_as_system_turn_and_instructions_in_the_user_turn(tmp_path):
    assert _rendered(tmp_path, NEMOTRON_V1_TEMPLATE, V1, Reasoning.ON) == (
        f"{BOS}{_header('system')}detailed thinking on<|eot_id|>"
        f"{_header('user')}Be brief.\n\nCapital of France?<|eot_id|>{_header('assistant')}"
    )


def test_v1_5_prompt_with_reasoning_off_ends_with_an_empty_think_block(tmp_path):
    assert _rendered(tmp_path, NEMOTRON_V1_5_TEMPLATE, V1_5, Reasoning.OFF) == (
        f"{BOS}{_header('system')}Be brief.\n/no_think<|eot_id|>"
        f"{_header('user')}Capital of France?<|eot_id|>"
        f"{_header('assistant')}<think>\n\n</think>\n\n"
    )


def test_v1_5_prompt_by_default_leaves_the_thinking_to_the_model(tmp_path):
    rendered = _rendered(tmp_path, NEMOTRON_V1_5_TEMPLATE, V1_5, Reasoning.DEFAULT)
    assert f"{_header('system')}Be brief.\n/think<|eot_id|>" in rendered
    assert rendered.endswith(_header("assistant"))


# --- the output splitter: examples ----------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """What a splitter made of a whole output."""

    reasoning: str
    content: str
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _split(chunks: list[str], thinking: bool) -> Split:
    """Push `chunks` then finish; the streamed deltas must add up to the splitter's totals."""
    splitter = OutputSplitter(thinking=thinking)
    deltas = [splitter.push(chunk) for chunk in chunks] + [splitter.finish()]
    reasoning = "".join(d.reasoning for d in deltas)
    content = "".join(d.content for d in deltas)
    assert (reasoning, content) == (splitter.reasoning_text, splitter.content_text)
    return Split(reasoning, content, splitter.tool_calls)


@pytest.mark.parametrize("opening", ["", THINK_OPEN])
def test_the_opening_think_tag_is_optional_when_the_turn_starts_thinking(opening):
    split = _split([opening, "Paris is the capital.", THINK_CLOSE, "Paris."], thinking=True)
    assert split == Split("Paris is the capital.", "Paris.")


def test_reasoning_keeps_its_own_leading_newline():
    assert _split(["<think>\nHmm.\n</think>Paris."], thinking=True).reasoning == "\nHmm.\n"


def test_newlines_right_after_the_think_block_are_dropped_from_the_answer():
    assert _split(["Hmm.</think>\n\n\nParis."], thinking=True).content == "Paris."


def test_only_newlines_are_dropped_after_the_think_block():
    assert _split(["Hmm.</think> \nParis."], thinking=True).content == " \nParis."


def test_newlines_after_the_think_block_are_dropped_when_they_arrive_as_their_own_token():
    assert _split(["Hmm.", THINK_CLOSE, "\n\n", "Paris."], thinking=True).content == "Paris."


def test_a_think_tag_inside_the_reasoning_is_kept_whatever_the_token_boundaries():
    whole = _split(["I write <think> here.</think>OK"], thinking=True)
    assert whole.reasoning == "I write <think> here."
    assert _split(["I write ", "<think> here.", "</think>OK"], thinking=True) == whole


def test_text_that_could_start_a_tag_is_held_back_until_it_cannot():
    splitter = OutputSplitter(thinking=False)
    assert splitter.push("Hello <TOOL").content == "Hello "
    assert splitter.push("BOX").content == "<TOOLBOX"


def test_text_that_cannot_start_a_tag_is_passed_on_at_once():
    assert OutputSplitter(thinking=False).push("a < b, c<d").content == "a < b, c<d"


def test_reasoning_holds_back_a_partial_closing_tag():
    splitter = OutputSplitter(thinking=True)
    assert splitter.push("Hmm.</thi").reasoning == "Hmm."
    delta = splitter.push("nk>Paris.")
    assert (delta.reasoning, delta.content) == ("", "Paris.")


def test_held_back_text_is_released_at_finish():
    splitter = OutputSplitter(thinking=False)
    splitter.push("Paris <TOOLC")
    assert splitter.finish().content == "<TOOLC"


def test_tool_calls_are_parsed_and_the_text_around_them_is_answer():
    call = '[{"name": "forecast", "arguments": {"city": "Paris"}}]'
    split = _split([f"Let me check.{TOOLS_OPEN}{call}{TOOLS_CLOSE} Done."], thinking=False)
    assert split == Split(
        "", "Let me check. Done.", [{"name": "forecast", "arguments": {"city": "Paris"}}]
    )


def test_an_unclosed_tool_block_comes_back_as_answer_text_at_finish():
    text = 'Checking.<TOOLCALL>[{"name": "forecast"'
    assert _split([text], thinking=False) == Split("", text)


def test_malformed_tool_json_gives_no_calls_and_drops_the_block():
    # Current behaviour, pinned: the block's text is neither a call nor answer text.
    split = _split(["Checking.<TOOLCALL>[{name: forecast}]</TOOLCALL> Done."], thinking=False)
    assert split == Split("", "Checking. Done.", [])


def test_a_single_tool_call_object_is_accepted_without_a_list():
    split = _split(['<TOOLCALL>{"name": "forecast", "arguments": {}}</TOOLCALL>'], False)
    assert split.tool_calls == [{"name": "forecast", "arguments": {}}]


def test_tool_entries_that_are_not_objects_are_skipped_and_missing_fields_are_empty():
    split = _split(['<TOOLCALL>[1, "x", {"arguments": null}]</TOOLCALL>'], thinking=False)
    assert split.tool_calls == [{"name": "", "arguments": {}}]


def test_tool_tags_inside_the_reasoning_are_reasoning_text():
    reasoning = 'I could call <TOOLCALL>[{"name": "f"}]</TOOLCALL>'
    split = _split([reasoning + THINK_CLOSE + "No."], thinking=True)
    assert split == Split(reasoning, "No.", [])


def test_think_tags_in_a_turn_without_reasoning_are_answer_text():
    assert _split(["<think>a</think>b"], thinking=False) == Split("", "<think>a</think>b")


# --- the output splitter: properties --------------------------------------------------------

# Pieces that look like the start of a tag, and text beyond ASCII.
TRICKY = ["<", "<thi", "</", "</thi", "</think", "<TOOL", "</TOOL", "<TOOLCALL", "think>"]
TRICKY += ["TOOLCALL>", ">", "\n", " ", "é", "中文", "🙂", "[{", '"', "Paris"]


def _text(*whole_tags: str) -> st.SearchStrategy[str]:
    pieces = st.one_of(st.sampled_from(TRICKY + list(whole_tags)), st.text(max_size=4))
    return st.lists(pieces, max_size=8).map("".join)


# Reasoning may hold an opening think tag (it is text there), never the closing one.
REASONING = _text(THINK_OPEN, TOOLS_OPEN, TOOLS_CLOSE).filter(lambda t: THINK_CLOSE not in t)
ANSWER = _text(THINK_OPEN, THINK_CLOSE, TOOLS_CLOSE)
ARGUMENTS = st.dictionaries(
    st.text(max_size=4), st.one_of(st.text(max_size=6), st.integers(), st.booleans()), max_size=2
)
CALLS = st.lists(
    st.fixed_dictionaries({"name": st.text(max_size=6), "arguments": ARGUMENTS}),
    min_size=1,
    max_size=2,
)


@dataclass(frozen=True)
class Output:
    """A model output and what it is made of."""

    thinking: bool
    text: str
    expected: Split


@st.composite
def answers(draw: st.DrawFn) -> tuple[str, Split]:
    """Answer text and tool-call blocks in any order, maybe ending in an unclosed block."""
    text, runs, calls = "", [""], []
    for kind in draw(st.lists(st.sampled_from(["text", "calls"]), max_size=5)):
        if kind == "text":
            piece = draw(ANSWER)
            text, runs[-1] = text + piece, runs[-1] + piece
        else:
            block = draw(CALLS)
            listed = json.dumps(block, ensure_ascii=False)
            assume(TOOLS_CLOSE not in listed)
            text += TOOLS_OPEN + draw(st.sampled_from(["", "\n", " "])) + listed + TOOLS_CLOSE
            runs.append("")
            calls += [{"name": c["name"], "arguments": c["arguments"]} for c in block]
    assume(all(TOOLS_OPEN not in run for run in runs))
    content = "".join(runs)
    if draw(st.booleans()):
        unclosed = TOOLS_OPEN + draw(ANSWER.filter(lambda t: TOOLS_CLOSE not in t))
        text, content = text + unclosed, content + unclosed
    return text, Split("", content, calls)


@st.composite
def outputs(draw: st.DrawFn) -> Output:
    """Reasoning (with or without its opening tag, closed or not), then an answer."""
    thinking = draw(st.booleans())
    if not thinking:
        text, expected = draw(answers())
        return Output(False, text, expected)
    reasoning, opening = draw(REASONING), draw(st.sampled_from(["", THINK_OPEN]))
    if not opening:  # without the tag, reasoning that starts with one is the tag
        assume(not reasoning.startswith(THINK_OPEN))
    text = opening + reasoning
    if not draw(st.booleans()):  # cut while thinking: all of it is reasoning
        return Output(True, text, Split(reasoning, ""))
    answer, expected = draw(answers())
    dropped = len(answer) - len(answer.lstrip("\n"))  # newlines right after </think>
    content = expected.content[dropped:]
    expected = Split(reasoning, content, expected.tool_calls)
    return Output(True, text + THINK_CLOSE + answer, expected)


@st.composite
def chunked(draw: st.DrawFn, text: str) -> list[str]:
    """`text` cut at arbitrary points, empty chunks included."""
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(edges)]


@settings(max_examples=150, deadline=None)
@given(output=outputs())
def test_a_whole_output_splits_into_its_reasoning_answer_and_calls_once_each(output):
    assert _split([output.text], output.thinking) == output.expected


@settings(max_examples=200, deadline=None)
@given(output=outputs(), data=st.data())
def test_any_token_boundaries_split_like_the_whole_output(output, data):
    chunks = data.draw(chunked(output.text), label="chunks")
    assert "".join(chunks) == output.text
    assert _split(chunks, output.thinking) == _split([output.text], output.thinking)


@settings(max_examples=80, deadline=None)
@given(output=outputs())
def test_one_character_at_a_time_splits_like_the_whole_output(output):
    assert _split(list(output.text), output.thinking) == output.expected
