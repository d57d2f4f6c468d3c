"""`nemotron-chat`: chat with a nemotron-serve server from a terminal or from a script.

With `--prompt` (repeatable) or prompts piped on standard input (one a line), it answers each
turn of one conversation and exits: answers on standard output; reasoning, usage and errors on
standard error; exit code 2 at the first error. On a terminal it is an interactive chat:
`/help` lists the commands, Ctrl-C stops the reply being written (the server aborts it) and
keeps the session, Ctrl-D or `/exit` leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.client.chat_client import (
    FINISH_NOTES,
    REASONING_MODES,
    ChatClient,
    Conversation,
    Credentials,
    TurnOptions,
    TurnPrinter,
    describe_rpc_error,
    is_loopback,
    open_channel,
    response_json,
    tools_from_json,
    usage_line,
)
from service.client.tls import ClientFlagError, add_tls_arguments, read_flag_file, tls_from_args

PROG = "nemotron-chat"
DEFAULT_ADDRESS = "localhost:50051"


@dataclass(frozen=True)
class Terminal:
    """What the process is attached to, which decides the mode and how output looks."""

    stdin_tty: bool
    stdout_tty: bool
    stderr_tty: bool
    color: bool

    @classmethod
    def detect(cls, environ: Mapping[str, str]) -> Terminal:
        """The standard streams of this process (`NO_COLOR` turns colour off)."""
        stderr_tty = sys.stderr.isatty()
        return cls(
            stdin_tty=sys.stdin.isatty(),
            stdout_tty=sys.stdout.isatty(),
            stderr_tty=stderr_tty,
            color=stderr_tty and "NO_COLOR" not in environ and environ.get("TERM") != "dumb",
        )


@dataclass(frozen=True)
class ClientConfig:
    """Everything the client needs, parsed once from flags and environment."""

    address: str
    credentials: Credentials
    options: TurnOptions
    prompts: tuple[str, ...]
    system: str | None
    reasoning: str
    show_reasoning: bool
    usage: bool
    json: bool
    timeout_s: float | None
    terminal: Terminal = field(repr=False)

    @property
    def interactive(self) -> bool:
        """A chat at a terminal, rather than answering prompts for a script."""
        return not self.prompts and self.terminal.stdin_tty


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--address", help=f"server host:port (env NEMOTRON_ADDRESS; default {DEFAULT_ADDRESS})")
    add("--prompt", action="append", default=[], help="a user turn; repeat for more turns")
    add("--system", help="system prompt")
    add(
        "--reasoning",
        choices=tuple(REASONING_MODES),
        default="default",
        help="thinking (default: the model family's)",
    )
    add("--reasoning-budget", type=int, metavar="N", help="close the thinking after N tokens")
    add("--temperature", type=float, help="0 is greedy; unset: the model's defaults")
    add("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    add("--max-tokens", type=int, metavar="N", help="generated tokens per turn at most")
    add("--seed", type=int, help="makes sampling reproducible")
    add("--tools", type=Path, metavar="FILE", help="JSON list of {name, description, parameters}")
    add(
        "--show-reasoning",
        action=argparse.BooleanOptionalAction,
        help="show the thinking on stderr (default: when stderr is a terminal)",
    )
    add("--usage", action="store_true", help="print tokens and timings to stderr after each turn")
    add("--json", action="store_true", help="print each turn as one line of ChatResponse JSON")
    add("--timeout", type=_positive, metavar="S", help="deadline of each turn in seconds")
    add("--api-key-file", type=Path, metavar="PATH", help="API key (else env NEMOTRON_API_KEY)")
    add_tls_arguments(parser)
    return parser


def parse_config(
    argv: Sequence[str], environ: Mapping[str, str], terminal: Terminal
) -> ClientConfig:
    """Parse flags and environment into a `ClientConfig` (exit 2 with a message when wrong)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sampling = pb.SamplingParams()
    for name in ("temperature", "top_p", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    limits = pb.GenerationLimits()
    if args.max_tokens is not None:
        limits.max_new_tokens = args.max_tokens
    options = TurnOptions(
        sampling=sampling,
        limits=limits,
        reasoning_budget_tokens=args.reasoning_budget,
        tools=_read_tools(parser, args.tools) if args.tools else (),
    )
    return ClientConfig(
        address=args.address or environ.get("NEMOTRON_ADDRESS") or DEFAULT_ADDRESS,
        credentials=_credentials(parser, args, environ),
        options=options,
        prompts=tuple(args.prompt),
        system=args.system,
        reasoning=args.reasoning,
        show_reasoning=terminal.stderr_tty if args.show_reasoning is None else args.show_reasoning,
        usage=args.usage,
        json=args.json,
        timeout_s=args.timeout,
        terminal=terminal,
    )


def _credentials(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> Credentials:
    try:
        tls = tls_from_args(args)
    except ClientFlagError as error:
        parser.error(str(error))
    if args.api_key_file is not None:
        api_key = _read(parser, "--api-key-file", args.api_key_file).decode("utf-8", "replace")
    else:
        api_key = environ.get("NEMOTRON_API_KEY", "")
    api_key = api_key.strip()
    if args.api_key_file is not None and not api_key:
        parser.error(f"--api-key-file: {args.api_key_file} is empty")
    if api_key and not (api_key.isascii() and api_key.isprintable()):
        parser.error("the API key must be printable ASCII (it is sent as a bearer token)")
    return Credentials(api_key=api_key or None, tls=tls)


def _read(parser: argparse.ArgumentParser, flag: str, path: Path) -> bytes:
    try:
        return read_flag_file(flag, path)
    except ClientFlagError as error:
        parser.error(str(error))


def _read_tools(parser: argparse.ArgumentParser, path: Path) -> tuple[pb.Tool, ...]:
    try:
        return tools_from_json(json.loads(_read(parser, "--tools", path)))
    except ValueError as err:  # JSONDecodeError included
        parser.error(f"--tools: {path}: {err}")


class CommandError(Exception):
    """A chat command that cannot be carried out (its message says what is allowed)."""


# A command gets the client and the text after its name; it returns whether to go on and a
# note for the user.
CommandHandler = Callable[[ChatClient, str], tuple[bool, str]]


def _reset(client: ChatClient, argument: str) -> tuple[bool, str]:
    client.conversation.reset()
    return True, "conversation cleared"


def _reasoning(client: ChatClient, argument: str) -> tuple[bool, str]:
    if argument:
        if argument not in REASONING_MODES:
            raise CommandError(f"/reasoning {argument}: use /reasoning {'|'.join(REASONING_MODES)}")
        client.conversation.reasoning = argument
    return True, f"reasoning: {client.conversation.reasoning}"


def _system(client: ChatClient, argument: str) -> tuple[bool, str]:
    client.conversation.system = argument or None
    return True, f"system prompt: {argument!r}" if argument else "system prompt cleared"


def _exit(client: ChatClient, argument: str) -> tuple[bool, str]:
    return False, ""


def _help(client: ChatClient, argument: str) -> tuple[bool, str]:
    return True, "\n".join(f"{usage:<28} {text}" for usage, (_, text) in COMMANDS.items())


COMMANDS: dict[str, tuple[CommandHandler, str]] = {
    "/reset": (_reset, "forget the conversation so far"),
    "/reasoning on|off|default": (_reasoning, "switch thinking (no argument: show it)"),
    "/system TEXT": (_system, "set the system prompt (no text: remove it)"),
    "/exit": (_exit, "leave (also /quit, Ctrl-D)"),
    "/quit": (_exit, "leave"),
    "/help": (_help, "this list"),
}
_BY_NAME = {usage.split()[0]: handler for usage, (handler, _) in COMMANDS.items()}


def run_command(client: ChatClient, line: str) -> tuple[bool, str]:
    """Carry out a `/command` line: whether to go on, and a note for the user."""
    name, _, argument = line.strip().partition(" ")
    handler = _BY_NAME.get(name)
    if handler is None:
        raise CommandError(f"unknown command {name}; /help lists them")
    return handler(client, argument.strip())


def answer(client: ChatClient, prompt: str, config: ClientConfig) -> pb.ChatResponse:
    """One turn: stream (or, with --json, print at the end) the answer, then usage or a note."""
    printer = None
    if not config.json:
        printer = TurnPrinter(sys.stdout, sys.stderr, config.show_reasoning, config.terminal.color)
    try:
        response = client.turn(prompt, printer)
    except BaseException:
        if printer is not None:
            printer.interrupt()
        raise
    if config.json:
        print(response_json(response), flush=True)
    if config.usage:
        print(usage_line(response), file=sys.stderr, flush=True)
    elif response.finish_reason in FINISH_NOTES:
        print(FINISH_NOTES[response.finish_reason], file=sys.stderr, flush=True)
    return response


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _script_prompts(config: ClientConfig) -> Iterator[str]:
    if config.prompts:
        yield from config.prompts
        return
    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
    for line in sys.stdin:
        if line.strip():
            yield line.strip()


def run_script(client: ChatClient, config: ClientConfig) -> int:
    """Answer each prompt of `--prompt` or standard input; 2 at the first error."""
    for prompt in _script_prompts(config):
        try:
            if prompt.startswith("/"):
                go_on, _ = run_command(client, prompt)
                if not go_on:
                    return 0
                continue
            answer(client, prompt, config)
        except grpc.RpcError as err:
            _error(describe_rpc_error(err, config.address, config.timeout_s))
            return 2
        except CommandError as err:
            _error(str(err))
            return 2
    return 0


def _read_line(prompt: str, terminal: Terminal) -> str:
    if terminal.stdout_tty:  # readline redraws the prompt it was given when editing
        return input(prompt)
    sys.stderr.write(prompt)
    sys.stderr.flush()
    return input()


def run_interactive(client: ChatClient, config: ClientConfig) -> int:
    """The terminal chat: a failed or cancelled turn is dropped and the session goes on."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (line editing and history for input())
    try:
        info = client.model_info()
    except grpc.RpcError as err:
        _error(describe_rpc_error(err, config.address, config.timeout_s))
        return 2
    print(
        f"{PROG}: {config.address} serves {info.model or 'a model'} (family {info.family}, "
        f"engine {info.engine_name}); /help lists commands, Ctrl-D leaves",
        file=sys.stderr,
    )
    while True:
        try:
            line = _read_line("> ", config.terminal).strip()
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D leaves)", file=sys.stderr)
            continue
        if line and not _interactive_turn(client, config, line):
            return 0


def _interactive_turn(client: ChatClient, config: ClientConfig, line: str) -> bool:
    """Run one line of the chat; whether to go on."""
    try:
        if line.startswith("/"):
            go_on, note = run_command(client, line)
            if note:
                print(note, file=sys.stderr)
            return go_on
        answer(client, line, config)
    except KeyboardInterrupt:
        print("[reply cancelled]", file=sys.stderr)
    except grpc.RpcError as err:
        _error(describe_rpc_error(err, config.address, config.timeout_s))
    except CommandError as err:
        _error(str(err))
    return True


def run(config: ClientConfig) -> int:
    """Connect and chat in the mode the terminal and flags call for; the exit code."""
    if (
        config.credentials.api_key
        and not config.credentials.tls.enabled
        and not is_loopback(config.address)
    ):
        print(
            f"{PROG}: warning: sending the API key to {config.address} without TLS",
            file=sys.stderr,
        )
    with open_channel(config.address, config.credentials) as channel:
        client = ChatClient(
            stub=pb_grpc.GenerationServiceStub(channel),
            credentials=config.credentials,
            options=config.options,
            conversation=Conversation(system=config.system, reasoning=config.reasoning),
            timeout_s=config.timeout_s,
        )
        return run_interactive(client, config) if config.interactive else run_script(client, config)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    terminal = Terminal.detect(os.environ)
    config = parse_config(sys.argv[1:] if argv is None else argv, os.environ, terminal)
    try:
        return run(config)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
