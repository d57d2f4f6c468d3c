"""The nemotron.v1 gRPC API served in this process on loopback, over any chat context."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.chat.turns import ChatContext
from service.server.operations import ModelInfo
from service.server.servicer import GenerationServicer

INFO = ModelInfo("tiny", "generic", "cpu", "scripted", "fp32", 1, 4096, "e1", "scripted", {})


@asynccontextmanager
async def grpc_stub(
    context: ChatContext, info: ModelInfo = INFO
) -> AsyncIterator[pb_grpc.GenerationServiceStub]:
    """A stub of the product's servicer over `context` (a scripted engine, say), served by a real
    gRPC server on loopback for as long as the block runs."""
    servicer = GenerationServicer()
    servicer.attach(context, info)
    server = grpc.aio.server()
    pb_grpc.add_GenerationServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pb_grpc.GenerationServiceStub(channel)
    finally:
        await server.stop(None)
