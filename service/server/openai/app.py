"""The OpenAI- and NIM-compatible HTTP API: FastAPI routes over the engine the gRPC API serves.

Each request is one `Call` (the record gRPC calls use: request id, logs, span continuing the
caller's `traceparent`, one metrics sample) and goes through the same error table
(`service.server.status`, rendered as OpenAI's error body), the same API keys (the key's
methods name the gRPC RPC a route stands for: `/v1/chat/completions` is Chat or ChatStream)
and the same operations (`service.server.operations`). Streams are Server-Sent Events framed
by sse-starlette, ending with `data: [DONE]`; an error after the stream started is an
`{"error": ...}` event. A client that goes away cancels its request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from engine_build.events import log_event
from service.chat.formats import require_messages
from service.chat.turns import ChatContext
from service.observability.calls import Call, Observability
from service.observability.tracing import current_record, phase
from service.runtime.interface import (
    GenerationRequest,
    NotReadyError,
    OverloadedError,
    RequestError,
    TokenEvent,
)
from service.runtime.tokenizer import ChatMessage
from service.server import operations
from service.server.api_keys import ApiKeys, UnauthenticatedError
from service.server.callers import request_id_problem
from service.server.health import Health
from service.server.openai import convert
from service.server.openai import protocol as api
from service.server.operations import Serving
from service.server.status import (
    CANCELLED,
    UNAVAILABLE,
    NotFoundError,
    Status,
    TooLargeError,
    classify,
)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")
OK = Status(grpc.StatusCode.OK, 200, "")
MAX_PROMPTS = 256  # prompts in one completions request
API_VERSION = "1.0.0"
# The RPCs a route stands for, for API keys limited to some methods (streaming one second).
ROUTE_METHODS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("Chat", "ChatStream"),
    "/v1/completions": ("Generate", "GenerateStream"),
    "/v1/models": ("GetModelInfo",),
    "/v1/metadata": ("GetModelInfo",),
    "/tokenize": ("Tokenize",),
    "/detokenize": ("Tokenize",),
    "/tokenizer_info": ("Tokenize",),
}
# OpenAI's error `code` where a refusal has one.
ERROR_CODES: tuple[tuple[type[BaseException], str], ...] = (
    (UnauthenticatedError, "invalid_api_key"),
    (OverloadedError, "rate_limit_exceeded"),
)


@dataclass(frozen=True)
class HttpApiSettings:
    """What the HTTP API needs besides the engine."""

    served_model_names: tuple[str, ...] = ()  # empty: the model's own name
    max_body_bytes: int = 4 * 1024 * 1024
    api_keys: ApiKeys | None = None
    version: str = ""


class InvalidBodyError(RequestError):
    """A body that is not the route's JSON; `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _HttpCall(Call):
    """One HTTP request in flight."""

    def __init__(self, obs: Observability, request: Request, route: str) -> None:
        # The client's X-Request-Id names the call in logs, spans and the response header; the
        # engine gets an id of the server's own (a retry that reuses the header while the first
        # try is still being aborted must not collide with it).
        given = request.headers.get("x-request-id", "")
        if given and request_id_problem(given) is not None:
            given = ""  # only a name for the logs: an unusable one is replaced, not logged
        self.engine_id = uuid.uuid4().hex
        name = f"{request.method} {route}"
        super().__init__(obs, route, given or self.engine_id, request.headers, name)
        self.http_method, self.route = request.method, route
        self.streaming = False

    def gone(self) -> Status:
        """The status of a call that ended early: the server cut it off at the end of the
        drain's grace (UNAVAILABLE), or the client went away (CANCELLED)."""
        return UNAVAILABLE if self.cancel_code() is grpc.StatusCode.UNAVAILABLE else CANCELLED

    def finish(self, status: Status, message: str = "") -> None:
        """End with the HTTP attributes of the span."""
        attributes = {
            "http.request.method": self.http_method,
            "http.route": self.route,
            "http.response.status_code": status.http_status,
        }
        self.end(status.code, message, attributes)


