"""A real `nemotron-serve` process on a loopback port, and the channel to it, for tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nemotron.v1 import generation_pb2_grpc as pb_grpc

# How long a test waits for something a server does (a log line, a metric, a stats change):
# generous, because a busy CI machine is slow, not broken. Tests wait on what they can observe,
# never on a fixed sleep that assumes it happened meanwhile.
WAIT_S = 60.0

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], what: str, timeout_s: float = WAIT_S, interval_s: float = 0.1
) -> T:
    """Poll `predicate` until it returns something truthy and return that; fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def json_log_lines(log_path: Path) -> list[dict]:
    """A server's JSON log lines so far (a last line still being written is left out)."""
    text = log_path.read_text()
    lines = []
    for raw in text[: text.rfind("\n") + 1].splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            lines.append({"event": "<not json>", "raw": raw})
    return lines


def wait_for_log_lines(
    log_path: Path,
    match: Callable[[dict], bool],
    what: str,
    count: int = 1,
    timeout_s: float = WAIT_S,
) -> list[dict]:
    """The log lines of `log_path` matching `match`, once there are at least `count` of them."""

    def matching() -> list[dict]:
        found = [line for line in json_log_lines(log_path) if match(line)]
        return found if len(found) >= count else []

    return wait_until(matching, f"{what} in the server log", timeout_s)


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
    metrics_port: int
    log_path: Path
    http_port: int

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP API."""
        return f"http://127.0.0.1:{self.http_port}"

    def log_lines(self) -> list[dict]:
        """The server's JSON log lines so far (a last line still being written is left out)."""
        return json_log_lines(self.log_path)

    def wait_for_log(
        self, match: Callable[[dict], bool], what: str, count: int = 1, timeout_s: float = WAIT_S
    ) -> list[dict]:
        """The log lines matching `match`, once there are at least `count` of them."""
        return wait_for_log_lines(self.log_path, match, what, count, timeout_s)

    @property
    def api(self) -> pb_grpc.GenerationServiceStub:
        return pb_grpc.GenerationServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> int:
        request = health_pb2.HealthCheckRequest(service=service)
        return self.health.Check(request, timeout=5).status


def start_server(
    cache_dir,
    *extra: str,
    env: dict[str, str] | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    channel_options: tuple[tuple[str, str], ...] = (),
) -> RunningServer:
    """Start a server and return as soon as its port answers (the engine may still load)."""
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    log_path = Path(tempfile.mkdtemp(prefix="nemotron-server-")) / "server.log"
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
            "--metrics-port",
            str(metrics_port),
            "--http-port",
            str(http_port),
            "--log-level",
            "info",
            "--log-format",
            "json",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("w"),
        text=True,
        env={**os.environ, **(env or {})},
    )
    address = f"127.0.0.1:{port}"
    channel = (
        grpc.secure_channel(address, credentials, channel_options)
        if credentials is not None
        else grpc.insecure_channel(address)
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=120)
    except grpc.FutureTimeoutError:
        process.kill()
        raise AssertionError(f"the server did not open its port:\n{log_path.read_text()}") from None
    return RunningServer(process, address, channel, metrics_port, log_path, http_port)


def wait_ready(server: RunningServer, timeout_s: float = 300) -> None:
    """Wait until the server reports readiness (the engine is loaded)."""
    wait_until(
        lambda: server.status("readiness") == health_pb2.HealthCheckResponse.SERVING,
        "the server to become ready",
        timeout_s,
        interval_s=0.2,
    )


def stop_server(server: RunningServer) -> int:
    server.channel.close()
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    return server.process.wait(timeout=60)
