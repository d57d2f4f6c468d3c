"""The server process's one typed configuration, parsed once at startup (see `flags`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from service.startup.selection import StartupOptions


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key; a client CA turns on mutual TLS (client certs required)."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials from the files (read once at startup)."""
        ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(self.key_file.read_bytes(), self.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server process needs, parsed once at startup."""

    host: str
    port: int
    startup: StartupOptions  # which engine: profile, repository, checkpoint, build policy
    http_port: int | None = None  # the OpenAI-compatible API (None: off; the flag says 8000)
    served_model_names: tuple[str, ...] = ()  # what the HTTP API answers to (empty: the model's)
    # More names of the KServe v2 / Triton API (Triton's TensorRT-LLM model names).
    triton_model_names: tuple[str, ...] = ("ensemble", "tensorrt_llm_bls")
    compute_threads: int | None = None  # engine compute threads (None: all cores)
    measure_kernels: bool = True  # CPU engines: kernels chosen by measurement (--kernel-choice)
    compiled_decode: tuple[int, ...] = ()  # decode batch sizes to compile (--compiled-decode)
    sampling_defaults: str = "model"  # "model" | "none" (--sampling-defaults)
    kv_cache_memory: int | None = None  # KV cache bytes per device (None: from free memory)
    grace_s: float = 30.0
    max_message_bytes: int = 4 * 1024 * 1024
    max_concurrent_streams: int = 4096  # above the engine's queue bound (flags)
    keepalive_time_s: float = 30.0
    keepalive_timeout_s: float = 10.0
    max_connection_age_s: float = 0.0  # 0: connections live until the client closes them
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8002  # 0: no metrics endpoint
    api_keys_file: Path | None = None
    tls: TlsConfig | None = None
    log_prompts: bool = False
    log_level: str = "info"
    log_format: str = "auto"

    def grpc_options(self) -> list[tuple[str, int]]:
        """Channel arguments: message and stream limits, keepalive, connection age."""
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            # Calls that arrived but that the server has not handed to a handler yet: beyond
            # gRPC's defaults (1,000 soft, 3,000 hard) a burst is cancelled before any handler
            # sees it; these follow the stream limit, so the engine's queue bound decides.
            ("grpc.server.max_pending_requests", self.max_concurrent_streams),
            ("grpc.server.max_pending_requests_hard_limit", 2 * self.max_concurrent_streams),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            # Clients may ping as often as the server does without being told off.
            ("grpc.http2.min_ping_interval_without_data_ms", int(self.keepalive_time_s * 500)),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        if self.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(self.grace_s * 1000)),
            ]
        return options
