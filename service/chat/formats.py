"""Chat conventions as data: model families, reasoning switches, tools, and reading the output.

A family (from `families.yaml`) says how a request's reasoning mode becomes part of the prompt.
`OutputSplitter` separates streamed model text into reasoning (`<think>...</think>`), answer
text and tool calls (`<TOOLCALL>[...]</TOOLCALL>`), holding back only what could be a tag.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from importlib import resources
from typing import Any

import jsonschema
import yaml

from service.chat.sampling import family_defaults
from service.runtime.interface import RequestError
from service.runtime.tokenizer import ChatMessage

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOLS_OPEN, TOOLS_CLOSE = "<TOOLCALL>", "</TOOLCALL>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<TOOL_RESPONSE>", "</TOOL_RESPONSE>"


class Reasoning(StrEnum):
    """What the client asked for."""

    DEFAULT = "default"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True)
class Family:
    """One model family's chat conventions."""

    name: str
    template_markers: tuple[str, ...]
    reasoning_switch: str | None  # "system_prompt", "system_suffix" or None (unsupported)
    reasoning_on: str = ""
    reasoning_off: str = ""
    reasoning_default: Reasoning = Reasoning.OFF
    tools_in_system: bool = False
    # Sampling defaults per reasoning mode, as the model card recommends (service/chat/sampling.py).
    sampling_on: Mapping[str, Any] = field(default_factory=dict)
    sampling_off: Mapping[str, Any] = field(default_factory=dict)

    @property
    def supports_reasoning(self) -> bool:
        """Whether the family has a reasoning switch at all."""
        return self.reasoning_switch is not None

    def reasoning_enabled(self, asked: Reasoning) -> bool:
        """Whether the model will think for this request."""
        if not self.supports_reasoning:
            return False
        return (self.reasoning_default if asked is Reasoning.DEFAULT else asked) is Reasoning.ON


def load_families() -> list[Family]:
    """The families of the shipped families.yaml, in order (`generic` last)."""
    raw = yaml.safe_load(resources.files("service.chat").joinpath("families.yaml").read_text())
    families = []
    for name, entry in raw["families"].items():
        reasoning = entry.get("reasoning") or {}
        sampling_on, sampling_off = family_defaults(entry.get("sampling"))
        families.append(
            Family(
                name=name,
                template_markers=tuple(entry.get("template_markers", [])),
                reasoning_switch=reasoning.get("switch"),
                reasoning_on=reasoning.get("when_on", ""),
                reasoning_off=reasoning.get("when_off", ""),
                reasoning_default=Reasoning(reasoning.get("default", "off")),
                tools_in_system=bool(entry.get("tools_in_system", False)),
                sampling_on=sampling_on,
                sampling_off=sampling_off,
            )
        )
    return families


def family_of(chat_template: str | None, families: Sequence[Family]) -> Family:
    """The first family whose markers all appear in the chat template."""
    template = chat_template or ""
    for family in families:
        if all(marker in template for marker in family.template_markers):
            return family
    raise ValueError("families.yaml must end with a family without markers")


@dataclass(frozen=True)
class ToolSpec:
    """A function the model may call."""

    name: str
    description: str
    parameters: dict[str, Any]


def validate_tools(tools: Sequence[ToolSpec]) -> None:
    """Refuse tools without a name or whose parameters are not a JSON-schema object."""
    for index, tool in enumerate(tools):
        if not tool.name.strip():
            raise RequestError(f"tools[{index}].name must not be empty")
        if tool.parameters and tool.parameters.get("type", "object") != "object":
            raise RequestError(
                f"tools[{index}].parameters must be a JSON schema of type 'object', got type "
                f"{tool.parameters.get('type')!r}"
            )
        properties = tool.parameters.get("properties", {})
        if not isinstance(properties, dict):
            raise RequestError(f"tools[{index}].parameters.properties must be an object")
        _check_schema(f"tools[{index}].parameters", tool.parameters)


_METASCHEMA = jsonschema.Draft7Validator(jsonschema.Draft7Validator.META_SCHEMA)


CACHED_SCHEMA_CHARS = 8192  # larger schemas are checked every time (the cache stays small)


