"""Every RPC of the servicer goes through the wrapping: request id, logs, metrics, error table."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.observability.calls import Observability
from service.observability.metrics import ServiceMetrics
from service.server.rpc import rpc_service, streaming
from service.server.servicer import GenerationServicer

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"]


def test_every_rpc_of_the_service_is_wrapped():
    for method in SERVICE.methods:
        assert getattr(getattr(GenerationServicer, method.name), "rpc_wrapped", False), method.name


def test_a_servicer_missing_an_rpc_is_refused_when_defined():
    missing = "Partial does not implement nemotron.v1.GenerationService.GenerateStream"
    with pytest.raises(TypeError, match=missing):

        @rpc_service(SERVICE)
        class Partial:
            async def Generate(self, request, context):
                return None


def _call(channel: grpc.aio.Channel, name: str) -> grpc.aio.Call:
    method = SERVICE.methods_by_name[name]
    request = getattr(pb, method.input_type.name)()
    stub = pb_grpc.GenerationServiceStub(channel)
    return getattr(stub, name)(request, timeout=10)


async def _all_rpcs_before_attach(metrics: ServiceMetrics) -> dict[str, tuple[str, str]]:
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(
        GenerationServicer(Observability(metrics=metrics)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    outcomes = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in SERVICE.methods:
                call = _call(channel, method.name)
                try:
                    if method.server_streaming:
                        async for _ in call:
                            pass
                    else:
                        await call
                    outcomes[method.name] = ("OK", "")
                except grpc.aio.AioRpcError as error:
                    outcomes[method.name] = (error.code().name, error.details() or "")
    finally:
        await server.stop(None)
    return outcomes


def test_every_rpc_maps_errors_through_the_table_and_is_counted_and_logged(caplog):
    metrics = ServiceMetrics()
    with caplog.at_level(logging.INFO, logger="nemotron"):
        outcomes = asyncio.run(_all_rpcs_before_attach(metrics))
    for name in (m.name for m in SERVICE.methods):  # no engine yet: the table says UNAVAILABLE
        code, details = outcomes[name]
        assert code == "UNAVAILABLE" and "still loading" in details, (name, outcomes[name])
        counted = metrics.registry.get_sample_value(
            "nemotron_requests_total", {"method": name, "code": "UNAVAILABLE"}
        )
        assert counted == 1, name
    finished = [r for r in caplog.records if r.getMessage() == "rpc_finished"]
    assert len(finished) == len(SERVICE.methods)
    assert all(r.fields["code"] == "UNAVAILABLE" for r in finished)


class _EndingContext:
    """What the streaming wrapper reads of a grpc.aio context, plus gRPC's done callbacks."""

    def __init__(self) -> None:
        self.callbacks: list = []

    def invocation_metadata(self) -> tuple:
        return ()

    def time_remaining(self) -> None:
        return None

    def add_done_callback(self, callback) -> None:
        self.callbacks.append(callback)

    def end(self) -> None:  # the call is over (here: the client cancelled)
        for callback in self.callbacks:
            callback(self)


def test_a_stream_left_suspended_by_a_cancel_during_a_send_is_closed_when_the_call_ends():
    # A cancel that reaches gRPC while it is writing a message ends the call in gRPC's code:
    # the handler's generator stays suspended at its `yield`, and only the garbage collector
    # would close it. The call's end must close it (the engine request behind it is aborted).
    closed = []

    metrics = ServiceMetrics()

    class Streaming:
        observability = Observability(metrics=metrics)

        @streaming
        async def GenerateStream(self, request, context):
            try:
                yield pb.GenerateStreamResponse(text="first")
                await asyncio.sleep(3600)
            finally:
                closed.append(request.request_id)

    async def scenario() -> None:
        context = _EndingContext()
        servicer = Streaming()
        stream = servicer.GenerateStream(pb.GenerateStreamRequest(request_id="left"), context)
        assert (await anext(stream)).text == "first"
        context.end()  # gRPC keeps `stream` (suspended at the yield) and never resumes it
        for _ in range(100):
            if closed:
                break
            await asyncio.sleep(0)
        assert closed == ["left"]
        labels = {"method": "GenerateStream", "code": "CANCELLED"}  # recorded now, not at GC
        assert metrics.registry.get_sample_value("nemotron_requests_total", labels) == 1
        await stream.aclose()  # what the collector would do later: nothing left to run
        assert metrics.registry.get_sample_value("nemotron_requests_total", labels) == 1

    asyncio.run(scenario())
