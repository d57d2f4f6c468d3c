"""Standard gRPC health: which service names exist, what they say, and the engine watch.

`""` and `liveness` are SERVING as soon as the port is open; `readiness` and the API's own name
turn SERVING once the engine is loaded and warmed up, and NOT_SERVING again when the engine
fails or the server drains. Kubelet gRPC probes and load balancers ask by these names.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from engine_build.events import log_event
from service.runtime.interface import Engine, EngineState

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
LIVENESS, READINESS = "liveness", "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
ENGINE_WATCH_INTERVAL_S = 0.5


class Health:
    """The health servicer and the states the server moves it through."""

    def __init__(self, api_service: str) -> None:
        self.servicer = HealthServicer()
        self.api_service = api_service
        self.live, self.serving = True, False  # what the HTTP health routes answer

    async def starting(self) -> None:
        """Port open, engine not ready: alive, not ready."""
        for name, status in (
            ("", SERVING),
            (LIVENESS, SERVING),
            (READINESS, NOT_SERVING),
            (self.api_service, NOT_SERVING),
        ):
            await self.servicer.set(name, status)

    async def ready(self, serving: bool = True) -> None:
        """Readiness (and the API's name) SERVING, or NOT_SERVING."""
        status = SERVING if serving else NOT_SERVING
        self.serving = serving and self.live
        await self.servicer.set(READINESS, status)
        await self.servicer.set(self.api_service, status)

    async def draining(self) -> None:
        """Every name NOT_SERVING, watchers told, for the rest of the process."""
        self.live = self.serving = False
        await self.servicer.enter_graceful_shutdown()


async def watch_engine(
    engine: Engine, health: Health, stop: asyncio.Event, outcome: dict[str, int]
) -> None:
    """When the engine fails: readiness off, exit code 1, and the server told to stop."""
    while engine.state is not EngineState.FAILED:
        await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
    await health.ready(serving=False)
    log_event("engine_failed_exiting", exit_code=1)
    outcome["exit_code"] = 1
    stop.set()
