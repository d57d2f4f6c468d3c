"""`nemotron-healthcheck` against small in-process grpc.aio health servers: exit codes, TLS,
timeouts, usage errors, and a start that imports no torch."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from service.client.healthcheck import main
from tests.conftest import REPO_ROOT
from tests.service.certs import SERVER_NAME, make_certificates, needs_openssl

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
UNKNOWN = health_pb2.HealthCheckResponse.UNKNOWN
# The names nemotron-serve registers, as they read while its engine is still loading.
LOADING = {"": SERVING, "liveness": SERVING, "readiness": NOT_SERVING, "stale": UNKNOWN}


@dataclass
class HealthServer:
    """A grpc.aio server with only the health service, on its own event loop thread."""

    address: str
    loop: asyncio.AbstractEventLoop
    server: grpc.aio.Server
    thread: threading.Thread

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_health_server(
    statuses: dict[str, int], credentials: grpc.ServerCredentials | None = None
) -> HealthServer:
    """Serve `statuses` on a loopback port (TLS when `credentials` are given)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        health = HealthServicer()
        for name, status in statuses.items():
            await health.set(name, status)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        if credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    return HealthServer(f"127.0.0.1:{port}", loop, server, thread)


@pytest.fixture(scope="module")
def loading() -> Iterator[HealthServer]:
    server = start_health_server(LOADING)
    yield server
    server.stop()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # nothing listens once the socket closes


def test_serving_exits_0_and_prints_the_status(loading, capsys):
    assert main(["--address", loading.address, "--service", "liveness"]) == 0
    assert capsys.readouterr().out.strip() == f"'liveness' at {loading.address}: SERVING"
    assert main(["--address", loading.address, "--service", ""]) == 0


def test_not_serving_exits_1_and_prints_the_status(loading, capsys):
    assert main(["--address", loading.address]) == 1  # readiness is the default service
    assert capsys.readouterr().out.strip() == f"'readiness' at {loading.address}: NOT_SERVING"


def test_unknown_status_exits_1(loading, capsys):
    assert main(["--address", loading.address, "--service", "stale"]) == 1
    assert capsys.readouterr().out.strip().endswith(": UNKNOWN")


def test_a_service_the_server_does_not_know_exits_1_as_service_unknown(loading, capsys):
    assert main(["--address", loading.address, "--service", "nemotron.v1.Nope"]) == 1
    expected = f"'nemotron.v1.Nope' at {loading.address}: SERVICE_UNKNOWN"
    assert capsys.readouterr().out.strip() == expected


def test_the_address_comes_from_the_environment_when_no_flag_gives_it(loading, monkeypatch, capsys):
    monkeypatch.setenv("NEMOTRON_HEALTH_ADDRESS", loading.address)
    assert main(["--service", "liveness"]) == 0
    assert loading.address in capsys.readouterr().out


def test_a_refused_connection_exits_1_at_once_with_one_line(capsys):
    address = f"127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    assert main(["--address", address, "--timeout", "10"]) == 1
    assert time.monotonic() - started < 3  # refused, not waited out
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cannot check 'readiness' at {address}: ")
    assert "UNAVAILABLE" in err


def test_a_server_that_never_answers_exits_1_after_the_timeout(capsys):
    with socket.socket() as silent:  # accepts TCP connections, never speaks HTTP/2
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        assert main(["--address", address, "--timeout", "0.5"]) == 1
        elapsed = time.monotonic() - started
    assert 0.4 < elapsed < 3
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--timeout", "0"], "must be > 0 seconds"),
        (["--timeout", "nan"], "must be > 0 seconds"),
        (["--timeout", "soon"], "must be a number of seconds"),
        (["--tls-cert", "client.pem"], "--tls-cert and --tls-key go together"),
        (
            ["--tls-ca", "/nonexistent/ca.pem"],
            "--tls-ca: cannot read /nonexistent/ca.pem: No such file",
        ),
        (["surplus"], "unrecognized arguments: surplus"),
    ],
)
def test_usage_errors_exit_2_with_the_reason(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_certificates(directory)
    return directory


@needs_openssl
def test_mutual_tls_needs_the_ca_the_client_certificate_and_the_server_name(certificates, capsys):
    pki = {name: (certificates / name).read_bytes() for name in ("ca.pem", "server.pem")}
    credentials = grpc.ssl_server_credentials(
        [((certificates / "server.key").read_bytes(), pki["server.pem"])],
        root_certificates=pki["ca.pem"],
        require_client_auth=True,
    )
    server = start_health_server({"readiness": SERVING}, credentials)
    try:
        base = ["--address", server.address, "--tls-ca", str(certificates / "ca.pem")]
        client = ["--tls-cert", str(certificates / "client.pem"),
                  "--tls-key", str(certificates / "client.key")]  # fmt: skip
        assert main([*base, *client, "--tls-server-name", SERVER_NAME]) == 0
        assert capsys.readouterr().out.strip().endswith(": SERVING")
        assert main([*base, "--tls-server-name", SERVER_NAME]) == 1  # no client certificate
        assert main([*base, *client]) == 1  # 127.0.0.1 is not the certificate's name
        assert main(["--address", server.address]) == 1  # plaintext to a TLS port
        assert "cannot check" in capsys.readouterr().err
    finally:
        server.stop()


def test_the_console_script_answers_with_its_exit_code(loading):
    exe = shutil.which("nemotron-healthcheck") or f"{sys.prefix}/bin/nemotron-healthcheck"
    assert os.path.exists(exe), "pip install -e . installs the nemotron-healthcheck script"
    for service, code in (("liveness", 0), ("readiness", 1)):
        done = subprocess.run(
            [exe, "--address", loading.address, "--service", service],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == code, done.stderr


def test_importing_the_probe_loads_only_grpc_and_the_health_stubs():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import service.client.healthcheck"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert {"grpc", "grpc_health", "service"} <= imported
    heavy = {"torch", "numpy", "nemotron", "engine_build", "opentelemetry", "structlog",
             "kubernetes", "prometheus_client", "yaml", "jinja2"}  # fmt: skip
    assert imported & heavy == set()
