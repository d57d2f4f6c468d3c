"""Lifecycle: a failed engine ends the process with 1, a second signal ends the drain, and
request bodies reach the logs only with --log-prompts."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.runtime.interface import EngineState
from service.server.health import LIVENESS, READINESS, SERVING, Health, watch_engine
from service.server.servicer import SERVICE_NAME
from tests.service.server_process import (
    WAIT_S,
    start_server,
    stop_server,
    wait_ready,
    wait_until,
)


class _Engine:
    """An engine whose state the test sets, counting how often the watcher looks at it."""

    def __init__(self) -> None:
        self._state, self.looks = EngineState.READY, 0

    @property
    def state(self) -> EngineState:
        self.looks += 1
        return self._state

    @state.setter
    def state(self, value: EngineState) -> None:
        self._state = value


def test_a_failed_engine_turns_readiness_off_and_sets_exit_code_1(monkeypatch):
    monkeypatch.setattr("service.server.health.ENGINE_WATCH_INTERVAL_S", 0.01)

    async def scenario() -> tuple[dict, dict[str, int], bool]:
        health = Health(SERVICE_NAME)
        await health.starting()
        await health.ready()
        engine, stop, outcome = _Engine(), asyncio.Event(), {"exit_code": 0}
        watcher = asyncio.create_task(watch_engine(engine, health, stop, outcome))
        deadline = time.monotonic() + WAIT_S
        while engine.looks < 3:  # the watcher has seen a healthy engine a few times
            assert time.monotonic() < deadline, "the watcher did not look at the engine"
            await asyncio.sleep(0.01)
        assert not stop.is_set()  # a healthy engine is left alone
        engine.state = EngineState.FAILED
        await asyncio.wait_for(watcher, WAIT_S)
        statuses = {}
        for name in (LIVENESS, READINESS, SERVICE_NAME):
            request = health_pb2.HealthCheckRequest(service=name)
            statuses[name] = (await health.servicer.Check(request, None)).status
        return statuses, outcome, stop.is_set()

    statuses, outcome, stopped = asyncio.run(scenario())
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert statuses[READINESS] == not_serving and statuses[SERVICE_NAME] == not_serving
    assert statuses[LIVENESS] == SERVING  # the process itself still answers until it exits
    assert outcome["exit_code"] == 1 and stopped


def _long_stream(server):
    from nemotron.v1 import generation_pb2 as pb

    request = pb.GenerateStreamRequest(
        prompt=pb.Prompt(text="Count: one two three"),
        limits=pb.GenerationLimits(max_new_tokens=2000, ignore_eos=True),
    )
    stream = server.api.GenerateStream(request, timeout=300)
    next(iter(stream))
    return stream


def test_a_second_signal_exits_at_once_without_waiting_for_the_drain(
    cache_dir, cached_embedded_checkpoint
):
    server = start_server(cache_dir, "--grace-s", "300")
    wait_ready(server)
    stream = _long_stream(server)
    server.process.send_signal(signal.SIGTERM)
    server.wait_for_log(lambda line: line["event"] == "server_draining", "server_draining")
    assert server.process.poll() is None  # draining: the stream is still running
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=30)
    assert code == 128 + signal.SIGTERM and time.monotonic() - started < 5
    stream.cancel()
    server.channel.close()


def test_log_prompts_logs_bodies_only_when_asked(cache_dir, cached_embedded_checkpoint):
    from nemotron.v1 import generation_pb2 as pb

    server = start_server(cache_dir, "--log-prompts")
    try:
        wait_ready(server)
        request = pb.ChatRequest(
            request_id="logged-body",
            messages=[pb.ChatMessage(role=pb.ROLE_USER, content="Name a colour of the sky.")],
            limits=pb.GenerationLimits(max_new_tokens=8),
        )
        answer = server.api.Chat(request, timeout=60)
        server.wait_for_log(
            lambda line: (
                line.get("request_id") == "logged-body" and line["event"] == "rpc_finished"
            ),
            "rpc_finished of logged-body",
        )
        mine = [line for line in server.log_lines() if line.get("request_id") == "logged-body"]
        bodies = [line for line in mine if line["event"] == "rpc_request"]
        assert bodies and "Name a colour of the sky." in str(bodies[0]["body"])
        (finished,) = [line for line in mine if line["event"] == "rpc_finished"]
        assert finished["output"] == answer.content
    finally:
        assert stop_server(server) == 0


def test_sigterm_during_startup_exits_without_waiting_for_the_engine(
    cache_dir, cached_embedded_checkpoint
):
    server = start_server(cache_dir)  # returns once the port answers: the engine is loading
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(timeout=60)
    events = [line["event"] for line in server.log_lines()]
    assert code == 0 and time.monotonic() - started < 10
    assert "server_ready" not in events and "server_stopped" in events
    server.channel.close()


def _finished(server, request_id: str) -> dict | None:
    lines = [
        line
        for line in server.log_lines()
        if line["event"] == "rpc_finished" and line.get("request_id") == request_id
    ]
    return lines[-1] if lines else None


def test_when_the_drains_grace_runs_out_the_record_says_what_the_client_saw(
    cache_dir, cached_embedded_checkpoint
):
    """A stream still running when --grace-s ends is cut off: the client gets UNAVAILABLE, and
    the log, metrics and span say UNAVAILABLE too (before: CANCELLED, as if the client left)."""
    server = start_server(cache_dir, "--grace-s", "1")
    try:
        wait_ready(server)
        long = pb.GenerateStreamRequest(
            request_id="cut-off-1",
            prompt=pb.Prompt(text="Count:"),
            limits=pb.GenerationLimits(max_new_tokens=4000, ignore_eos=True),
        )
        stream = server.api.GenerateStream(long, timeout=300)
        next(stream)
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as cut:
            list(stream)
        seen = cut.value.code()
        assert seen == grpc.StatusCode.UNAVAILABLE, cut.value.details()
        assert server.process.wait(timeout=120) == 0
        assert _finished(server, "cut-off-1")["code"] == seen.name
    finally:
        server.channel.close()
        if server.process.poll() is None:
            server.process.kill()


def test_a_client_that_closes_right_after_the_last_message_is_recorded_ok(
    cache_dir, cached_embedded_checkpoint
):
    """The client had the whole answer (the message with the finish reason) and closed its
    channel before the end of the stream arrived: for it the call succeeded."""
    server = start_server(cache_dir)
    try:
        wait_ready(server)
        ids = [f"closer-{i}" for i in range(12)]
        for request_id in ids:
            channel = grpc.insecure_channel(server.address)
            asked = pb.GenerateStreamRequest(
                request_id=request_id,
                prompt=pb.Prompt(text="Hi"),
                limits=pb.GenerationLimits(max_new_tokens=3, ignore_eos=True),
            )
            for message in pb_grpc.GenerationServiceStub(channel).GenerateStream(asked, timeout=60):
                if message.finish_reason:
                    break
            channel.close()  # at once, before reading the end of the stream
        records = [wait_until(lambda i=i: _finished(server, i), f"the record of {i}") for i in ids]
        assert [r["code"] for r in records] == ["OK"] * len(ids)
    finally:
        assert stop_server(server) == 0
