"""`inference.GRPCInferenceService` (KServe v2 / Triton gRPC) on the API port, over our engine.

Health RPCs answer from the same states as grpc.health; ModelInfer and ModelStreamInfer take the
TensorRT-LLM backend's tensors (`contract`) and run them through `operations.generate`, as
nemotron.v1's Generate does: the same validation, error table, request ownership, logs, spans
and metrics. ModelStreamInfer carries many requests on one stream, served concurrently, each
with its own call record and its own outcome: a refused request gets a response with
`error_message` and the stream goes on, as Triton does.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

import numpy as np
from triton_proto import grpc_service_pb2 as kpb
from triton_proto import model_config_pb2 as mc

from service.runtime.interface import GenerationRequest, NotReadyError, RequestError, TokenEvent
from service.server import convert, operations
from service.server.api_keys import ApiKeys
from service.server.callers import Callers, engine_request_id
from service.server.health import Health
from service.server.kserve.contract import INPUTS, OUTPUTS, InferCall, check_header, infer_call
from service.server.kserve.tensors import decode_inputs, encode_bytes, encode_output
from service.server.operations import Serving
from service.server.rpc import Undecodable, check_size, request_call, rpc_service
from service.server.status import NotFoundError, status_for

DESCRIPTOR = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = DESCRIPTOR.full_name
SERVED = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
    "ModelStreamInfer",
)
OPEN_METHODS = frozenset({"ServerLive", "ServerReady"})  # no API key needed (probes)
DEFAULT_ALIASES = ("ensemble", "tensorrt_llm_bls")
MODEL_VERSION = "1"
PLATFORM = "nemotron-serve"
EMPTY_FINAL = "triton_enable_empty_final_response"
STREAM_QUEUE = 64  # responses a stream holds for writing before its requests wait
FINAL = "triton_final_response"
# A final response's parameter: the model's sampling defaults the request ran with (JSON).
APPLIED = "sampling_defaults_applied"
_CONFIG_TYPES = {
    "BYTES": mc.TYPE_STRING,
    "BOOL": mc.TYPE_BOOL,
    "INT32": mc.TYPE_INT32,
    "UINT64": mc.TYPE_UINT64,
    "UINT8": mc.TYPE_UINT8,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
}


@dataclass(frozen=True)
class KServeSettings:
    """The model names this service answers to, besides the served model's own."""

    served_model_names: tuple[str, ...] = ()
    aliases: tuple[str, ...] = DEFAULT_ALIASES
    version: str = ""


