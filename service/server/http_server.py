"""The HTTP port: uvicorn serving the OpenAI-compatible app on the server's own event loop.

uvicorn's signal handling is left out (the process installs its own, and one SIGTERM drains
gRPC and HTTP together); `start` returns once the port is bound, and `stop` stops accepting
connections and gives in-flight requests (streams included) the grace period to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp

from service.server.config import TlsConfig


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers, telling when it has bound the port."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.bound = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the process's own handlers stay in place

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        await super().startup(sockets)
        self.bound.set()


class HttpServer:
    """One uvicorn server for `app` on `host:port` (TLS and mutual TLS from the gRPC files)."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, grace_s: float, tls: TlsConfig | None
    ) -> None:
        options: dict = {}
        if tls is not None:
            options = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file)}
            if tls.client_ca_file is not None:
                options |= {
                    "ssl_ca_certs": str(tls.client_ca_file),
                    "ssl_cert_reqs": ssl.CERT_REQUIRED,
                }
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            loop="none",  # the server's running loop
            lifespan="off",
            log_config=None,  # our structured logs; the call record logs each request
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(grace_s, 0.1),
            **options,
        )
        self._server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve in the background; the port actually bound."""
        self._task = asyncio.create_task(self._serve())
        bound = asyncio.create_task(self._server.bound.wait())
        await asyncio.wait({self._task, bound}, return_when=asyncio.FIRST_COMPLETED)
        if not bound.done():
            bound.cancel()
            await self._task  # raises what stopped the start (a port in use, say)
            raise OSError("the HTTP server stopped while starting")
        sockets = [s for server in self._server.servers for s in server.sockets]
        return int(sockets[0].getsockname()[1])

    async def _serve(self) -> None:
        config = self._server.config
        try:
            await self._server.serve()
        except SystemExit:  # uvicorn exits when it cannot bind; the caller reports it
            raise OSError(f"cannot listen for HTTP on {config.host}:{config.port}") from None

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period."""
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
