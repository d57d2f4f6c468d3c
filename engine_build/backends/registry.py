"""The build backends by name: `select_backend` picks one (or `auto`); `backend_names`."""

from __future__ import annotations

from engine_build.backends.base import BackendError, BuildBackend
from engine_build.backends.torch_engine import TorchBackend
from engine_build.backends.trtllm import TensorRTLLMBackend
from engine_build.profiles import DeviceKind, Profile

# Backend name (as engine keys and --backend spell it) -> its class.
_REGISTRY: dict[str, type[BuildBackend]] = {
    "torch": TorchBackend,
    "tensorrt-llm": TensorRTLLMBackend,
}


def backend_names() -> list[str]:
    """Names accepted by `select_backend`, `auto` first."""
    return ["auto", *_REGISTRY]


def select_backend(name: str, profile: Profile) -> BuildBackend:
    """The backend called `name`; `auto` prefers TensorRT-LLM for GPU profiles where installed."""
    registry = _REGISTRY
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
