"""`nemotron-healthcheck`, the exec probe, against a real `nemotron-serve` process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _probe(server, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("nemotron-healthcheck") or f"{sys.prefix}/bin/nemotron-healthcheck"
    assert os.path.exists(exe), "pip install -e . installs the nemotron-healthcheck script"
    return subprocess.run(
        [exe, "--address", server.address, *args], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("service", ["readiness", "liveness", "", "nemotron.v1.GenerationService"])
def test_every_name_the_server_registers_is_serving_once_ready(server, service):
    done = _probe(server, "--service", service)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{service!r} at {server.address}: SERVING"


def test_readiness_is_the_default_service(server):
    done = _probe(server)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("'readiness' at ")


def test_a_service_name_the_server_does_not_register_exits_1(server):
    done = _probe(server, "--service", "nemotron.v1.Nope")
    assert done.returncode == 1
    assert done.stdout.strip().endswith(": SERVICE_UNKNOWN")
