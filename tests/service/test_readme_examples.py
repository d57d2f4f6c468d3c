"""The README's examples (grpcurl, curl, the openai SDK, tritonclient), run as written against a
real server.

Only the address changes: the README says `localhost:8000` (HTTP) and `localhost:50051` (gRPC),
the test server listens on free loopback ports.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def example(name: str) -> str:
    """The fenced block right after `<!-- tested-example: NAME -->`."""
    found = re.search(
        rf"<!-- tested-example: {name} -->\n```\w+\n(.*?)```", README.read_text(), re.DOTALL
    )
    assert found, f"README has no tested example {name!r}"
    return found.group(1)


def _at(server, text: str) -> str:
    assert "localhost:8000" in text or "localhost:50051" in text
    text = text.replace("localhost:8000", f"127.0.0.1:{server.http_port}")
    return text.replace("localhost:50051", server.address)


def _run(*command: str) -> str:
    """The example's standard output (it must exit 0)."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_the_readme_curl_example_answers(server):
    assert shutil.which("curl"), "curl is needed to run the README's example"
    out = _run("bash", "-c", _at(server, example("curl")))
    assert "Paris" in out, out


def test_the_readme_openai_sdk_example_answers(server):
    out = _run(sys.executable, "-c", _at(server, example("python")))
    assert "Paris" in out, out


def test_the_readme_grpcurl_example_answers(server, grpcurl):
    command = _at(server, example("grpcurl")).replace("grpcurl ", f"{grpcurl} ", 1)
    out = _run("bash", "-c", command)
    assert "Paris" in out, out


def test_the_readme_triton_client_example_answers(server):
    assert _run(sys.executable, "-c", _at(server, example("triton"))).strip()  # a continuation


def test_the_readme_nemotron_chat_example_answers(server):
    command = example("nemotron-chat").strip().replace(".venv/bin/", f"{sys.prefix}/bin/", 1)
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NEMOTRON_ADDRESS": server.address},  # the README's default address
    )
    assert result.returncode == 0 and "Paris" in result.stdout, result.stdout + result.stderr
