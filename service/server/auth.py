"""The gRPC side of API keys: an interceptor that refuses API calls without a valid key.

The keys and their file are `service.server.api_keys`; the refusal's status code comes from
the one error table (`service.server.status`). Only the APIs are protected: health (kubelet
probes send no metadata), reflection, and KServe's ServerLive and ServerReady stay open. Keys
never reach the logs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from engine_build.events import log_event
from service.observability.metrics import ServiceMetrics
from service.server.api_keys import ApiKeys
from service.server.kserve.servicer import OPEN_METHODS
from service.server.kserve.servicer import SERVICE_NAME as KSERVE_SERVICE
from service.server.rpc import API_PREFIX
from service.server.status import status_for

KSERVE_PREFIX = f"/{KSERVE_SERVICE}/"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses API calls without a valid key before they reach the servicer."""

    def __init__(self, keys: ApiKeys, metrics: ServiceMetrics | None = None) -> None:
        self.keys, self.metrics = keys, metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = protected_method(handler_call_details.method)
        if handler is None or method is None:
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        refusal = self.keys.check(str(metadata.get("authorization", "")), method)
        if refusal is None:
            return handler
        code, message = status_for(refusal)
        if self.metrics is not None:
            self.metrics.requests.labels(method, code.name).inc()
        log_event("rpc_refused", method=method, code=code.name, reason=message)
        return _refusal(handler, code, message)


def protected_method(full: str) -> str | None:
    """The method name of an RPC that needs a key (None: an open one).

    Every nemotron.v1 RPC and every KServe v2 RPC but ServerLive and ServerReady, which tell no
    more than the health service does.
    """
    if full.startswith(API_PREFIX):
        return full[len(API_PREFIX) :]
    if full.startswith(KSERVE_PREFIX):
        method = full[len(KSERVE_PREFIX) :]
        return None if method in OPEN_METHODS else method
    return None


def _refusal(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape that only aborts."""

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }

    async def deny_bidirectional(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(deny_bidirectional, **serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **serializers)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **serializers)