def _check_schema(field: str, schema: dict[str, Any]) -> None:
    """Refuse a parameters object that is not a valid JSON schema (draft 7), naming where."""
    text = json.dumps(schema, sort_keys=True)
    if len(text) <= CACHED_SCHEMA_CHARS:
        problem = _cached_schema_problem(text)
    else:
        problem = _schema_problem(schema)
    if problem is not None:
        raise RequestError(f"{field}{problem}")


@functools.lru_cache(maxsize=1024)  # clients send the same tools with every turn: <= 8 MiB
def _cached_schema_problem(text: str) -> str | None:
    return _schema_problem(json.loads(text))


def _schema_problem(schema: dict[str, Any]) -> str | None:
    error = jsonschema.exceptions.best_match(_METASCHEMA.iter_errors(schema))
    if error is None:
        return None
    where = "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.path)
    return f"{where} is not a valid JSON schema: {error.message}"


def require_messages(messages: Sequence[ChatMessage]) -> None:
    """A conversation to render must hold a message (Chat, Tokenize, both APIs)."""
    if not messages:
        raise RequestError("messages must not be empty")


def prepare_messages(
    messages: Sequence[ChatMessage],
    family: Family,
    reasoning: Reasoning,
    tools: Sequence[ToolSpec],
) -> list[ChatMessage]:
    """The conversation as the template should see it: reasoning switch and tools applied."""
    require_messages(messages)
    if reasoning is not Reasoning.DEFAULT and not family.supports_reasoning:
        raise RequestError(
            f"model family {family.name!r} has no reasoning switch; "
            "allowed reasoning: REASONING_MODE_UNSPECIFIED"
        )
    system = [m.content for m in messages if m.role == "system"]
    turns = [_tool_markup(m) if family.tools_in_system else m for m in messages]
    turns = [m for m in turns if m.role != "system"]
    instructions = "\n\n".join(system)
    if tools and family.tools_in_system:
        listed = json.dumps(
            [
                {"name": t.name, "description": t.description, "parameters": t.parameters}
                for t in tools
            ]
        )
        instructions = f"{instructions}\n\n<AVAILABLE_TOOLS>{listed}</AVAILABLE_TOOLS>".strip()
    mode = family.reasoning_default if reasoning is Reasoning.DEFAULT else reasoning
    if family.reasoning_switch == "system_prompt":
        switch = family.reasoning_on if mode is Reasoning.ON else family.reasoning_off
        if instructions and turns and turns[0].role == "user":  # instructions go to the user
            turns[0] = ChatMessage("user", f"{instructions}\n\n{turns[0].content}")
        elif instructions:
            turns.insert(0, ChatMessage("user", instructions))
        return [ChatMessage("system", switch), *turns]
    if family.reasoning_switch == "system_suffix":
        switch = family.reasoning_on if mode is Reasoning.ON else family.reasoning_off
        instructions = f"{instructions}\n{switch}".strip()
    return ([ChatMessage("system", instructions)] if instructions else []) + turns


def asked_reasoning(
    messages: Sequence[ChatMessage], family: Family, asked: Reasoning
) -> tuple[Reasoning, tuple[ChatMessage, ...]]:
    """The reasoning mode a conversation asks for, and its messages without the switch text.

    NIM's clients switch reasoning in the system prompt, as the model card says: Nemotron v1's
    system prompt is exactly `detailed thinking on|off`, v1.5's holds `/think` or `/no_think`.
    That text is taken out (`prepare_messages` writes the switch itself); a mode set in the
    request's typed field wins over it.
    """
    if family.reasoning_switch is None:
        return asked, tuple(messages)
    found, kept = asked, []
    for message in messages:
        text = message.content
        if message.role == "system":
            for word, mode in (
                (family.reasoning_on, Reasoning.ON),
                (family.reasoning_off, Reasoning.OFF),
            ):
                pattern = rf"(?<!\S){re.escape(word)}(?!\S)"
                if re.search(pattern, text):
                    found = mode if asked is Reasoning.DEFAULT else asked
                    text = re.sub(pattern, "", text).strip()
            if not text:
                continue  # the message was only the switch
        kept.append(replace(message, content=text))
    return found, tuple(kept)


