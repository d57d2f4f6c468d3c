"""A TensorRT-LLM engine committed into an EngineRepository, with the files its builder writes.

`engine_build/backends/trtllm.py` `build` leaves in the engine directory: one `rank<N>.engine`
per rank and `config.json` (written by TensorRT-LLM's `Engine.save`), the checkpoint's tokenizer
files and `generation_config.json` (`copy_engine_dir_files`), and `nemotron-engine.json`. The
engines here are stand-ins (TensorRT-LLM cannot run here): a server without the package must
refuse before reading them, and the test double of TensorRT-LLM (tests/doubles/trtllm_site)
reads only `config.json`, checks the rank files exist, and tokenizes with `tokenizer.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine_build.backends.trtllm import ENGINE_FORMAT, build_config_kwargs
from engine_build.profiles import load_profiles
from engine_build.repository import EngineEntry, EngineKey, EngineRepository
from engine_build.synthetic import write_byte_tokenizer
from tests.service.server_process import start_server, stop_server, wait_ready

REPO_ROOT = Path(__file__).resolve().parents[2]
# Put on a server subprocess's PYTHONPATH, `import tensorrt_llm` finds the test double.
DOUBLE_SITE = REPO_ROOT / "tests" / "doubles" / "trtllm_site"
EOS_ID = 0
TOKEN_DELAY_S = "0.05"  # the double's delay per streamed token: 2 s for its whole answer


def commit_trtllm_engine(
    repo_dir: Path, profile_name: str = "h100x2", version: str = "1.2.1"
) -> EngineEntry:
    """Commit a TensorRT-LLM fp8 engine for `profile_name` as `nemotron-build` would."""
    profile = load_profiles().get(profile_name)
    key = EngineKey(
        checkpoint_fingerprint="0" * 64,
        profile=profile.name,
        backend="tensorrt-llm",
        backend_version=version,
        precision="fp8",
        kv_cache_dtype="fp8",
        tensor_parallel=profile.tensor_parallel,
        target=profile.target,
    )
    repository = EngineRepository(repo_dir)
    repository.ensure_writable()
    staging = repository.staging_dir(key.engine_id)
    tp = profile.tensor_parallel
    for rank in range(tp):
        (staging / f"rank{rank}.engine").write_bytes(b"stand-in for a serialized TensorRT plan")
    engine_config = {
        "version": version,
        "pretrained_config": {
            "architecture": "DeciLMForCausalLM",
            "dtype": "bfloat16",
            "vocab_size": 256,
            "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"},
            "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        },
        "build_config": build_config_kwargs(profile, Path("/scratch")),
    }
    (staging / "config.json").write_text(json.dumps(engine_config, indent=2) + "\n")
    write_byte_tokenizer(staging, eos_id=EOS_ID)  # tokenizer.json, tokenizer_config.json
    generation_config = {"bos_token_id": 1, "eos_token_id": [EOS_ID], "do_sample": False}
    (staging / "generation_config.json").write_text(json.dumps(generation_config) + "\n")
    manifest = {
        "format": ENGINE_FORMAT,
        "profile": profile.name,
        "tensor_parallel": tp,
        "precision": {"weights": "fp8", "kv_cache": "fp8"},
        "tensorrt_llm_version": version,
    }
    (staging / "nemotron-engine.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return repository.commit(key, staging)


def double_env(events: Path) -> dict[str, str]:
    """The environment of a server subprocess that imports the double as tensorrt_llm."""
    return {
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(DOUBLE_SITE)]),
        "TRTLLM_DOUBLE_EVENTS": str(events),
        "TRTLLM_DOUBLE_TOKEN_DELAY_S": TOKEN_DELAY_S,
        "TRTLLM_DOUBLE_HOLD": str(_hold_file(events)),
    }


def _hold_file(events: Path) -> Path:
    """While it exists, the double's streams stop after their first token (see _double.py)."""
    return events.with_name("hold")


@contextlib.contextmanager
def holding(events: Path) -> Iterator[None]:
    """Keep the double's streams in flight after their first token until the block ends."""
    _hold_file(events).touch()
    try:
        yield
    finally:
        _hold_file(events).unlink(missing_ok=True)


def seen_events(events: Path) -> list[dict]:
    """What the double recorded so far."""
    return [json.loads(line) for line in events.read_text().splitlines()] if events.exists() else []


# Stand-ins for the remote-code files NVIDIA's Nemotron-NAS checkpoints carry (config.json
# auto_map names them). Only their presence and their relative imports matter here: TensorRT-LLM's
# PyTorch flow runs them through transformers' AutoConfig, which nothing in our tests does.
REMOTE_CONFIG_FILES = {
    "configuration_decilm.py": (
        "from .block_config import BlockConfig\n\n\nclass DeciLMConfig:\n"
        "    block_config_class = BlockConfig\n"
    ),
    "block_config.py": "class BlockConfig:\n    pass\n",
}


def publish_like_nvidia(checkpoint: Path) -> Path:
    """Give a synthetic checkpoint the auto_map and remote-code files of NVIDIA's releases."""
    config_file = checkpoint / "config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_decilm.DeciLMConfig",
        "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM",
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name, text in REMOTE_CONFIG_FILES.items():
        (checkpoint / name).write_text(text)
    return checkpoint


@contextlib.contextmanager
def serving_with_double(root: Path, backend: str, repo: Path, events: Path) -> Iterator[Any]:
    """A ready `nemotron-serve --profile h100x2 --backend BACKEND` on `repo`, the double as
    tensorrt_llm; stopped (exit code 0) afterwards unless a test stopped it itself."""
    server = start_server(
        root, "--profile", "h100x2", "--backend", backend, "--engine-repo", str(repo),
        env=double_env(events),
    )  # fmt: skip
    try:
        wait_ready(server, timeout_s=120)
    except AssertionError:
        server.process.kill()
        raise AssertionError(server.log_path.read_text()) from None
    yield server
    if server.process.poll() is None:
        assert stop_server(server) == 0
