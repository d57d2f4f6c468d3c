"""The GenerationService servicer: thin, converting protobuf to domain calls and back.

What a request does with the engine is `service.server.operations`, shared with the HTTP API;
the wrapping of every RPC (ids, logs, span, metrics, error table) is `rpc_service`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf import json_format
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.chat.formats import require_messages
from service.chat.turns import ChatContext, ChatDelta
from service.observability.calls import Observability
from service.runtime.interface import TokenEvent
from service.runtime.tokenizer import ChatMessage
from service.server import convert, operations
from service.server.callers import Callers, engine_request_id
from service.server.operations import ModelInfo, Serving
from service.server.rpc import rpc_service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


@rpc_service(pb.DESCRIPTOR.services_by_name["GenerationService"])
class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves the API from a started engine (UNAVAILABLE until it is attached)."""

    def __init__(
        self,
        observability: Observability | None = None,
        serving: Serving | None = None,
        callers: Callers | None = None,
    ):
        self.observability = observability or Observability()
        self.serving = serving or Serving()
        self.callers = callers or Callers(keys_checked=False)
        self.max_response_bytes: int | None = None  # the server's send limit, once serving

    def _engine_id(self, request_id: str, context: grpc.aio.ServicerContext) -> str:
        """The engine's id of the caller's request (namespaced by who the caller is)."""
        tag = self.callers.grpc_tag(
            dict(context.invocation_metadata() or ()), context.auth_context()
        )
        return engine_request_id(tag, request_id)

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
        return convert.generate_response_to_pb(request.request_id, events)

    async def GenerateStream(
        self, request: pb.GenerateStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """A streamed completion of a prompt."""
        async with aclosing(self._generate(request, context)) as events:
            async for event in events:
                yield convert.stream_event_to_pb(request.request_id, event)

    async def _generate(
        self,
        request: pb.GenerateRequest | pb.GenerateStreamRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[TokenEvent]:
        chat = self.serving.ready()
        prompt = request.prompt
        if prompt.WhichOneof("input") == "text":
            ids = await operations.encode(chat, prompt.text, self.serving.offload)
        else:
            ids = convert.prompt_ids(prompt)
        domain = convert.generation_from_pb(
            request,
            self._engine_id(request.request_id, context),
            ids,
            convert.deadline_from(context.time_remaining()),
        )
        async with aclosing(operations.generate(chat, domain)) as events:
            async for event in events:
                yield event

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatResponse:
        """The assistant's whole turn."""
        deltas = [d async for d in await self._chat(request, context)]
        return convert.chat_response_to_pb(request.request_id, deltas)

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """The assistant's turn, streamed."""
        async with aclosing(await self._chat(request, context)) as deltas:
            async for delta in deltas:
                yield convert.chat_delta_to_pb(request.request_id, delta)

    async def _chat(
        self, request: pb.ChatRequest | pb.ChatStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ChatDelta]:
        """Submit the turn (converted and rendered off the loop when large); its deltas."""
        engine_id = self._engine_id(request.request_id, context)
        deadline = convert.deadline_from(context.time_remaining())
        return await operations.chat(
            self.serving.ready(),
            lambda: convert.chat_from_pb(request, engine_id, deadline),
            self.serving.offload,
            request.ByteSize(),
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Token ids of a text or a rendered conversation."""
        chat = self.serving.ready()

        def tokenize() -> list[int]:
            if request.WhichOneof("input") != "chat":
                return chat.tokenizer.encode(request.text)
            messages: list[ChatMessage] = list(convert.messages_from_pb(request.chat.messages))
            require_messages(messages)
            return chat.tokenizer.render_chat(messages)

        ids = await self.serving.offload.run(tokenize, request.ByteSize())
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
        """Stop one of the caller's own requests by its id."""
        engine_id = self._engine_id(request.request_id, context)
        return pb.AbortResponse(aborted=self.serving.ready().engine.abort(engine_id))

    async def GetEngineStats(
        self, request: pb.GetEngineStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEngineStatsResponse:
        """The engine's load right now."""
        return convert.stats_to_pb(self.serving.ready().engine.stats())