@rpc_service(DESCRIPTOR, served=SERVED)
class KServeServicer:
    """KServe v2 over the engine the nemotron.v1 servicer serves from."""

    service_name = SERVICE_NAME

    def __init__(
        self,
        observability: Any,
        serving: Serving,
        callers: Callers,
        health: Health,
        settings: KServeSettings | None = None,
        api_keys: ApiKeys | None = None,
    ) -> None:
        self.observability, self.serving, self.callers, self.health = (
            observability,
            serving,
            callers,
            health,
        )
        self.settings = settings or KServeSettings()
        self.api_keys = api_keys
        self.max_response_bytes: int | None = None

    # -- names -----------------------------------------------------------------------------

    def model_names(self) -> tuple[str, ...]:
        """Every name the model answers to (its own once the engine is attached)."""
        info = self.serving.info
        own = self.settings.served_model_names or ((info.model,) if info else ())
        return (*own, *(a for a in self.settings.aliases if a not in own))

    def _resolve(self, name: str, version: str) -> str:
        """`name` when it is ours at `version` ("" or 1); else the protocol's errors."""
        if not name:
            raise RequestError("model name: empty; name the model (see ModelMetadata)")
        if name not in self.model_names():
            raise NotFoundError(f"Request for unknown model: '{name}' is not found")
        if version and version != MODEL_VERSION:
            if not version.isdigit():
                raise RequestError(
                    f"failed to get model version from specified version string '{version}': "
                    "version should be an integral value > 0"
                )
            raise NotFoundError(
                f"Request for unknown model: '{name}' version {version} is not found"
            )
        return name

    # -- health and metadata ----------------------------------------------------------------

    async def ServerLive(
        self, request: kpb.ServerLiveRequest, context: Any
    ) -> kpb.ServerLiveResponse:
        """Live as long as the process serves (grpc.health `liveness`)."""
        return kpb.ServerLiveResponse(live=self.health.live)

    async def ServerReady(
        self, request: kpb.ServerReadyRequest, context: Any
    ) -> kpb.ServerReadyResponse:
        """Ready once the engine is loaded and warm (grpc.health `readiness`)."""
        return kpb.ServerReadyResponse(ready=self.health.serving)

    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: Any
    ) -> kpb.ModelReadyResponse:
        """The model's readiness; an unknown name is NOT_FOUND (as Triton answers it)."""
        if self.serving.info is None:  # loading: its own name is not known yet
            return kpb.ModelReadyResponse(ready=False)
        self._resolve(request.name, request.version)
        return kpb.ModelReadyResponse(ready=self.health.serving)

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: Any
    ) -> kpb.ServerMetadataResponse:
        """The server's name and version (no Triton extensions are implemented)."""
        return kpb.ServerMetadataResponse(name=PLATFORM, version=self.settings.version)

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: Any
    ) -> kpb.ModelMetadataResponse:
        """The tensors the model takes and returns (shapes with the batch dimension first)."""
        self.serving.ready()
        name = self._resolve(request.name, request.version)
        response = kpb.ModelMetadataResponse(name=name, versions=[MODEL_VERSION], platform=PLATFORM)
        for spec in INPUTS:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims])
        for out in OUTPUTS:
            response.outputs.add(name=out.name, datatype=out.datatype, shape=[-1, *out.dims])
        return response

    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: Any
    ) -> kpb.ModelConfigResponse:
        """A Triton model configuration as clients read it: a decoupled model (it streams),
        batches of one per request, the tensors of ModelMetadata."""
        self.serving.ready()
        name = self._resolve(request.name, request.version)
        config = mc.ModelConfig(name=name, backend=PLATFORM, max_batch_size=1)
        config.model_transaction_policy.decoupled = True
        for spec in INPUTS:
            config.input.add(
                name=spec.name,
                data_type=_CONFIG_TYPES[spec.datatype],
                dims=list(spec.dims),
                optional=spec.optional,
            )
        for out in OUTPUTS:
            config.output.add(
                name=out.name, data_type=_CONFIG_TYPES[out.datatype], dims=list(out.dims)
            )
        return kpb.ModelConfigResponse(config=config)

    # -- inference --------------------------------------------------------------------------

    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: Any
    ) -> kpb.ModelInferResponse:
        """One whole completion (the prompt before it unless `exclude_input_in_output`)."""
        call = self._infer_call(request, context)
        if call.stream:
            raise RequestError(
                "input 'stream': true needs the ModelStreamInfer RPC (tritonclient: "
                "start_stream and async_stream_infer); ModelInfer returns the whole text"
            )
        events: list[TokenEvent] = []
        async with aclosing(await self._generate(call, request, context)) as stream:
            async for event in stream:
                events.append(event)
        response = _response(request)
        text = "".join(e.text for e in events)
        _outputs(response, call, text if call.exclude_input else call.prompt + text, events, events)
        _note_applied(response, events[-1])
        return response

    async def ModelStreamInfer(
        self, requests: AsyncIterator[kpb.ModelInferRequest | Undecodable], context: Any
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Each request's responses as its tokens come (deltas of `text_output`), requests
        served concurrently; the last response of each carries `triton_final_response`."""
        # Bounded: a request whose responses are not being written waits here, and its engine
        # stream merges the tokens meanwhile (as for a slow nemotron.v1 reader).
        queue: asyncio.Queue[kpb.ModelStreamInferResponse | _ReadFailed | None]
        queue = asyncio.Queue(STREAM_QUEUE)
        running: set[asyncio.Task[None]] = set()

        async def read() -> None:
            try:
                async for request in requests:
                    task = asyncio.create_task(self._stream_one(request, context, queue.put))
                    running.add(task)
                    task.add_done_callback(running.discard)
                while running:  # the client half-closed: finish what it sent, then end
                    await asyncio.wait(set(running))
            except Exception as error:  # reading the requests failed: the call ends with it
                await queue.put(_ReadFailed(error))
                return
            await queue.put(None)

        reader = asyncio.create_task(read())
        try:
            while (message := await queue.get()) is not None:
                if isinstance(message, _ReadFailed):
                    raise message.error
                yield message
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
            await asyncio.gather(reader, *running, return_exceptions=True)

    async def _stream_one(
        self,
        request: kpb.ModelInferRequest | Undecodable,
        context: Any,
        send: Callable[[kpb.ModelStreamInferResponse], Awaitable[None]],
    ) -> None:
        """One request of a stream, start to end, under its own call record."""
        record = request_call(self, "ModelStreamInfer", request, context)
        response_id = request.id if isinstance(request, kpb.ModelInferRequest) else ""

        async def checked(message: kpb.ModelStreamInferResponse) -> None:
            check_size(message, self.max_response_bytes, "stream the text (input 'stream')")
            await send(message)

        with record.active(record.request_body):
            try:
                record.check_id()
                assert isinstance(request, kpb.ModelInferRequest)
                self._check_key(context)  # on every request: a stream outlives key rotations
                call = self._infer_call(request, context)
                empty_final = _empty_final(request)
                async with aclosing(await self._generate(call, request, context)) as events:
                    await _stream_responses(request, call, events, empty_final, checked)
            except asyncio.CancelledError:
                record.finish(record.cancel_code())
                raise
            except Exception as error:  # refused or failed: this request only, the stream goes on
                code, message = status_for(error)
                record.finish(code, message)
                failed = kpb.ModelStreamInferResponse(error_message=message)
                failed.infer_response.id = response_id
                if isinstance(request, kpb.ModelInferRequest):
                    failed.infer_response.model_name = request.model_name
                    failed.infer_response.model_version = request.model_version
                failed.infer_response.parameters[FINAL].bool_param = True
                await send(failed)
                return
            record.finish_sent()

    def _check_key(self, context: Any) -> None:
        """Refuse a stream's request when its key is no longer valid (or no longer may)."""
        if self.api_keys is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        refusal = self.api_keys.check(str(metadata.get("authorization", "")), "ModelStreamInfer")
        if refusal is not None:
            raise refusal

    def _infer_call(self, request: kpb.ModelInferRequest, context: Any) -> InferCall:
        self.serving.ready()
        if not self.health.live:  # draining: calls in flight finish, new requests go elsewhere
            raise NotReadyError("the server is shutting down; send the request to another replica")
        name = self._resolve(request.model_name, request.model_version)
        _empty_final(request)  # its type is checked on every request (perf_analyzer sends it)
        deadline = convert.deadline_from(context.time_remaining())
        tensors = decode_inputs(request, name, check_header(name))
        return infer_call(tensors, [o.name for o in request.outputs], name, deadline)

    async def _generate(
        self, call: InferCall, request: kpb.ModelInferRequest, context: Any
    ) -> AsyncIterator[TokenEvent]:
        """Tokenize and submit (a refusal raises here); the request's events."""
        chat = self.serving.ready()
        ids = await operations.encode(chat, call.prompt, self.serving.offload)
        tag = self.callers.grpc_tag(
            dict(context.invocation_metadata() or ()), context.auth_context()
        )
        own_id = request.id or f"kserve-{uuid.uuid4().hex[:16]}"
        engine_request = GenerationRequest(engine_request_id(tag, own_id), tuple(ids), call.options)
        return operations.generate(chat, engine_request)


@dataclass(frozen=True)
class _ReadFailed:
    """What ends a stream whose requests could not be read (the call fails with `error`)."""

    error: Exception


def _empty_final(request: kpb.ModelInferRequest) -> bool:
    """The client's `triton_enable_empty_final_response` (a bool parameter when present)."""
    if EMPTY_FINAL not in request.parameters:
        return False
    value = request.parameters[EMPTY_FINAL]
    if value.WhichOneof("parameter_choice") != "bool_param":
        raise RequestError(f"invalid value type for '{EMPTY_FINAL}' parameter, expected bool_param")
    return value.bool_param


async def _stream_responses(
    request: kpb.ModelInferRequest,
    call: InferCall,
    events: AsyncIterator[TokenEvent],
    empty_final: bool,
    send: Callable[[kpb.ModelStreamInferResponse], Awaitable[None]],
) -> None:
    """With `stream`, a response per event that brings text (`text_output` is the delta);
    without, one response with the whole text. The last response is flagged final
    (`triton_final_response`), or, when the client asked for it, an empty response after them
    is (the flag is false on every other response: Triton's C++ client reads a response
    without the flag as final)."""
    seen: list[TokenEvent] = []
    pending: list[TokenEvent] = []  # events not yet answered (all of them when not streaming)
    async for event in events:
        seen.append(event)
        pending.append(event)
        last = event.finish_reason is not None
        if not last and (not call.stream or not event.text):
            continue
        text = "".join(e.text for e in pending)
        if not call.stream and not call.exclude_input:
            text = call.prompt + text
        if last and empty_final and call.stream and not _carries(call, text, pending):
            break  # nothing new to say: the empty final response ends it
        response = _response(request)
        _outputs(response, call, text, pending, seen)
        response.parameters[FINAL].bool_param = last and not empty_final
        if last and not empty_final:
            _note_applied(response, event)
        await send(kpb.ModelStreamInferResponse(infer_response=response))
        pending = []
    if empty_final:
        final = _response(request)
        final.parameters[FINAL].bool_param = True
        if seen:
            _note_applied(final, seen[-1])
        await send(kpb.ModelStreamInferResponse(infer_response=final))


def _note_applied(response: kpb.ModelInferResponse, event: TokenEvent) -> None:
    """The final response's `sampling_defaults_applied` parameter: the model's sampling
    defaults the request ran with (JSON), for the tensors it did not send."""
    if event.sampling_applied:
        text = json.dumps(dict(event.sampling_applied), sort_keys=True)
        response.parameters[APPLIED].string_param = text


def _carries(call: InferCall, text: str, events: list[TokenEvent]) -> bool:
    """Whether the last events bring anything the client asked for: text, tokens held back
    (their log-probabilities, their count) or the token counts of the finished request."""
    if text or any(e.token_ids for e in events):
        return True
    return bool(call.outputs & {"num_input_tokens", "num_output_tokens"})


def _response(request: kpb.ModelInferRequest) -> kpb.ModelInferResponse:
    return kpb.ModelInferResponse(
        model_name=request.model_name, model_version=MODEL_VERSION, id=request.id
    )


def _outputs(
    response: kpb.ModelInferResponse,
    call: InferCall,
    text: str,
    events: list[TokenEvent],
    seen: list[TokenEvent],
) -> None:
    """The requested outputs for `events` (this response's) and `seen` (all so far)."""
    if "text_output" in call.outputs:
        encode_output(response, "text_output", "BYTES", (1,), encode_bytes([text.encode()]))
    if "cum_log_probs" in call.outputs:
        total = sum(lp.logprob for e in seen for lp in e.logprobs)
        encode_output(response, "cum_log_probs", "FP32", (1, 1), np.float32(total).tobytes())
    if "output_log_probs" in call.outputs:
        values = np.array([lp.logprob for e in events for lp in e.logprobs], dtype="<f4")
        encode_output(response, "output_log_probs", "FP32", (1, 1, len(values)), values.tobytes())
    usage = seen[-1].usage if seen and seen[-1].usage is not None else None
    if "num_input_tokens" in call.outputs and usage is not None:
        count = np.array([usage.prompt_tokens], dtype="<i4")
        encode_output(response, "num_input_tokens", "INT32", (1, 1), count.tobytes())
    if "num_output_tokens" in call.outputs:
        done = sum(len(e.token_ids) for e in seen)
        encode_output(
            response, "num_output_tokens", "INT32", (1, 1), np.array([done], "<i4").tobytes()
        )