def error_body(status: Status, message: str, error: BaseException | None = None) -> dict[str, Any]:
    """OpenAI's error object for a status."""
    code = next((c for kind, c in ERROR_CODES if isinstance(error, kind)), None)
    return {
        "error": {
            "message": message,
            "type": status.error_type,
            "param": getattr(error, "param", None),
            "code": getattr(error, "code", None) or code,
        }
    }


def describe(error: BaseException) -> tuple[Status, str, dict[str, Any]]:
    """The status of `error` through the one table, its message and OpenAI's error body."""
    status, message = classify(error)
    if isinstance(error, RequestError) and not isinstance(error, InvalidBodyError):
        message, param = convert.engine_refusal(message)
        return status, message, error_body(status, message, InvalidBodyError(message, param))
    return status, message, error_body(status, message, error)


def error_response(error: BaseException, call: _HttpCall | None = None) -> JSONResponse:
    """The response for `error` (the call records it first)."""
    status, message, body = describe(error)
    if call is not None:
        call.finish(status, message)
    headers = {}
    if isinstance(error, OverloadedError):
        headers = {
            "retry-after": str(max(1, math.ceil(error.retry_after_s))),
            "retry-after-ms": str(int(error.retry_after_s * 1000)),
        }
    if call is not None:
        headers["x-request-id"] = call.record.request_id
    return JSONResponse(body, status.http_status, headers)


def parse(model: type[M], body: bytes) -> M:
    """The body as `model`; a refusal names the field and what was wrong."""
    try:
        return model.model_validate_json(body)
    except ValidationError as err:
        problems = err.errors(include_url=False)
        first = problems[0]
        if first["type"] == "json_invalid":
            raise InvalidBodyError(f"the body is not valid JSON: {first['msg']}") from None
        if first["type"] == "model_type" and not first["loc"]:
            raise InvalidBodyError("the body must be a JSON object") from None
        described = [f"{_loc(p['loc']) or 'body'}: {_problem(p)}" for p in problems[:3]]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InvalidBodyError("; ".join(described) + more, _loc(first["loc"]) or None) from None


