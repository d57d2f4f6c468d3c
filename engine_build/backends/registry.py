"""The build backends by name: `select_backend` picks one (or `auto`); `backend_names`."""

from __future__ import annotations

from engine_build.backends.base import BackendError, BuildBackend
from engine_build.backends.torch_engine import TorchBackend
from engine_build.backends.trtllm import TensorRTLLMBackend
from engine_build.backends.trtllm_pytorch import TensorRTLLMPyTorchBackend
from engine_build.profiles import DeviceKind, Profile

# Backend name (as engine keys and --backend spell it) -> its class.
_REGISTRY: dict[str, type[BuildBackend]] = {
    "torch": TorchBackend,
    "tensorrt-llm": TensorRTLLMBackend,
    "tensorrt-llm-pytorch": TensorRTLLMPyTorchBackend,
}


def backend_names() -> list[str]:
    """Names accepted by `select_backend`, `auto` first."""
    return ["auto", *_REGISTRY]


def select_backend(name: str, profile: Profile) -> BuildBackend:
    """The backend called `name`; `auto` is the profile's `backend` (TensorRT-LLM, one of its
    two flows, on GPU profiles) where that is installed, else torch."""
    registry = _REGISTRY
    if name == "auto":
        preferred = registry[profile.backend]()
        usable = profile.device is DeviceKind.GPU and preferred.is_available()
        return preferred if usable else registry["torch"]()
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
