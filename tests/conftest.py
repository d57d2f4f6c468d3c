"""Shared fixtures: small real checkpoints built on the fly and the embedded SmolLM2 model."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from engine_build.embedded import default_cache_dir, ensure_embedded_checkpoint, fetch_gguf
from engine_build.gguf_import import import_gguf
from engine_build.synthetic import write_synthetic_checkpoint

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real config.json of Llama-3.3-Nemotron-Super-49B-v1 (vendored: tests run on a clean clone).
REFERENCE_49B = REPO_ROOT / "tests" / "data" / "nemotron-super-49b-v1.config.json"


# Servers started by tests serve eagerly: compiling the decode step (tens of seconds of CPU per
# batch size, in the background) would only slow the suite. Tests of the compiled step and of the
# flag's default set it themselves (tests/service/runtime/test_compiled.py).
os.environ.setdefault("NEMOTRON_COMPILED_DECODE", "off")
# ... and greedily unless a request asks otherwise: most tests compare exact tokens across paths.
# The model's sampling defaults are tested where they are meant (tests/service/chat/
# test_sampling_defaults.py), with --sampling-defaults model.
os.environ.setdefault("NEMOTRON_SAMPLING_DEFAULTS", "none")


# SmolLM2-135M-Instruct's architecture as a plain Llama config (the field guide's figures).
SMOLLM2_LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


@pytest.fixture(autouse=True)
def _restore_nemotron_logger() -> Iterator[None]:
    """Undo a CLI's `configure_logging` run in-process: its handler writes to the test's
    captured stderr, which is closed once the test ends."""
    logger = logging.getLogger("nemotron")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def double(monkeypatch) -> Iterator[ModuleType]:
    """`import tensorrt_llm` finds the TEST DOUBLE of TensorRT-LLM's LLM API for this test only
    (tests/doubles/trtllm_site; then it is forgotten again)."""
    site = REPO_ROOT / "tests" / "doubles" / "trtllm_site"
    monkeypatch.syspath_prepend(str(site))
    module = importlib.import_module("tensorrt_llm")
    assert Path(module.__file__).is_relative_to(site)
    yield module
    for name in [n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture(scope="session")
def reference_config() -> Path:
    return REFERENCE_49B


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return default_cache_dir(os.environ)


@pytest.fixture(scope="session")
def synthetic_checkpoint(tmp_path_factory) -> Path:
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def embedded_gguf(cache_dir) -> Path:
    return fetch_gguf(cache_dir)


@pytest.fixture(scope="session")
def embedded_checkpoint(tmp_path_factory, embedded_gguf) -> Path:
    """A fresh import made by this run's importer (a cached one could predate a change)."""
    return import_gguf(embedded_gguf, tmp_path_factory.mktemp("embedded") / "smollm2")


@pytest.fixture(scope="session")
def cached_embedded_checkpoint(cache_dir, embedded_gguf) -> Path:
    """The import the product itself uses, from the cache."""
    return ensure_embedded_checkpoint(cache_dir, gguf=embedded_gguf)


TEST_PROFILES = """
profiles:
  cpu-tp2:
    description: two CPU processes (gloo), for tensor-parallel tests
    device: cpu
    memory_gb: 16
    reserve_gb: 1
    tensor_parallel: 2
    precisions: [{weights: fp32, kv_cache: fp32}, {weights: bf16, kv_cache: bf16}]
    limits: {max_batch_size: 8, max_seq_len: 1024, max_num_tokens: 512, kv_cache_free_fraction: 0.5}
  cpu-tp4:
    description: four CPU processes (gloo), for tensor-parallel tests
    device: cpu
    memory_gb: 16
    reserve_gb: 1
    tensor_parallel: 4
    precisions: [{weights: fp32, kv_cache: fp32}]
    limits: {max_batch_size: 8, max_seq_len: 1024, max_num_tokens: 512, kv_cache_free_fraction: 0.5}
  cpu-tp3:
    description: three CPU processes (gloo), for tensor-parallel tests
    device: cpu
    memory_gb: 16
    reserve_gb: 1
    tensor_parallel: 3
    precisions: [{weights: fp32, kv_cache: fp32}, {weights: bf16, kv_cache: bf16}]
    limits: {max_batch_size: 8, max_seq_len: 8192, max_num_tokens: 512, kv_cache_free_fraction: 0.5}
"""


@pytest.fixture(scope="session")
def test_profiles_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profiles") / "test-profiles.yaml"
    path.write_text(TEST_PROFILES)
    return path
