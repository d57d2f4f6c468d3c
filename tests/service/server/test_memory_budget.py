"""A server in a memory-limited container sizes its KV cache from the limit, not the node.

The container is a fake cgroup v2 mount (`NEMOTRON_CGROUP_ROOT`): a 4 GiB `memory.max` with
1 GiB in use. Before, the server took 10% of the host's MemAvailable whatever the limit, and a
4 GiB pod on a big node was OOM-killed while booting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from nemotron.v1 import generation_pb2 as pb

from tests.service.server_process import start_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

GIB = 2**30
CPU_FRACTION = 0.1  # the cpu profile's kv_cache_free_fraction (engine_build/profiles.yaml)


def fake_cgroup(root: Path, limit: int, in_use: int) -> dict[str, str]:
    """A cgroup v2 mount limiting memory to `limit` with `in_use` bytes used; the server's env."""
    root.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "memory.max").write_text(f"{limit}\n")
    (root / "memory.current").write_text(f"{in_use}\n")
    (root / "memory.stat").write_text(f"anon {in_use}\ninactive_file 0\n")
    return {"NEMOTRON_CGROUP_ROOT": str(root)}


def test_a_4_gib_limit_sizes_the_kv_cache_inside_it(
    cache_dir, cached_embedded_checkpoint, tmp_path
):
    env = fake_cgroup(tmp_path / "cgroup", 4 * GIB, GIB)
    server = start_server(cache_dir, env=env)
    try:
        wait_ready(server)
        (sized,) = server.wait_for_log(lambda line: line["event"] == "kv_cache_sized", "sizing")
        assert sized["bytes"] == int(CPU_FRACTION * 3 * GIB)
        assert "memory.max" in sized["source"] and "4.00 GiB" in sized["source"]
        assert sized["tokens"] == sized["blocks"] * sized["block_size"]
        reply = server.api.Generate(
            pb.GenerateRequest(prompt=pb.Prompt(text="The capital of France is")), timeout=120
        )
        assert reply.usage.completion_tokens >= 1
    finally:
        assert stop_server(server) == 0


def _refused(cache_dir, env: dict[str, str]) -> str:
    """What a server that refuses to start writes (exit code 2, no traceback)."""
    exe = shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"
    result = subprocess.run(
        [exe, "--cache-dir", str(cache_dir), "--host", "127.0.0.1", "--port", "0",
         "--http-port", "off", "--metrics-port", "0", "--log-format", "json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, **env},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_limit_that_cannot_hold_one_sequence_refuses_to_start_saying_why(
    cache_dir, cached_embedded_checkpoint, tmp_path
):
    env = fake_cgroup(tmp_path / "cgroup", 4 * GIB, 3 * GIB)  # 1 GiB left: 0.1 GiB of KV cache
    text = _refused(cache_dir, env)
    assert "one sequence of the engine's max_seq_len 8192 needs" in text, text
    assert "--kv-cache-memory" in text


def test_weights_beyond_the_limit_are_refused_before_loading(
    cache_dir, cached_embedded_checkpoint, tmp_path
):
    """In a container, loading past the limit is an OOM kill with no message."""
    env = fake_cgroup(tmp_path / "cgroup", 4 * GIB, 4 * GIB - 16 * 2**20)  # 16 MiB left
    text = _refused(cache_dir, env)
    assert "the engine's weights take about" in text and "16777216 are available" in text
    assert "memory.max" in text


def test_kv_cache_memory_wins_over_the_limit(cache_dir, cached_embedded_checkpoint, tmp_path):
    env = fake_cgroup(tmp_path / "cgroup", 4 * GIB, GIB)
    server = start_server(cache_dir, "--kv-cache-memory", "48Mi", env=env)
    try:
        wait_ready(server)
        (sized,) = server.wait_for_log(lambda line: line["event"] == "kv_cache_sized", "sizing")
        assert (sized["bytes"], sized["source"]) == (48 * 2**20, "--kv-cache-memory")
        (warned,) = server.wait_for_log(
            lambda line: line["event"] == "kv_cache_below_context", "the warning"
        )
        assert warned["max_seq_len"] == 8192 and warned["needed"] > warned["bytes"]
    finally:
        assert stop_server(server) == 0