def _tool_markup(message: ChatMessage) -> ChatMessage:
    """An earlier tool call or tool result written as the Nemotron families write them."""
    if message.role == "assistant" and message.tool_calls:
        calls = [
            {"name": c["name"], "arguments": c.get("arguments", {})} for c in message.tool_calls
        ]
        markup = f"{TOOLS_OPEN}{json.dumps(calls, ensure_ascii=False)}{TOOLS_CLOSE}"
        return ChatMessage("assistant", f"{message.content}{markup}")
    if message.role == "tool" and not message.content.startswith(TOOL_RESPONSE_OPEN):
        return ChatMessage("tool", f"{TOOL_RESPONSE_OPEN}[{message.content}]{TOOL_RESPONSE_CLOSE}")
    return message


@dataclass
class SplitDelta:
    """New reasoning and answer text from one push."""

    reasoning: str = ""
    content: str = ""


@dataclass
class OutputSplitter:
    """Separates streamed model output into reasoning, answer and tool calls.

    `thinking` says whether the model starts inside a thinking block (it may or may not write
    the opening tag). Text that could still turn out to be a tag is held back.
    """

    thinking: bool
    _pending: str = ""
    _tool_text: str | None = None
    _started: bool = False  # the start of the output, where an opening tag may be, is past
    _after_think: bool = False  # right after </think>: newlines there belong to neither part
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    reasoning_text: str = ""
    content_text: str = ""

    def push(self, text: str) -> SplitDelta:
        """Add generated text; return what is now known to be reasoning or answer."""
        self._pending += text
        delta = SplitDelta()
        while self._pending:
            if not self._step(delta, final=False):
                break
        return delta

    def finish(self) -> SplitDelta:
        """Flush everything held back at the end of generation."""
        delta = SplitDelta()
        while self._pending and self._step(delta, final=True):
            pass
        if self._tool_text is not None:  # an unclosed tool block is answer text after all
            self._emit(delta, TOOLS_OPEN + self._tool_text, reasoning=False)
            self._tool_text = None
        return delta

    def _step(self, delta: SplitDelta, final: bool) -> bool:
        """Consume some pending text; False when the rest must wait for more."""
        if self._tool_text is not None:
            return self._collect_tools(final)
        if self.thinking:
            if not self._started:  # only the very start of the output may open the block
                if self._pending.startswith(THINK_OPEN):
                    self._pending = self._pending[len(THINK_OPEN) :]
                elif THINK_OPEN.startswith(self._pending) and not final:
                    return False  # it may still become the opening tag
                self._started = True
                return True
            return self._until(THINK_CLOSE, delta, reasoning=True, final=final)
        if self._after_think:
            self._pending = self._pending.lstrip("\n")
            if not self._pending:
                return False
            self._after_think = False
        return self._until(TOOLS_OPEN, delta, reasoning=False, final=final)

    def _until(self, tag: str, delta: SplitDelta, reasoning: bool, final: bool) -> bool:
        index = self._pending.find(tag)
        if index >= 0:
            self._emit(delta, self._pending[:index], reasoning)
            self._pending = self._pending[index + len(tag) :]
            if reasoning:
                self.thinking, self._after_think = False, True
            else:
                self._tool_text = ""
            return True
        keep = 0 if final else _partial_tag(self._pending, (tag,))
        self._emit(delta, self._pending[: len(self._pending) - keep], reasoning)
        self._pending = self._pending[len(self._pending) - keep :]
        return False

    def _collect_tools(self, final: bool) -> bool:
        text = self._tool_text + self._pending
        index = text.find(TOOLS_CLOSE)
        if index < 0:
            self._tool_text, self._pending = text, ""
            return False
        self._tool_text, self._pending = None, text[index + len(TOOLS_CLOSE) :]
        self.tool_calls.extend(_parse_tool_calls(text[:index]))
        return True

    def _emit(self, delta: SplitDelta, text: str, reasoning: bool) -> None:
        if reasoning:
            delta.reasoning += text
            self.reasoning_text += text
        else:
            delta.content += text
            self.content_text += text


def _partial_tag(text: str, tags: Sequence[str]) -> int:
    """Length of the longest end of `text` that begins one of `tags`."""
    for length in range(min(len(text), max(len(t) for t in tags) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) for tag in tags):
            return length
    return 0


def _parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """The calls in a `<TOOLCALL>` block: a JSON list of {name, arguments}."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return []
    calls = calls if isinstance(calls, list) else [calls]
    return [
        {"name": str(c.get("name", "")), "arguments": c.get("arguments") or {}}
        for c in calls
        if isinstance(c, dict)
    ]
