"""The GenerationService servicer: thin, converting protobuf to domain calls and back.

What a request does with the engine is `service.server.operations`, shared with the HTTP API;
the wrapping of every RPC (ids, logs, span, metrics, error table) is `rpc_service`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.chat.turns import ChatContext
from service.observability.calls import Observability
from service.observability.tracing import phase
from service.runtime.interface import TokenEvent
from service.runtime.tokenizer import ChatMessage
from service.server import convert, operations
from service.server.operations import ModelInfo, Serving
from service.server.rpc import rpc_service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


@rpc_service(pb.DESCRIPTOR.services_by_name["GenerationService"])
class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves the API from a started engine (UNAVAILABLE until it is attached)."""

    def __init__(self, observability: Observability | None = None, serving: Serving | None = None):
        self.observability = observability or Observability()
        self.serving = serving or Serving()

    def attach(self, context: ChatContext, info: ModelInfo) -> None:
        """Start serving with a ready engine."""
        self.serving.attach(context, info)
        self.observability.model = info.model

    @property
    def model_info(self) -> ModelInfo | None:
        """What GetModelInfo reports, once attached."""
        return self.serving.info

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        """The whole completion of a prompt."""
        events = [e async for e in self._generate(request, context)]
        return convert.generate_response_to_pb(events)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """A streamed completion of a prompt."""
        async for event in self._generate(request, context):
            yield convert.stream_event_to_pb(event)

    async def _generate(
        self,
        request: pb.GenerateRequest | pb.GenerateStreamRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[TokenEvent]:
        chat = self.serving.ready()
        with phase("tokenize"):
            domain = convert.generation_from_pb(
                request,
                request.request_id,
                chat.tokenizer,
                convert.deadline_from(context.time_remaining()),
            )
        async for event in operations.generate(chat, domain):
            yield event

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatResponse:
        """The assistant's whole turn."""
        turn = convert.chat_from_pb(
            request, request.request_id, convert.deadline_from(context.time_remaining())
        )
        deltas = [d async for d in operations.chat(self.serving.ready(), turn)]
        return convert.chat_response_to_pb(request.request_id, deltas)

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """The assistant's turn, streamed."""
        turn = convert.chat_from_pb(
            request, request.request_id, convert.deadline_from(context.time_remaining())
        )
        async for delta in operations.chat(self.serving.ready(), turn):
            yield convert.chat_delta_to_pb(request.request_id, delta)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Token ids of a text or a rendered conversation."""
        chat = self.serving.ready()
        if request.WhichOneof("input") == "chat":
            messages: list[ChatMessage] = list(convert.messages_from_pb(request.chat.messages))
            ids = chat.tokenizer.render_chat(messages)
        else:
            ids = chat.tokenizer.encode(request.text)
        return pb.TokenizeResponse(token_ids=ids, count=len(ids))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        """The model and the engine serving it."""
        info = self.serving.model_info()
        return json_format.ParseDict(
            {**info.__dict__, "versions": info.versions}, pb.GetModelInfoResponse()
        )

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        """Stop a request by id."""
        return pb.AbortResponse(aborted=self.serving.ready().engine.abort(request.request_id))

    async def GetEngineStats(
        self, request: pb.GetEngineStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEngineStatsResponse:
        """The engine's load right now."""
        return convert.stats_to_pb(self.serving.ready().engine.stats())
