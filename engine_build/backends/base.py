"""What every engine build backend shares: the job, the interface, the error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from engine_build.checkpoint import Checkpoint
from engine_build.profiles import Precision, Profile


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
