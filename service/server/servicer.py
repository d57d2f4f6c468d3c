"""The GenerationService servicer: thin, converting protobuf to domain calls and back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from service.chat.turns import ChatContext, ChatDelta, ChatTurn, run_chat_turn
from service.observability.tracing import current_record, phase
from service.runtime.interface import (
    FinishReason,
    GenerationRequest,
    NotReadyError,
    TokenEvent,
    failure_of,
)
from service.runtime.options import RequestOptions
from service.runtime.tokenizer import ChatMessage
from service.server import convert
from service.server.rpc import Observability, rpc_service

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports."""

    model: str
    family: str
    profile: str
    backend: str
    precision: str
    tensor_parallel: int
    max_context_tokens: int
    engine_id: str
    engine_name: str
    versions: dict[str, str]


@rpc_service(pb.DESCRIPTOR.services_by_name["GenerationService"])
class GenerationServicer(pb_grpc.GenerationServiceServicer):
    """Serves the API from a started engine (UNAVAILABLE until `attach` is called).

    Every RPC is wrapped by `rpc_service` (request id, logs, span, metrics, the error table).
    """

    def __init__(self, observability: Observability | None = None) -> None:
        self.observability = observability or Observability()
        self._context: ChatContext | None = None
        self._info: ModelInfo | None = None

    def attach(self, context: ChatContext, info: ModelInfo) -> None:
        """Start serving with a ready engine."""
        self._context, self._info = context, info
        self.observability.model = info.model

    @property
    def model_info(self) -> ModelInfo | None:
        """What GetModelInfo reports, once attached."""
        return self._info

    def _ready(self) -> ChatContext:
        if self._context is None:
            raise NotReadyError("the engine is still loading; retry when readiness is SERVING")
        return self._context

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
        chat = self._ready()
        with phase("tokenize"):
            domain = convert.generation_from_pb(
                request,
                request.request_id,
                chat.tokenizer,
                convert.deadline_from(context.time_remaining()),
            )
        _note_request("text_completion", domain.options)
        record = current_record()
        if record is not None:  # counted as they come: a cancelled stream still counts
            record.prompt_tokens = len(domain.prompt_ids)
        stream = chat.engine.generate(domain)
        completion = 0
        try:
            async for event in stream:
                if event.finish_reason is FinishReason.ERROR:
                    raise failure_of(event, chat.engine.state)
                completion += len(event.token_ids)
                if record is not None:
                    record.completion_tokens = completion
                if event.finish_reason is not None:
                    _note_finish(domain, completion, event)
                yield event
        finally:
            await stream.aclose()  # a client that went away aborts its request

    async def Chat(
        self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
    ) -> pb.ChatResponse:
        """The assistant's whole turn."""
        turn = convert.chat_from_pb(
            request, request.request_id, convert.deadline_from(context.time_remaining())
        )
        deltas = [d async for d in _chat_turn(self._ready(), turn)]
        return convert.chat_response_to_pb(request.request_id, deltas)

    async def ChatStream(
        self, request: pb.ChatStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ChatStreamResponse]:
        """The assistant's turn, streamed."""
        turn = convert.chat_from_pb(
            request, request.request_id, convert.deadline_from(context.time_remaining())
        )
        async for delta in _chat_turn(self._ready(), turn):
            yield convert.chat_delta_to_pb(request.request_id, delta)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Token ids of a text or a rendered conversation."""
        chat = self._ready()
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
        self._ready()
        info = self._info
        assert info is not None  # set together with the context
        return json_format.ParseDict(
            {**info.__dict__, "versions": info.versions}, pb.GetModelInfoResponse()
        )

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        """Stop a request by id."""
        return pb.AbortResponse(aborted=self._ready().engine.abort(request.request_id))

    async def GetEngineStats(
        self, request: pb.GetEngineStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEngineStatsResponse:
        """The engine's load right now."""
        return convert.stats_to_pb(self._ready().engine.stats())


async def _chat_turn(context: ChatContext, turn: ChatTurn) -> AsyncIterator[ChatDelta]:
    """`run_chat_turn`, noting the request and its outcome for logs, traces and metrics."""
    _note_request("chat", turn.options)
    async for delta in run_chat_turn(context, turn):
        record = current_record()
        if record is not None and delta.usage is not None:
            u = delta.usage
            record.finish(
                u.prompt_tokens,
                u.completion_tokens,
                delta.timings,
                delta.finish_reason,
                u.reasoning_tokens,
                u.cached_prompt_tokens,
            )
        yield delta


def _note_request(operation: str, options: RequestOptions) -> None:
    record = current_record()
    if record is None:
        return
    sampling, max_tokens = options.sampling, options.max_new_tokens
    record.operation = operation
    record.request_attributes = {
        "gen_ai.request.temperature": sampling.temperature,
        "gen_ai.request.top_p": sampling.top_p,
        **({"gen_ai.request.max_tokens": max_tokens} if max_tokens else {}),
        **({"gen_ai.request.seed": sampling.seed} if sampling.seed is not None else {}),
    }


def _note_finish(request: GenerationRequest, completion: int, last: TokenEvent) -> None:
    record = current_record()
    if record is not None:
        usage = last.usage
        record.finish(
            usage.prompt_tokens if usage else len(request.prompt_ids),
            completion,
            last.timings,
            last.finish_reason,
            cached_prompt_tokens=usage.cached_prompt_tokens if usage else 0,
        )
