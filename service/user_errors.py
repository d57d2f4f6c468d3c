"""The typed errors that mean bad input or an unusable setup (not a bug), reported by message."""

from __future__ import annotations

from engine_build.backends.base import BackendError
from engine_build.backends.torch_engine import EngineFormatError
from engine_build.build import PlanRefusedError
from engine_build.checkpoint import CheckpointError
from engine_build.embedded import EmbeddedModelError
from engine_build.gguf_import import GGUFImportError
from engine_build.graph import GraphConfigError
from engine_build.profiles import ProfileError
from engine_build.repository import RepositoryError
from service.observability.tracing import TracingConfigError
from service.runtime.interface import EngineError
from service.runtime.tokenizer import TokenizerError
from service.server.api_keys import ApiKeyFileError

USER_ERRORS: tuple[type[Exception], ...] = (
    GraphConfigError,
    CheckpointError,
    GGUFImportError,
    EmbeddedModelError,
    TokenizerError,
    EngineError,
    ProfileError,
    RepositoryError,
    PlanRefusedError,
    BackendError,
    EngineFormatError,
    ApiKeyFileError,
    TracingConfigError,
)
