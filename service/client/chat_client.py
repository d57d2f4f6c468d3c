"""A chat client of the GenerationService: channel, conversation, and streamed turns printed.

The conversation is kept on the client and sent whole with every turn (the server keeps no
session). A turn streams `ChatStream`: answer text goes to one stream and reasoning to another,
so a script reading standard output gets only the answer. Leaving a turn early, by Ctrl-C or an
error, cancels its call, and the server aborts the request.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TextIO

import grpc
from google.protobuf import json_format, struct_pb2
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.client.tls import ClientTls
from service.client.tls import open_channel as tls_channel

# The choices users type, as the API's enum.
REASONING_MODES: dict[str, int] = {
    "default": pb.REASONING_MODE_UNSPECIFIED,
    "on": pb.REASONING_MODE_ON,
    "off": pb.REASONING_MODE_OFF,
}
# What a user is told when a turn ended for another reason than the model finishing its answer.
FINISH_NOTES: dict[int, str] = {
    pb.FINISH_REASON_LENGTH: "[stopped at the token limit: --max-tokens raises it]",
    pb.FINISH_REASON_DEADLINE: "[stopped at the deadline]",
    pb.FINISH_REASON_ABORTED: "[aborted by the server]",
}
# Status codes whose message is clearer with the server's address in it.
_ADDRESS_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True)
class Credentials:
    """TLS material and the API key for a server; secrets never appear in a repr."""

    api_key: str | None = field(default=None, repr=False)
    tls: ClientTls = field(default_factory=ClientTls)

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call: the API key as a bearer token, when there is one."""
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()


def open_channel(address: str, credentials: Credentials) -> grpc.Channel:
    """A channel to `address`, with TLS (and a client certificate) when configured."""
    agent = ("grpc.primary_user_agent", f"nemotron-chat/{metadata.version('nemotron-serve')}")
    return tls_channel(address, credentials.tls, [agent])


