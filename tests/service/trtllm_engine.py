"""A TensorRT-LLM engine committed into an EngineRepository, with the files its builder writes.

`engine_build/backends/trtllm.py` `build` leaves in the engine directory: one `rank<N>.engine`
per rank and `config.json` (written by TensorRT-LLM's `Engine.save`), the checkpoint's tokenizer
files and `generation_config.json` (`copy_engine_dir_files`), and `nemotron-engine.json`. The
engines here are stand-ins (TensorRT-LLM cannot run here): a server without the package must
refuse before reading them, and the test double of TensorRT-LLM (tests/doubles/trtllm_site)
reads only `config.json`, checks the rank files exist, and tokenizes with `tokenizer.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine_build.backends.trtllm import ENGINE_FORMAT, build_config_kwargs
from engine_build.profiles import load_profiles
from engine_build.repository import EngineEntry, EngineKey, EngineRepository
from engine_build.synthetic import write_byte_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]
# Put on a server subprocess's PYTHONPATH, `import tensorrt_llm` finds the test double.
DOUBLE_SITE = REPO_ROOT / "tests" / "doubles" / "trtllm_site"
EOS_ID = 0


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
