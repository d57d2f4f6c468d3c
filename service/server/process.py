"""The server process: ports, health and reflection at once, the engine behind, a drain on SIGTERM.

The port opens first (liveness SERVING), then the engine is chosen and loaded (readiness turns
SERVING when it is warm; see `health`). On SIGTERM (or SIGINT) everything goes NOT_SERVING,
new calls are refused, in-flight calls get `grace_s` to finish, then the process exits 0; a
second signal exits at once. An engine that fails ends the process with exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nemotron.v1 import generation_pb2 as pb

from engine_build.events import log_event
from service.observability.calls import Observability
from service.observability.metrics import ServiceMetrics
from service.observability.tracing import Tracing
from service.runtime.compute import reserve_cores_for_compute_threads
from service.runtime.interface import Engine
from service.server.auth import ApiKeys, AuthInterceptor
from service.server.callers import Callers
from service.server.config import ServerConfig
from service.server.engine_start import server_version, start_engine
from service.server.health import HEALTH_SERVICE, Health, watch_engine
from service.server.http_server import HttpServer
from service.server.kserve.servicer import DESCRIPTOR as KSERVE_DESCRIPTOR
from service.server.kserve.servicer import SERVICE_NAME as KSERVE_SERVICE
from service.server.kserve.servicer import KServeServicer, KServeSettings
from service.server.openai.app import HttpApi, HttpApiSettings
from service.server.operations import ModelInfo
from service.server.rpc import add_servicer
from service.server.servicer import SERVICE_NAME, GenerationServicer


async def serve(config: ServerConfig) -> int:
    """Run until a signal or an engine failure; return the exit code."""
    reserve_cores_for_compute_threads()
    metrics = ServiceMetrics()
    observability = Observability(
        Tracing(os.environ, server_version()), metrics, log_prompts=config.log_prompts
    )
    interceptors = []
    api_keys = ApiKeys(config.api_keys_file) if config.api_keys_file is not None else None
    if api_keys is not None:
        interceptors.append(AuthInterceptor(api_keys, metrics))
    server = grpc.aio.server(options=config.grpc_options(), interceptors=interceptors)
    health = Health(SERVICE_NAME)
    await health.starting()
    servicer = GenerationServicer(observability, callers=Callers(api_keys is not None))
    servicer.max_response_bytes = config.max_message_bytes
    add_servicer(servicer, server, pb.DESCRIPTOR.services_by_name["GenerationService"])
    kserve_settings = KServeSettings(
        config.served_model_names, config.triton_model_names, server_version()
    )
    kserve = KServeServicer(
        observability, servicer.serving, servicer.callers, health, kserve_settings, api_keys
    )
    kserve.max_response_bytes = config.max_message_bytes
    add_servicer(kserve, server, KSERVE_DESCRIPTOR)
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, KSERVE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    port = _listen(server, config)
    await server.start()
    http = _http_server(config, servicer, observability, health, api_keys)
    try:
        http_port = await http.start() if http is not None else None
    except OSError:
        await server.stop(None)
        raise
    metrics_port = (
        metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port else None
    )
    log_event(
        "server_listening",
        host=config.host,
        port=port,
        http_port=http_port,
        tls="mutual" if config.tls and config.tls.client_ca_file else bool(config.tls),
        api_keys=config.api_keys_file is not None,
        metrics_port=metrics_port,
        tracing=observability.tracing.enabled,
    )
    stop = asyncio.Event()
    _install_signal_handlers(stop)
    outcome = {"exit_code": 0}
    engine: Engine | None = None
    try:
        try:
            engine = await start_engine(config, servicer, stop, outcome)
        except BaseException:
            outcome["exit_code"] = 2  # the caller reports the refusal
            raise
        if engine is not None and not stop.is_set():
            names = config.served_model_names
            await _serve_until_stopped(engine, servicer, health, metrics, stop, outcome, names)
    finally:
        await health.draining()
        log_event("server_draining", grace_s=config.grace_s)
        observability.cut_off_at = time.monotonic() + config.grace_s  # then calls are cut off
        await asyncio.gather(
            server.stop(grace=config.grace_s), http.stop() if http is not None else _nothing()
        )
        if engine is not None:
            await engine.shutdown()
        servicer.serving.offload.shutdown()
        observability.tracing.shutdown()  # flush the last spans
        log_event("server_stopped", exit_code=outcome["exit_code"])
        if outcome.get("abandoned"):  # a build or load thread is still running: do not wait
            logging.shutdown()
            os._exit(outcome["exit_code"])
    return outcome["exit_code"]


def _http_server(
    config: ServerConfig,
    servicer: GenerationServicer,
    observability: Observability,
    health: Health,
    api_keys: ApiKeys | None,
) -> HttpServer | None:
    """The OpenAI-compatible API on its own port, over the servicer's engine (None: off)."""
    if config.http_port is None:
        return None
    settings = HttpApiSettings(
        served_model_names=config.served_model_names,
        max_body_bytes=config.max_message_bytes,
        api_keys=api_keys,
        version=server_version(),
    )
    api = HttpApi(servicer.serving, observability, health, settings)
    return HttpServer(api.app, config.host, config.http_port, config.grace_s, config.tls)


async def _nothing() -> None:
    return None


def _listen(server: grpc.aio.Server, config: ServerConfig) -> int:
    """Bind the API port (TLS when configured); the port actually bound."""
    address = f"{config.host}:{config.port}"
    if config.tls is not None:
        return server.add_secure_port(address, config.tls.credentials())
    return server.add_insecure_port(address)


async def _serve_until_stopped(
    engine: Engine,
    servicer: GenerationServicer,
    health: Health,
    metrics: ServiceMetrics | None,
    stop: asyncio.Event,
    outcome: dict[str, int],
    model_names: tuple[str, ...],
) -> None:
    """Ready: metrics read the engine, readiness turns SERVING, the engine is watched."""
    if metrics is not None:
        info = servicer.model_info
        names = model_names or ((info.model,) if info else ("",))
        metrics.attach_engine(engine.stats, _info_labels(info) if info else {}, names[0])
    await health.ready()
    log_event("server_ready")
    watcher = asyncio.create_task(watch_engine(engine, health, stop, outcome))
    await stop.wait()
    watcher.cancel()


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


def _install_signal_handlers(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # the second signal: no more waiting
            os._exit(128 + signum)
        log_event("signal_received", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
