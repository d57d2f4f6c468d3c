"""The gRPC server process: health and reflection at once, the engine behind, a drain on SIGTERM.

Health service names: `""` and `liveness` are SERVING as soon as the port is open;
`readiness` and the API's own name turn SERVING once the engine is loaded and warmed up. On
SIGTERM (or SIGINT) everything goes NOT_SERVING, new calls are refused, in-flight calls get
`grace_s` to finish, then the process exits 0; a second signal exits at once. An engine that
fails turns readiness NOT_SERVING and ends the process with exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from engine_build.events import log_event
from service.chat.formats import family_of, load_families
from service.chat.turns import ChatContext
from service.observability.metrics import ServiceMetrics
from service.observability.tracing import Tracing
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import RuntimeOptions, open_runtime
from service.runtime.interface import EngineState
from service.runtime.torch_runtime import TorchRuntime
from service.server.auth import ApiKeys, AuthInterceptor
from service.server.config import ServerConfig
from service.server.rpc import Observability
from service.server.servicer import SERVICE_NAME, GenerationServicer, ModelInfo
from service.startup.selection import resolve_engine
from service.user_errors import USER_ERRORS

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS, READINESS = "liveness", "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ENGINE_WATCH_INTERVAL_S = 0.5


async def serve(config: ServerConfig) -> int:
    """Run until a signal or an engine failure; return the exit code."""
    reserve_cores_for_compute_threads()
    metrics = ServiceMetrics() if config.metrics_port else None
    observability = Observability(
        Tracing(os.environ, _version()), metrics, log_prompts=config.log_prompts
    )
    interceptors = []
    if config.api_keys_file is not None:
        interceptors.append(AuthInterceptor(ApiKeys(config.api_keys_file), metrics))
    server = grpc.aio.server(options=config.grpc_options(), interceptors=interceptors)
    health = HealthServicer()
    for name, status in (
        ("", SERVING),
        (LIVENESS, SERVING),
        (READINESS, NOT_SERVING),
        (SERVICE_NAME, NOT_SERVING),
    ):
        await health.set(name, status)
    servicer = GenerationServicer(observability)
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        port = server.add_secure_port(address, config.tls.credentials())
    else:
        port = server.add_insecure_port(address)
    await server.start()
    metrics_port = metrics.serve(config.metrics_host, config.metrics_port) if metrics else None
    log_event(
        "server_listening",
        host=config.host,
        port=port,
        tls="mutual" if config.tls and config.tls.client_ca_file else bool(config.tls),
        api_keys=config.api_keys_file is not None,
        metrics_port=metrics_port,
        tracing=observability.tracing.enabled,
    )
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    outcome = {"exit_code": 0}
    runtime: TorchRuntime | None = None
    try:
        try:
            runtime = await _start_engine(config, servicer, stop, outcome)
        except BaseException:
            outcome["exit_code"] = 2  # the caller reports the refusal
            raise
        if runtime is not None and not stop.is_set():
            if metrics is not None:
                info = servicer.model_info
                metrics.attach_engine(runtime.stats, _info_labels(info) if info else {})
            await health.set(READINESS, SERVING)
            await health.set(SERVICE_NAME, SERVING)
            log_event("server_ready", port=port)
            watcher = asyncio.create_task(_watch_engine(runtime, health, stop, outcome))
            await stop.wait()
            watcher.cancel()
    finally:
        await health.enter_graceful_shutdown()
        log_event("server_draining", grace_s=config.grace_s)
        await server.stop(grace=config.grace_s)
        if runtime is not None:
            await runtime.shutdown()
        observability.tracing.shutdown()  # flush the last spans
        log_event("server_stopped", exit_code=outcome["exit_code"])
        if outcome.get("abandoned"):  # a build or load thread is still running: do not wait
            logging.shutdown()
            os._exit(outcome["exit_code"])
    return outcome["exit_code"]


def _version() -> str:
    import importlib.metadata as metadata

    return metadata.version("nemotron-serve")


def _info_labels(info: ModelInfo) -> dict[str, str]:
    return {
        "model": info.model,
        "family": info.family,
        "profile": info.profile,
        "backend": info.backend,
        "precision": info.precision,
        "tensor_parallel": str(info.tensor_parallel),
        "engine_id": info.engine_id,
        "version": info.versions.get("nemotron-serve", ""),
    }


async def _start_engine(
    config: ServerConfig,
    servicer: GenerationServicer,
    stop: asyncio.Event,
    outcome: dict[str, int],
) -> TorchRuntime | None:
    """Choose (building if needed) and load the engine; None when a signal came first.

    A signal during the build or the load leaves that work running in its thread; `serve`
    then exits the process at once instead of waiting for it (nothing was served yet).
    """
    started = time.perf_counter()
    build = asyncio.create_task(
        asyncio.to_thread(
            run_in_compute_thread,  # tensor work away from the main thread's compute team
            lambda: resolve_engine(config.startup, os.environ),
        )
    )
    if not await _first(build, stop):
        outcome["abandoned"] = 1
        return None
    try:
        choice = build.result()
    except USER_ERRORS as error:
        log_event("startup_refused", logging.ERROR, reason=str(error))
        raise
    engine_dir = choice.directory
    options = RuntimeOptions(threads=config.compute_threads)
    runtime = open_runtime(engine_dir, options, device=choice.device)
    starting = asyncio.create_task(runtime.start())
    if not await _first(starting, stop):
        outcome["abandoned"] = 1
        return None
    family = family_of(runtime.tokenizer.chat_template_source, load_families())
    context = ChatContext(runtime, runtime.tokenizer, family, runtime.config.max_seq_len)
    servicer.attach(context, _model_info(engine_dir, runtime, family.name))
    log_event(
        "engine_started", engine=str(engine_dir), seconds=round(time.perf_counter() - started, 2)
    )
    return runtime


def _model_info(engine_dir: Path, runtime: TorchRuntime, family: str) -> ModelInfo:
    import json

    import torch

    description = json.loads((engine_dir / "engine.json").read_text())
    config = description["model_config"]
    return ModelInfo(
        model=str(config.get("_name_or_path") or config.get("model_type", "")),
        family=family,
        profile=description["profile"],
        backend="torch",
        precision=description["precision"]["weights"],
        tensor_parallel=int(description["tensor_parallel"]),
        max_context_tokens=runtime.config.max_seq_len,
        engine_id=engine_dir.name,
        engine_name=f"torch-{description['profile']}-{description['precision']['weights']}"
        f"-tp{description['tensor_parallel']}",
        versions={
            "nemotron-serve": _version(),
            "torch": torch.__version__,
            "grpcio": grpc.__version__,
        },
    )


async def _first(task: asyncio.Task, stop: asyncio.Event) -> bool:
    """Wait for `task` or `stop`; True when the task finished first."""
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    return task in done


async def _watch_engine(
    runtime: TorchRuntime, health: HealthServicer, stop: asyncio.Event, outcome: dict[str, int]
) -> None:
    while runtime.state is not EngineState.FAILED:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    await health.set(READINESS, NOT_SERVING)
    await health.set(SERVICE_NAME, NOT_SERVING)
    log_event("engine_failed_exiting", exit_code=1)
    outcome["exit_code"] = 1
    stop.set()


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # the second signal: no more waiting
            os._exit(128 + signum)
        log_event("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
