"""Getting an engine to serve: the embedded default, or a checkpoint built for the cpu profile."""

from __future__ import annotations

from pathlib import Path

from engine_build.build import BuildRequest, build_engine
from engine_build.embedded import ensure_embedded_checkpoint
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository, EngineRequirement

CPU_PROFILE = "cpu"


def ensure_cpu_engine(
    cache_dir: Path,
    checkpoint: Path | None = None,
    gguf: Path | None = None,
    precision: str | None = None,
) -> Path:
    """The directory of a cpu-profile torch engine for `checkpoint` (default: the embedded model).

    The embedded model is fetched and imported on first use, and the engine is built into
    `cache_dir/engines` once; later calls find it there.
    """
    source = checkpoint or ensure_embedded_checkpoint(cache_dir, gguf=gguf)
    request = BuildRequest(source, load_profiles().get(CPU_PROFILE), precision=precision)
    repository = EngineRepository(cache_dir / "engines")
    built = build_engine(request, repository).entry
    need = EngineRequirement(
        CPU_PROFILE, "cpu", built.key.precision, built.key.checkpoint_fingerprint, backend="torch"
    )
    return repository.select(need).directory  # verifies the key and every file's hash
