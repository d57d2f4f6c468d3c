"""`nemotron-serve`: serve the APIs (the default command), or chat in the terminal.

`nemotron-serve` with no arguments, on a machine without GPUs, fetches and imports the embedded
SmolLM2 default (cached), builds its cpu engine once and serves it on port 50051 with health,
reflection and metrics (`service.server`). `nemotron-serve chat` answers prompts given with
`--prompt` or read line by line from standard input, with no server (`service.chat.terminal`).
Every serve flag also reads an environment variable (named in its help), which is how the Helm
chart configures the pod.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine_build.events import configure_logging

if TYPE_CHECKING:
    from service.server.config import ServerConfig


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    from service.server.flags import parse_serve_config

    try:
        if args[:1] == ["chat"]:
            from service.chat.terminal import parse_chat_config, run_chat

            config = parse_chat_config(args[1:], os.environ)
            configure_logging(config.log_level, config.log_json)
            return run_chat(config)
        return run_server(
            parse_serve_config(args[1:] if args[:1] == ["serve"] else args, os.environ)
        )
    except Exception as err:
        if not isinstance(err, OSError):
            # Imported here: its modules import torch, which --help and flag errors need not
            # wait for.
            from service.user_errors import USER_ERRORS

            if not isinstance(err, USER_ERRORS):
                raise
        if isinstance(err, BrokenPipeError):  # the reader went away (`| head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"nemotron-serve: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def run_server(config: ServerConfig) -> int:
    """Serve the gRPC API until SIGTERM; the exit code."""
    from service.observability.logs import configure_service_logging
    from service.runtime.compiled import compiling
    from service.server.process import serve

    configure_service_logging(config.log_level, config.log_format)
    code = asyncio.run(serve(config))
    if compiling():  # stopped during the background compile: leave without interpreter teardown
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