def is_loopback(address: str) -> bool:
    """Whether `host:port` names this machine (where a key in clear text stays local)."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class TurnOptions:
    """What every turn asks for besides the conversation: sampling, limits, tools."""

    sampling: pb.SamplingParams = field(default_factory=pb.SamplingParams)
    limits: pb.GenerationLimits = field(default_factory=pb.GenerationLimits)
    reasoning_budget_tokens: int | None = None
    tools: tuple[pb.Tool, ...] = ()


def tools_from_json(entries: Any) -> tuple[pb.Tool, ...]:
    """Tools from a JSON list of {name, description, parameters} (or OpenAI's function form)."""
    if not isinstance(entries, list):
        raise ValueError("tools must be a JSON list")
    tools = []
    for index, entry in enumerate(entries):
        spec = entry.get("function", entry) if isinstance(entry, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"tool {index} needs a string 'name'")
        if not isinstance(spec.get("parameters") or {}, dict):
            raise ValueError(f"tool {index}: 'parameters' must be a JSON schema object")
        parameters = struct_pb2.Struct()
        parameters.update(spec.get("parameters") or {})
        tools.append(
            pb.Tool(
                name=spec["name"],
                description=str(spec.get("description", "")),
                parameters=parameters,
            )
        )
    return tuple(tools)


@dataclass
class Conversation:
    """The turns so far (system prompt apart), sent whole with each request."""

    system: str | None = None
    reasoning: str = "default"
    turns: list[pb.ChatMessage] = field(default_factory=list)

    def messages(self, prompt: str) -> list[pb.ChatMessage]:
        """The messages of a request adding the user's `prompt`."""
        system = [pb.ChatMessage(role=pb.ROLE_SYSTEM, content=self.system)] if self.system else []
        return [*system, *self.turns, pb.ChatMessage(role=pb.ROLE_USER, content=prompt)]

    def record(self, prompt: str, answer: str) -> None:
        """Keep a finished turn (the answer without its reasoning, as chat templates expect)."""
        self.turns.append(pb.ChatMessage(role=pb.ROLE_USER, content=prompt))
        self.turns.append(pb.ChatMessage(role=pb.ROLE_ASSISTANT, content=answer))

    def reset(self) -> None:
        """Forget the turns; the system prompt and reasoning mode stay."""
        self.turns.clear()


def chat_request(
    conversation: Conversation, prompt: str, options: TurnOptions
) -> pb.ChatStreamRequest:
    """The request for the next turn of `conversation`."""
    request = pb.ChatStreamRequest(
        messages=conversation.messages(prompt),
        reasoning=REASONING_MODES[conversation.reasoning],
        tools=options.tools,
        sampling=options.sampling,
        limits=options.limits,
    )
    if options.reasoning_budget_tokens is not None:
        request.reasoning_budget_tokens = options.reasoning_budget_tokens
    return request


@dataclass
class TurnPrinter:
    """Writes a turn as it streams: the answer to `out`, the reasoning (when shown) to `err`.

    Reasoning is dimmed when `color` is set (a terminal), else framed by `[reasoning]` and
    `[/reasoning]` lines.
    """

    out: TextIO
    err: TextIO
    show_reasoning: bool = False
    color: bool = False
    _thinking: bool = False
    _line_open: bool = False
    _answered: bool = False
    _last: str = "\n"

    def reasoning(self, text: str) -> None:
        """Show thinking text."""
        if not (self.show_reasoning and text):
            return
        if not self._thinking:
            self._thinking = True
            self._write(self.err, DIM if self.color else "[reasoning]\n")
        self._write(self.err, text)

    def content(self, text: str) -> None:
        """Show answer text."""
        if text:
            self._end_reasoning()
            self._write(self.out, text)
            self._line_open = self._answered = True

    def tool_calls(self, calls: Iterable[pb.ToolCall]) -> None:
        """Show each call as its name and its arguments' JSON, one a line."""
        for call in calls:
            self._end_line()
            arguments = json.dumps(
                _whole_numbers(json_format.MessageToDict(call.arguments)),
                ensure_ascii=False,
                sort_keys=True,  # a Struct keeps no order
            )
            self._write(self.out, f"[tool call] {call.name} {arguments}\n")
            self._answered = True

    def finish(self) -> None:
        """End the turn: every turn ends its last line, an empty answer included."""
        self._end_reasoning()
        if self._line_open or not self._answered:
            self._write(self.out, "\n")
        self._line_open = False

    def interrupt(self) -> None:
        """End a turn cut short, leaving the terminal on a fresh line."""
        self._end_reasoning()
        self._end_line()

    def _end_reasoning(self) -> None:
        if self._thinking:
            self._thinking = False
            newline = "" if self._last == "\n" else "\n"
            self._write(self.err, f"{RESET}{newline}" if self.color else f"{newline}[/reasoning]\n")

    def _end_line(self) -> None:
        if self._line_open:
            self._write(self.out, "\n")
            self._line_open = False

    def _write(self, stream: TextIO, text: str) -> None:
        stream.write(text)
        stream.flush()
        self._last = text[-1:] or self._last


def _whole_numbers(value: Any) -> Any:
    """JSON values with integral numbers as ints (a Struct holds every number as a double)."""
    if isinstance(value, dict):
        return {k: _whole_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_numbers(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def collect(
    responses: Iterable[pb.ChatStreamResponse], printer: TurnPrinter | None
) -> pb.ChatResponse:
    """Fold a turn's stream into the whole turn, printing it as it comes when asked to."""
    final = pb.ChatResponse()
    content: list[str] = []
    reasoning: list[str] = []
    for message in responses:
        final.request_id = message.request_id or final.request_id
        content.append(message.content)
        reasoning.append(message.reasoning)
        final.tool_calls.extend(message.tool_calls)
        if printer is not None:
            printer.reasoning(message.reasoning)
            printer.content(message.content)
            printer.tool_calls(message.tool_calls)
        if message.finish_reason:
            final.finish_reason = message.finish_reason
        if message.HasField("usage"):
            final.usage.CopyFrom(message.usage)
        if message.HasField("timings"):
            final.timings.CopyFrom(message.timings)
        if message.HasField("sampling_defaults_applied"):
            final.sampling_defaults_applied.CopyFrom(message.sampling_defaults_applied)
    final.content, final.reasoning = "".join(content), "".join(reasoning)
    if printer is not None:
        printer.finish()
    return final


@dataclass
class ChatClient:
    """Runs the turns of one conversation against a server."""

    stub: pb_grpc.GenerationServiceStub
    credentials: Credentials
    options: TurnOptions
    conversation: Conversation
    timeout_s: float | None = None

    def turn(self, prompt: str, printer: TurnPrinter | None) -> pb.ChatResponse:
        """Ask for the assistant's answer to `prompt`; the turn is kept only once finished."""
        call = self.stub.ChatStream(
            chat_request(self.conversation, prompt, self.options),
            timeout=self.timeout_s,
            metadata=self.credentials.call_metadata(),
        )
        try:
            response = collect(call, printer)
        except BaseException:  # Ctrl-C included: the cancelled call makes the server abort
            call.cancel()
            raise
        self.conversation.record(prompt, response.content)
        return response

    def model_info(self) -> pb.GetModelInfoResponse:
        """The server's model and engine."""
        return self.stub.GetModelInfo(
            pb.GetModelInfoRequest(),
            timeout=self.timeout_s or 10.0,
            metadata=self.credentials.call_metadata(),
        )


def describe_rpc_error(error: grpc.RpcError, address: str, timeout_s: float | None = None) -> str:
    """`STATUS_CODE: details`, naming the server where the problem may be reaching it."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (error.details() if callable(getattr(error, "details", None)) else "") or ""
    if code is grpc.StatusCode.DEADLINE_EXCEEDED and timeout_s is not None:
        details = f"{details} (server {address}, --timeout {timeout_s:g} s)"
    elif code in _ADDRESS_CODES:
        details = f"{details} (server {address})"
    return f"{code.name}: {details.strip()}"


def usage_line(response: pb.ChatResponse) -> str:
    """Token counts, timings and the finish reason of a turn, on one line."""
    usage, timings = response.usage, response.timings
    decode_ms = timings.total_ms - timings.time_to_first_token_ms
    rate = (
        f" ({(usage.completion_tokens - 1) * 1000 / decode_ms:.1f} tokens/s)"
        if usage.completion_tokens > 1 and decode_ms > 0
        else ""
    )
    finish = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
    applied = json_format.MessageToDict(
        response.sampling_defaults_applied, preserving_proto_field_name=True
    )
    defaults = ", ".join(
        f"{name} {value:g}" if isinstance(value, float | int) else f"{name} {value}"
        for name, value in sorted(applied.items())
    )
    return (
        f"[usage] prompt {usage.prompt_tokens} tokens ({usage.cached_prompt_tokens} cached), "
        f"completion {usage.completion_tokens} tokens ({usage.reasoning_tokens} reasoning) | "
        f"[timings] queue {timings.queue_ms:.1f} ms, ttft {timings.time_to_first_token_ms:.1f} "
        f"ms, total {timings.total_ms:.1f} ms{rate} | finish {finish}"
        + (f" | [model's sampling defaults] {defaults}" if defaults else "")
    )


def response_json(response: pb.ChatResponse) -> str:
    """The turn as one line of JSON: proto field names, every field, enums by name."""
    return json_format.MessageToJson(
        response,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        indent=None,
        ensure_ascii=False,
    )
