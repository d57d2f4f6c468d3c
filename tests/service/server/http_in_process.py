"""The HTTP API served in this process by real uvicorn on loopback, for real clients.

Over any `Engine`: a scripted one (`tests.service.scripted_engine`) where a test needs what the
model would not do, or the real runtime. The app, the chat layer, the error table, API keys and
the server are the product's own, run on an event loop in a thread so that synchronous
clients (the `openai` SDK, httpx) can call them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.chat.formats import family_of, load_families
from service.chat.sampling import NO_DEFAULTS, SamplingDefaults
from service.chat.turns import ChatContext
from service.observability.calls import Observability
from service.observability.metrics import ServiceMetrics
from service.runtime.interface import Engine
from service.server.api_keys import ApiKeys
from service.server.health import Health
from service.server.http_server import HttpServer
from service.server.openai.app import HttpApi, HttpApiSettings
from service.server.operations import ModelInfo, Serving

MODEL = "scripted-nemotron"


@dataclass
class InProcessHttp:
    """A running HTTP API over an engine."""

    url: str
    engine: Any
    metrics: ServiceMetrics

    @property
    def base_url(self) -> str:
        """What the openai SDK takes as `base_url`."""
        return f"{self.url}/v1"


def model_info(max_context_tokens: int) -> ModelInfo:
    """The model info the server reports."""
    return ModelInfo(
        model=MODEL,
        family="scripted",
        profile="cpu",
        backend="scripted",
        precision="bf16",
        tensor_parallel=1,
        max_context_tokens=max_context_tokens,
        engine_id="0",
        engine_name="scripted",
        versions={},
    )


@contextmanager
def http_in_process(
    engine: Engine,
    api_keys_file: Path | None = None,
    max_body_bytes: int = 1 << 20,
    sampling: SamplingDefaults = NO_DEFAULTS,
) -> Iterator[InProcessHttp]:
    """Start `engine`, serve the HTTP API over it on a free loopback port until the block ends
    (with the model's `sampling` defaults for fields a request leaves unset)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    metrics = ServiceMetrics()

    async def start() -> tuple[HttpServer, int]:
        await engine.start()
        serving = Serving()
        family = family_of(engine.tokenizer.chat_template_source, load_families())
        context = ChatContext(engine, family, sampling)
        serving.attach(context, model_info(engine.limits.max_seq_len))
        health = Health("nemotron.v1.GenerationService")
        await health.starting()
        await health.ready()
        keys = ApiKeys(api_keys_file) if api_keys_file is not None else None
        settings = HttpApiSettings((), max_body_bytes, keys, "test")
        api = HttpApi(serving, Observability(metrics=metrics, model=MODEL), health, settings)
        server = HttpServer(api.app, "127.0.0.1", 0, 5.0, None)
        return server, await server.start()

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=30)
    try:
        yield InProcessHttp(f"http://127.0.0.1:{port}", engine, metrics)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(timeout=30)
        asyncio.run_coroutine_threadsafe(engine.shutdown(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
