"""The engine watch: a failed engine turns readiness NOT_SERVING and ends the process with 1."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from service.api.servicer import SERVICE_NAME
from service.runtime.interface import EngineState
from service.server import LIVENESS, READINESS, SERVING, _watch_engine


class _Engine:
    state = EngineState.READY


def test_a_failed_engine_turns_readiness_off_and_sets_exit_code_1(monkeypatch):
    monkeypatch.setattr("service.server.ENGINE_WATCH_INTERVAL_S", 0.01)

    async def scenario() -> tuple[dict, dict[str, int], bool]:
        health = HealthServicer()
        for name in (LIVENESS, READINESS, SERVICE_NAME):
            await health.set(name, SERVING)
        engine, stop, outcome = _Engine(), asyncio.Event(), {"exit_code": 0}
        watcher = asyncio.create_task(_watch_engine(engine, health, stop, outcome))
        await asyncio.sleep(0.05)
        assert not stop.is_set()  # a healthy engine is left alone
        engine.state = EngineState.FAILED
        await asyncio.wait_for(watcher, 5)
        statuses = {}
        for name in (LIVENESS, READINESS, SERVICE_NAME):
            request = health_pb2.HealthCheckRequest(service=name)
            statuses[name] = (await health.Check(request, None)).status
        return statuses, outcome, stop.is_set()

    statuses, outcome, stopped = asyncio.run(scenario())
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[READINESS] == not_serving and statuses[SERVICE_NAME] == not_serving
    assert statuses[LIVENESS] == SERVING  # the process itself still answers until it exits
    assert outcome["exit_code"] == 1 and stopped