def _loc(loc: Sequence[int | str]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _problem(problem: Mapping[str, Any]) -> str:
    if problem["type"] == "extra_forbidden":
        return "unknown field (not part of this API)"
    if problem["type"] == "missing":
        return "required field is missing"
    return str(problem["msg"])


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused past `limit` bytes whether or not a length was declared."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"the body is {int(declared)} bytes; the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLargeError(f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def until_disconnected(request: Request) -> None:
    """Return when the client closes the connection (after its body was read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ClientGoneError(Exception):
    """The client closed the connection before the response was ready."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`, cancelled (and its request aborted) when the client goes away first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientGoneError("the client closed the connection")
    return task.result()


async def merged(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Items of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((index, item, None))
        except Exception as error:  # handed to the reader
            await queue.put((index, None, error))
        await queue.put((index, done, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _scored_prompt(request: GenerationRequest) -> tuple[int, ...] | None:
    """The prompt whose log-probabilities a completion echoes (echo with logprobs)."""
    return request.prompt_ids if request.options.prompt_logprobs is not None else None


async def _close(stream: AsyncIterator[Any]) -> None:
    """Close an async generator now (its request is aborted), not when it is collected."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(BaseException):
            await aclose()


def openai_json(body: BaseModel | dict[str, Any]) -> str:
    """A body as OpenAI writes it: optional fields left out, but a choice's `finish_reason` and
    `logprobs`, and a message's `content` beside tool calls, written as null (clients test
    `finish_reason !== null`)."""
    if isinstance(body, BaseModel):
        body = body.model_dump(mode="json", exclude_none=True)
        for choice in body.get("choices", ()):
            choice.setdefault("finish_reason", None)
            choice.setdefault("logprobs", None)
            message = choice.get("message")
            if message is not None:
                message.setdefault("content", None)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def json_response(body: BaseModel | dict[str, Any], call: _HttpCall) -> Response:
    """A JSON response, naming the call."""
    headers = {"x-request-id": call.record.request_id}
    return Response(openai_json(body), media_type="application/json", headers=headers)


def sse_data(body: BaseModel | dict[str, Any] | str) -> dict[str, str]:
    """One SSE event's fields (sse-starlette frames them); a string is JSON already written."""
    return {"data": body if isinstance(body, str) else openai_json(body)}


class TextChunk:
    """A stream chunk whose only varying part is one text (a token's), written fast.

    Building and dumping the pydantic chunk per token cost more than the rest of the token's
    way out of the server. The chunk is rendered once by `openai_json`, with a marker where the
    text goes (every field that holds it), and each token's chunk is that JSON with the marker
    replaced by the token's JSON string: the same bytes `openai_json` would write.
    """

    MARK = "\x00text\x00"

    def __init__(self, make: Callable[[str], BaseModel]) -> None:
        self._json = openai_json(make(self.MARK))
        self._mark = json.dumps(self.MARK)
        if self._mark not in self._json:
            raise ValueError("the chunk does not carry its text")

    def __call__(self, text: str) -> str:
        """The chunk's JSON with `text` in it."""
        return self._json.replace(self._mark, json.dumps(text, ensure_ascii=False))


class HttpApi:
    """The FastAPI application and what its routes serve from."""

    def __init__(
        self,
        serving: Serving,
        observability: Observability,
        health: Health,
        settings: HttpApiSettings,
    ) -> None:
        self.serving, self.obs, self.health, self.settings = (
            serving,
            observability,
            health,
            settings,
        )
        self.started = int(time.time())
        # Streams end when their request ends; a drain waits for them (within the grace).
        AppStatus.disable_automatic_graceful_drain()
        self.app = self._build()

    # --- the application ------------------------------------------------------------------

    def _build(self) -> FastAPI:
        app = FastAPI(
            # The server's own spans, logs and metrics describe every call (one record for
            # both APIs); FastAPI's built-in OpenTelemetry would add a second set.
            telemetry={"tracing": False, "metrics": False, "logs": False},
            title="nemotron-serve",
            version=self.settings.version,
            description="OpenAI- and NIM-compatible API of nemotron-serve",
        )
        routes: tuple[tuple[str, str, Callable[..., Awaitable[Response]]], ...] = (
            ("POST", "/v1/chat/completions", self._chat),
            ("POST", "/v1/completions", self._completions),
            ("GET", "/v1/models", self._models),
            ("GET", "/v1/metadata", self._metadata),
            ("POST", "/tokenize", self._tokenize),
            ("POST", "/detokenize", self._detokenize),
            ("GET", "/tokenizer_info", self._tokenizer_info),
        )
        for method, path, handler in routes:
            app.add_api_route(path, self._endpoint(path, handler), methods=[method])
        app.add_api_route("/v1/health/live", self._live, methods=["GET"])
        app.add_api_route("/v1/health/ready", self._ready, methods=["GET"])
        app.add_api_route("/v1/version", self._version, methods=["GET"])
        for path in ("/metrics", "/v1/metrics"):
            app.add_api_route(path, self._metrics, methods=["GET"])
        app.add_exception_handler(HTTPException, self._http_error)  # unknown route, method
        return app

    def _endpoint(
        self, route: str, handler: Callable[[_HttpCall, Request, bytes], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            call = _HttpCall(self.obs, request, route)
            with call.active():
                try:
                    if not self.health.live:
                        raise NotReadyError("the server is draining; retry on another replica")
                    self._authenticate(request, route)
                    body = await read_body(request, self.settings.max_body_bytes)
                    response = await unless_disconnected(request, handler(call, request, body))
                except (ClientGoneError, ClientDisconnect):  # nobody reads the answer
                    call.finish(CANCELLED)
                    return Response(status_code=CANCELLED.http_status)
                except asyncio.CancelledError:  # the server is stopping
                    call.finish(call.gone())
                    raise
                except Exception as error:
                    return error_response(error, call)
                if not call.streaming:
                    call.finish(OK)
                return response

        endpoint.__name__ = route.strip("/").replace("/", "_").replace(".", "_")
        return endpoint

    async def _http_error(self, request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        status = Status(grpc.StatusCode.NOT_FOUND, error.status_code, "invalid_request_error")
        if error.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the routes served"
        else:
            message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(status, message), error.status_code)

    # --- checks ---------------------------------------------------------------------------

    def _authenticate(self, request: Request, route: str) -> None:
        """Refuse a missing or unknown key before reading the body (401), and a key that may
        not call the route's one RPC (403); where streaming picks the RPC, `_permit` decides."""
        if self.settings.api_keys is None or route not in ROUTE_METHODS:
            return
        methods = ROUTE_METHODS[route]
        refusal = self.settings.api_keys.check(self._authorization(request), methods[0])
        if isinstance(refusal, UnauthenticatedError) or (refusal and len(methods) == 1):
            raise refusal

    def _permit(self, request: Request, method: str) -> None:
        """Refuse a key that may not call the RPC this request stands for (403)."""
        if self.settings.api_keys is None:
            return
        refusal = self.settings.api_keys.check(self._authorization(request), method)
        if refusal is not None:
            raise refusal

    @staticmethod
    def _authorization(request: Request) -> str:
        return request.headers.get("authorization", "")

    def _names(self) -> tuple[str, ...]:
        return self.settings.served_model_names or (self.serving.model_info().model,)

    async def _parse(self, model: type[M], body: bytes) -> M:
        """`parse`, off the event loop for a large body."""
        return await self.serving.offload.run(lambda: parse(model, body), len(body))

    def _model(self, name: str | None) -> str:
        """The served name a request asked for; an unknown one is 404 model_not_found."""
        names = self._names()
        if name is None:
            return names[0]
        if name not in names:
            error = NotFoundError(
                f"the model {name!r} does not exist; this server serves {', '.join(names)}"
            )
            error.code, error.param = "model_not_found", "model"  # type: ignore[attr-defined]
            raise error
        return name

    def _log_body(self, body: BaseModel) -> None:
        if self.obs.log_prompts:
            log_event("rpc_request", body=body.model_dump(exclude_none=True))

    # --- chat -----------------------------------------------------------------------------

    async def _chat(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        chat = await self._parse(api.ChatCompletionRequest, body)
        self._log_body(chat)
        self._permit(request, "ChatStream" if chat.stream else "Chat")
        context = self.serving.ready()
        model = self._model(chat.model)
        response_id = f"chatcmpl-{call.engine_id}"
        answer = await operations.chat(
            context,
            lambda: convert.chat_turn(chat, call.engine_id),
            self.serving.offload,
            len(body),
        )  # admitted: a stream starts now
        if not chat.stream:
            deltas = [d async for d in answer]
            for delta in deltas:
                call.keep_text(delta.reasoning, delta.content)
            return json_response(
                convert.chat_completion(response_id, model, deltas, context.tokenizer), call
            )
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        chunks = self._chat_chunks(call, answer, response_id, model, include_usage)
        return self._stream(call, chunks)

    async def _chat_chunks(
        self,
        call: _HttpCall,
        deltas: AsyncIterator[Any],
        response_id: str,
        model: str,
        include_usage: bool,
    ) -> AsyncIterator[BaseModel | str]:
        tokenizer = self.serving.ready().tokenizer
        created = int(time.time())

        def chunk(
            delta: api.AssistantMessage | None, applied: Any = None, **fields: Any
        ) -> api.ChatCompletion:
            choice = api.ChatChoice(index=0, delta=delta, **fields)
            return api.ChatCompletion(
                id=response_id,
                object="chat.completion.chunk",
                created=created,
                model=model,
                choices=[choice],
                sampling_defaults_applied=applied,
            )

        content = TextChunk(lambda t: chunk(api.AssistantMessage(content=t)))
        reasoning = TextChunk(
            lambda t: chunk(api.AssistantMessage(reasoning_content=t, reasoning=t))
        )
        yield chunk(api.AssistantMessage(role="assistant", content=""))
        async for delta in deltas:
            call.keep_text(delta.reasoning, delta.content)
            if delta.logprobs or (delta.reasoning and delta.content):
                text = api.AssistantMessage(
                    content=delta.content or None,
                    reasoning_content=delta.reasoning or None,
                    reasoning=delta.reasoning or None,
                )
                yield chunk(text, logprobs=convert.chat_logprobs(delta.logprobs, tokenizer))
            elif delta.content:
                yield content(delta.content)
            elif delta.reasoning:
                yield reasoning(delta.reasoning)
            if delta.finish_reason is None:
                continue
            if delta.tool_calls:
                calls = convert.tool_calls(delta.tool_calls, stream=True)
                yield chunk(api.AssistantMessage(tool_calls=calls))
            yield chunk(
                api.AssistantMessage(),
                convert.applied(delta.sampling_applied),
                finish_reason=convert.finish_reason(delta.finish_reason),
            )
            if include_usage and delta.usage is not None:
                yield api.ChatCompletion(
                    id=response_id,
                    object="chat.completion.chunk",
                    created=created,
                    model=model,
                    choices=[],
                    usage=convert.chat_usage(delta.usage),
                )

    # --- completions ----------------------------------------------------------------------

    async def _completions(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        completion = await self._parse(api.CompletionRequest, body)
        self._log_body(completion)
        self._permit(request, "GenerateStream" if completion.stream else "Generate")
        context = self.serving.ready()
        model = self._model(completion.model)
        if completion.max_tokens is None:  # OpenAI's default for completions
            completion = completion.model_copy(update={"max_tokens": 16})

        def prepare() -> tuple[list[GenerationRequest], list[str]]:
            requests = convert.generation_requests(
                completion, call.engine_id, context.tokenizer, max_prompts=MAX_PROMPTS
            )
            echoes = [
                context.tokenizer.decode(r.prompt_ids, skip_special_tokens=False)
                if completion.echo
                else ""
                for r in requests
            ]
            return requests, echoes

        with phase("tokenize"):  # as gRPC's Generate: the span's first child
            requests, echoes = await self.serving.offload.run(prepare, len(body))
        response_id = f"cmpl-{call.engine_id}"
        streams = self._submit(context, requests)
        if not completion.stream:
            events: list[list[TokenEvent]] = [[] for _ in requests]
            async for index, event in merged(streams):
                events[index].append(event)
                call.keep_text(event.text)
            return json_response(
                self._completion(response_id, model, requests, events, echoes), call
            )
        include_usage = bool(completion.stream_options and completion.stream_options.include_usage)
        tagged = merged(streams)  # admitted: the stream starts now, before the first token
        chunks = self._completion_chunks(
            call, tagged, response_id, model, requests, echoes, include_usage
        )
        return self._stream(call, chunks)

    @staticmethod
    def _submit(
        context: ChatContext, requests: Sequence[GenerationRequest]
    ) -> list[AsyncIterator[TokenEvent]]:
        """Submit every prompt, or none: a refusal aborts those already admitted."""
        streams: list[AsyncIterator[TokenEvent]] = []
        try:
            for request in requests:
                streams.append(operations.generate(context, request))
        except BaseException:
            for request in requests[: len(streams)]:
                context.engine.abort(request.request_id)
            raise
        return streams

    def _completion(
        self,
        response_id: str,
        model: str,
        requests: Sequence[GenerationRequest],
        events: Sequence[Sequence[TokenEvent]],
        echoes: Sequence[str],
    ) -> api.Completion:
        tokenizer = self.serving.ready().tokenizer
        choices = [
            convert.completion_choice(
                i, events[i], tokenizer, echoes[i], _scored_prompt(requests[i])
            )
            for i in range(len(requests))
        ]
        usage = self._completion_usage(requests, events)
        self._note_usage(usage)
        return api.Completion(
            id=response_id,
            created=int(time.time()),
            model=model,
            choices=choices,
            usage=usage,
            sampling_defaults_applied=convert.applied(events[0][-1].sampling_applied),
        )

    @staticmethod
    def _completion_usage(
        requests: Sequence[GenerationRequest], events: Sequence[Sequence[TokenEvent]]
    ) -> api.Usage:
        prompt = sum(len(r.prompt_ids) for r in requests)
        generated = sum(len(e.token_ids) for stream in events for e in stream)
        cached = sum(e.usage.cached_prompt_tokens for s in events for e in s if e.usage)
        return convert.usage(prompt, generated, cached=cached)

    @staticmethod
    def _note_usage(usage: api.Usage) -> None:
        """Several prompts in one request: the call record counts them all."""
        record = current_record()
        if record is not None:
            record.prompt_tokens, record.completion_tokens = (
                usage.prompt_tokens,
                usage.completion_tokens,
            )

    async def _completion_chunks(
        self,
        call: _HttpCall,
        tagged: AsyncIterator[tuple[int, TokenEvent]],
        response_id: str,
        model: str,
        requests: Sequence[GenerationRequest],
        echoes: Sequence[str],
        include_usage: bool,
    ) -> AsyncIterator[BaseModel | str]:
        tokenizer = self.serving.ready().tokenizer
        created = int(time.time())
        offsets = [len(e) for e in echoes]
        events: list[list[TokenEvent]] = [[] for _ in requests]

        def chunk(
            choices: list[api.CompletionChoice], usage: api.Usage | None = None, applied: Any = None
        ) -> Any:
            return api.Completion(
                id=response_id,
                created=created,
                model=model,
                choices=choices,
                usage=usage,
                sampling_defaults_applied=applied,
            )

        plain: dict[int, TextChunk] = {}  # by prompt: a token's text and nothing else

        def text_chunk(index: int, text: str) -> str:
            if index not in plain:
                plain[index] = TextChunk(
                    lambda t: chunk([api.CompletionChoice(index=index, text=t)])
                )
            return plain[index](text)

        unechoed = set()  # echoes waiting for their prompt's log-probabilities
        for index, echo in enumerate(echoes):
            if echo and _scored_prompt(requests[index]) is not None:
                unechoed.add(index)
            elif echo:
                yield chunk([api.CompletionChoice(index=index, text=echo)])
        async for index, event in tagged:
            events[index].append(event)
            call.keep_text(event.text)
            if index in unechoed:  # the first event: the prompt's own (none for one token)
                unechoed.discard(index)
                scored = convert.echo_logprobs(
                    requests[index].prompt_ids, event.prompt_logprobs, tokenizer
                )
                yield chunk(
                    [api.CompletionChoice(index=index, text=echoes[index], logprobs=scored)]
                )
                if not (event.token_ids or event.text or event.finish_reason):
                    continue
            if not (event.finish_reason or convert.event_logprobs(event)):
                offsets[index] += len(event.text)
                yield text_chunk(index, event.text)
                continue
            logprobs = None
            if convert.event_logprobs(event):
                logprobs = convert.completion_logprobs(
                    convert.event_logprobs(event), tokenizer, offsets[index]
                )
            offsets[index] += len(event.text)
            finish = convert.finish_reason(event.finish_reason)
            choice = api.CompletionChoice(
                index=index, text=event.text, logprobs=logprobs, finish_reason=finish
            )
            yield chunk([choice], applied=convert.applied(event.sampling_applied))
        usage = self._completion_usage(requests, events)
        self._note_usage(usage)  # the call's record counts every prompt, usage asked or not
        if include_usage:
            yield chunk([], usage)

    # --- streaming ------------------------------------------------------------------------

    def _stream(self, call: _HttpCall, chunks: AsyncIterator[BaseModel | str]) -> Response:
        """An SSE response of `chunks` then `[DONE]`; the call ends with the stream."""
        call.streaming = True

        async def events() -> AsyncIterator[dict[str, str]]:
            with call.active():
                try:
                    async for item in chunks:
                        yield sse_data(item)
                except (asyncio.CancelledError, GeneratorExit):  # client gone, or drain over
                    call.finish(call.gone())
                    await _close(chunks)
                    raise
                except Exception as error:  # after the first byte: an error event
                    status, message, body = describe(error)
                    call.finish(status, message)
                    yield sse_data(body)
                else:
                    call.finish(OK)
                yield {"data": "[DONE]"}

        return EventSourceResponse(
            events(), sep="\n", headers={"x-request-id": call.record.request_id}
        )

    # --- models, tokens, health, metrics ----------------------------------------------------

    async def _models(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        info = self.serving.model_info()
        data = [
            {
                "id": name,
                "object": "model",
                "created": self.started,
                "owned_by": "nemotron-serve",
                "root": info.model,
                "max_model_len": info.max_context_tokens,
            }
            for name in self._names()
        ]
        return json_response({"object": "list", "data": data}, call)

    async def _metadata(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        info = self.serving.model_info()
        return json_response(
            {
                "version": self.settings.version,
                "modelInfo": [{"shortName": name} for name in self._names()],
                "engine": {**info.__dict__},
            },
            call,
        )

    async def _tokenize(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        asked = await self._parse(api.TokenizeRequest, body)
        context = self.serving.ready()
        self._model(asked.model)
        if (asked.prompt is None) == (asked.messages is None):
            raise InvalidBodyError("send exactly one of prompt and messages", "prompt")
        if asked.add_special_tokens:
            raise InvalidBodyError(
                "add_special_tokens: true is not supported; allowed: false (prompts are encoded "
                "as they are; chat templates write the special tokens)",
                "add_special_tokens",
            )

        def tokenize() -> list[int]:
            if asked.messages is None:
                return context.tokenizer.encode(asked.prompt or "")
            messages: list[ChatMessage] = [
                convert.message(i, m) for i, m in enumerate(asked.messages)
            ]
            require_messages(messages)
            text = context.tokenizer.chat_prompt(
                messages, add_generation_prompt=asked.add_generation_prompt
            )
            return context.tokenizer.encode(text)

        ids = await self.serving.offload.run(tokenize, len(body))
        limit = self.serving.model_info().max_context_tokens
        return json_response({"count": len(ids), "max_model_len": limit, "tokens": ids}, call)

    async def _detokenize(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        asked = await self._parse(api.DetokenizeRequest, body)
        context = self.serving.ready()
        self._model(asked.model)
        vocab = context.engine.limits.vocab_size
        bad = [t for t in asked.tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidBodyError(
                f"tokens: {bad[0]} is not a token id; allowed: 0 to {vocab - 1}", "tokens"
            )
        text = await self.serving.offload.run(
            lambda: context.tokenizer.decode(asked.tokens), len(asked.tokens)
        )
        return json_response({"prompt": text}, call)

    async def _tokenizer_info(self, call: _HttpCall, request: Request, body: bytes) -> Response:
        """vLLM's tokenizer description (lm-evaluation-harness's remote tokenizer reads it)."""
        tokenizer = self.serving.ready().tokenizer
        info: dict[str, Any] = {
            key: tokenizer.special_token(key) for key in ("bos_token", "eos_token", "pad_token")
        }
        info |= {
            "chat_template": tokenizer.chat_template_source,
            "model_max_length": self.serving.model_info().max_context_tokens,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
        return json_response(info, call)

    async def _live(self) -> Response:
        if self.health.live:
            return JSONResponse({"object": "health.response", "message": "live"})
        return JSONResponse({"object": "health.response", "message": "draining"}, 503)

    async def _ready(self) -> Response:
        if self.health.serving:
            return JSONResponse({"object": "health.response", "message": "ready"})
        state = "draining" if not self.health.live else "not ready (the engine is loading)"
        return JSONResponse({"object": "health.response", "message": state}, 503)

    async def _version(self) -> Response:
        return JSONResponse({"release": self.settings.version, "api": API_VERSION})

    async def _metrics(self) -> Response:
        if self.obs.metrics is None:
            return JSONResponse(error_body(OK, "metrics are off"), 404)
        return Response(generate_latest(self.obs.metrics.registry), media_type=CONTENT_TYPE_LATEST)
