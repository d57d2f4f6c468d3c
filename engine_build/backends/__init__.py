"""Engine build backends behind one interface, chosen by name or automatically."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engine_build.checkpoint import Checkpoint
from engine_build.profiles import DeviceKind, Precision, Profile


class BackendError(RuntimeError):
    """A backend that is unknown, not installed here, or cannot build this request."""


@dataclass(frozen=True)
class BuildJob:
    """What to build: a validated checkpoint for one profile and precision."""

    checkpoint: Checkpoint
    profile: Profile
    precision: Precision
    calibration_dataset: str | None = None


class BuildBackend(Protocol):
    """Turns a `BuildJob` into engine files in a directory."""

    name: str

    def is_available(self) -> bool:
        """Whether this backend can run on this machine."""
        ...

    def version(self) -> str:
        """The version that goes into the engine key."""
        ...

    def check(
        self, profile: Profile, precision: Precision, calibration_dataset: str | None
    ) -> None:
        """Refuse, before any work, a request this backend cannot build (BackendError)."""
        ...

    def build(self, job: BuildJob, out_dir: Path) -> None:
        """Write the engine's files (including engine.json) into `out_dir`."""
        ...


def backend_names() -> list[str]:
    """Names accepted by `select_backend`, `auto` first."""
    return ["auto", *_registry()]


def select_backend(name: str, profile: Profile) -> BuildBackend:
    """The backend called `name`; `auto` prefers TensorRT-LLM for GPU profiles where installed."""
    registry = _registry()
    if name == "auto":
        trt = registry["tensorrt-llm"]()
        return (
            trt if profile.device is DeviceKind.GPU and trt.is_available() else registry["torch"]()
        )
    if name not in registry:
        raise BackendError(f"unknown backend {name!r}; allowed: {backend_names()}")
    backend = registry[name]()
    if not backend.is_available():
        raise BackendError(
            f"backend {name!r} was requested but is not installed here "
            "(the tensorrt_llm package ships in NVIDIA's TensorRT-LLM container image); "
            "use --backend torch or build inside that image"
        )
    return backend


def _registry() -> dict[str, type[BuildBackend]]:
    from engine_build.backends.torch_engine import TorchBackend
    from engine_build.backends.trtllm import TensorRTLLMBackend

    return {"torch": TorchBackend, "tensorrt-llm": TensorRTLLMBackend}
