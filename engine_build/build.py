"""Building one engine into a repository: validate, plan, key, lock, build in staging, commit."""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from engine_build.backends.base import BuildBackend, BuildJob
from engine_build.backends.registry import select_backend
from engine_build.checkpoint import Checkpoint
from engine_build.plan import ProfilePlan, plan_profile
from engine_build.profiles import WEIGHT_ONLY, Precision, Profile
from engine_build.repository import EngineEntry, EngineKey, EngineRepository, checkpoint_fingerprint
from engine_build.summary import stored_dtype
from engine_build.weights import WeightRole

_LOG = logging.getLogger("nemotron.build")


class PlanRefusedError(ValueError):
    """The profile cannot run this model; the message lists every reason."""


@dataclass(frozen=True)
class BuildRequest:
    """What the user asked for."""

    checkpoint: Path
    profile: Profile
    precision: str | None = None
    backend: str = "auto"
    calibration_dataset: str | None = None
    wait_for_lock: bool = True
    force: bool = False  # rebuild even if an engine with this key is present


@dataclass(frozen=True)
class BuildResult:
    """The engine now in the repository, and whether this call built it."""

    entry: EngineEntry
    skipped: bool
    plan: ProfilePlan


@dataclass(frozen=True)
class PreparedBuild:
    """A validated request: the checkpoint, the feasible plan, the backend and the engine key."""

    job: BuildJob
    plan: ProfilePlan
    backend: BuildBackend
    key: EngineKey


def prepare_build(request: BuildRequest) -> PreparedBuild:
    """Validate the checkpoint, refuse an infeasible plan, pick the backend and compute the key."""
    checkpoint = Checkpoint.open(request.checkpoint)
    precision = request.profile.precision(request.precision)
    backend = select_backend(request.backend, request.profile)
    plan = plan_profile(checkpoint.graph, request.profile, precision, backend.name)
    if not plan.feasible:
        raise PlanRefusedError(
            f"profile {request.profile.name} cannot run this model: " + "; ".join(plan.reasons)
        )
    backend.check(request.profile, precision, request.calibration_dataset)
    key = EngineKey(
        checkpoint_fingerprint=checkpoint_fingerprint(checkpoint.directory),
        profile=request.profile.name,
        backend=backend.name,
        backend_version=backend.version(),
        precision=precision.name,
        kv_cache_dtype=precision.kv_cache.value,
        tensor_parallel=request.profile.tensor_parallel,
        target=request.profile.target,
        build_options=engine_build_options(request.profile, precision),
    )
    job = BuildJob(checkpoint, request.profile, precision, request.calibration_dataset)
    return PreparedBuild(job, plan, backend, key)


def build_engine(request: BuildRequest, repository: EngineRepository) -> BuildResult:
    """Build (or find already built) the engine for `request` in `repository`."""
    repository.ensure_writable()
    prepared = prepare_build(request)
    key = prepared.key
    with repository.build_lock(key.engine_id, wait=request.wait_for_lock):
        existing = repository.get(key.engine_id)
        damage = repository.damage(existing) if existing is not None else None
        if existing is not None and not damage and not request.force:
            _log("engine_build_skipped", existing, "already built")
            return BuildResult(existing, skipped=True, plan=prepared.plan)
        if existing is not None:
            _log("engine_rebuild", existing, damage or "--force")
            repository.remove(existing.engine_id)
        staging = repository.staging_dir(key.engine_id)
        try:
            prepared.backend.build(prepared.job, staging)
            entry = repository.commit(key, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    _LOG.info("engine_built", extra={"fields": {"engine": entry.name, "id": entry.engine_id}})
    return BuildResult(entry, skipped=False, plan=prepared.plan)


def engine_build_options(profile: Profile, precision: Precision) -> dict[str, int | str]:
    """The limits an engine is built for (the KV share is a runtime setting, not in the key).

    Weight-only engines also record the lm_head's storage (`stored_dtype`): an int4 engine
    built before its lm_head became int8 then no longer matches and is rebuilt.
    """
    options: dict[str, int | str] = dict(asdict(profile.limits))
    options.pop("kv_cache_free_fraction")
    if precision.weights in WEIGHT_ONLY:
        options["lm_head"] = stored_dtype(WeightRole.LM_HEAD, precision.weights.value)
    return options


def _log(event: str, entry: EngineEntry, reason: str) -> None:
    fields = {"engine": entry.name, "id": entry.engine_id, "reason": reason}
    _LOG.info(event, extra={"fields": fields})
