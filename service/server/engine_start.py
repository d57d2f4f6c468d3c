"""Starting the engine inside the server: choose it (building if allowed), open it, warm it up.

The engine directory comes from startup's profile and engine selection; the runtime from the
engine's manifest (`service.runtime.factory`). A signal during the build or the load leaves
that work running in its thread; the server then exits at once instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import time
from dataclasses import replace

import grpc

from engine_build.events import log_event
from engine_build.repository import EngineEntry
from service.chat.formats import family_of, load_families
from service.chat.sampling import model_defaults
from service.chat.turns import ChatContext
from service.runtime.compute import run_in_compute_thread
from service.runtime.factory import open_engine
from service.runtime.heap import freeze_startup_heap
from service.runtime.interface import Engine
from service.runtime.sizing import RuntimeOptions
from service.server.config import ServerConfig
from service.server.operations import ModelInfo
from service.server.servicer import GenerationServicer
from service.startup.selection import resolve_engine
from service.user_errors import USER_ERRORS


async def start_engine(
    config: ServerConfig,
    servicer: GenerationServicer,
    stop: asyncio.Event,
    outcome: dict[str, int],
) -> Engine | None:
    """Choose (building if needed) and load the engine; None when a signal came first."""
    started = time.perf_counter()
    build = asyncio.create_task(
        asyncio.to_thread(
            run_in_compute_thread,  # tensor work away from the main thread's compute team
            lambda: resolve_engine(config.startup, os.environ),
        )
    )
    if not await first_of(build, stop):
        outcome["abandoned"] = 1
        return None
    try:
        choice = build.result()
    except USER_ERRORS as error:
        log_event("startup_refused", logging.ERROR, reason=str(error))
        raise
    options = RuntimeOptions(
        threads=config.compute_threads,
        kv_cache_bytes=config.kv_cache_memory,
        measure_kernels=config.measure_kernels,
        compiled_decode=config.compiled_decode,
    )
    engine = open_engine(choice.entry, choice.profile.limits, options, device=choice.device)
    starting = asyncio.create_task(engine.start())
    if not await first_of(starting, stop):
        outcome["abandoned"] = 1
        return None
    try:
        starting.result()  # a load that failed raises here (a refused memory budget, say)
    except USER_ERRORS as error:
        log_event("startup_refused", logging.ERROR, reason=str(error))
        raise
    family = family_of(engine.tokenizer.chat_template_source, load_families())
    sampling = model_defaults(
        config.sampling_defaults, family.sampling_on, family.sampling_off, choice.directory
    )
    report = sampling.report(family.supports_reasoning)
    log_event("sampling_defaults", **report)
    info = replace(model_info(choice.entry, engine, family.name), sampling_defaults=report)
    servicer.attach(ChatContext(engine, family, sampling), info)
    log_event(
        "engine_started",
        engine=str(choice.directory),
        seconds=round(time.perf_counter() - started, 2),
        frozen_objects=freeze_startup_heap(),
    )
    return engine


def model_info(entry: EngineEntry, engine: Engine, family: str) -> ModelInfo:
    """What GetModelInfo reports, from the manifest entry and the started engine."""
    key = entry.key
    versions = {
        "nemotron-serve": server_version(),
        key.backend: key.backend_version,
        "grpcio": grpc.__version__,
    }
    if key.backend == "torch":
        import torch

        versions["torch"] = torch.__version__
    return ModelInfo(
        model=_model_name(entry),
        family=family,
        profile=key.profile,
        backend=key.backend,
        precision=key.precision,
        tensor_parallel=key.tensor_parallel,
        max_context_tokens=engine.limits.max_seq_len,
        engine_id=entry.engine_id,
        engine_name=entry.name,
        versions=versions,
    )


def _model_name(entry: EngineEntry) -> str:
    """The checkpoint's name as its config gives it (`_name_or_path`, else `model_type`)."""
    description = entry.directory / "engine.json"
    if not description.is_file():
        return entry.name
    config = json.loads(description.read_text()).get("model_config", {})
    return str(config.get("_name_or_path") or config.get("model_type", "") or entry.name)


def server_version() -> str:
    """The installed nemotron-serve version."""
    return importlib.metadata.version("nemotron-serve")


async def first_of(task: asyncio.Task, stop: asyncio.Event) -> bool:
    """Wait for `task` or `stop`; True when the task finished first."""
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return task in done
