"""Choosing the engine to serve: the profile (explicit, else from the hardware), then its engine.

The profile is `--profile`, else `NEMOTRON_PROFILE`, else the hardware `service/hardware.py`
detects (node labels, NVML, or the CPU) matched against the profile table. A GPU machine
prefers the profile using exactly its GPUs, then profiles using fewer (the largest first); the
engine repository must hold a torch engine for one of them, or startup is refused with every
engine and why it does not fit, the command that builds one and how to force a profile.
`--build-if-missing` builds the preferred profile's engine from `--checkpoint` instead.
A cpu profile always builds when missing (from the checkpoint, else the embedded default), so
`nemotron-serve` with no arguments on a machine without GPUs serves SmolLM2.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine_build.backends.base import BackendError
from engine_build.backends.registry import backend_names, select_backend
from engine_build.build import BuildRequest, build_engine
from engine_build.embedded import ensure_embedded_checkpoint
from engine_build.events import log_event
from engine_build.profiles import (
    TENSORRT_LLM_BACKENDS,
    DeviceKind,
    Profile,
    ProfileError,
    ProfileSet,
    load_profiles,
)
from engine_build.repository import (
    EngineEntry,
    EngineMismatchError,
    EngineRepository,
    EngineRequirement,
    RepositoryError,
    checkpoint_fingerprint,
)
from service.startup.hardware import Hardware, NodeReader, detect_hardware

CPU_PROFILE = "cpu"
PROFILE_ENV = "NEMOTRON_PROFILE"
PROFILES_ENV = "NEMOTRON_PROFILES"
SOURCE_FLAG = "flag"
SOURCE_ENV = f"env {PROFILE_ENV}"


class EngineSelectionError(RepositoryError):
    """No engine can be served here; the message says what was found, rejected and what to run."""


@dataclass(frozen=True)
class StartupOptions:
    """What the user said about the engine (flags, parsed once); None means decide here."""

    cache_dir: Path
    profile: str | None = None  # --profile; NEMOTRON_PROFILE comes from the environment
    engine_repo: Path | None = None  # default: cache_dir / "engines"
    checkpoint: Path | None = None
    gguf: Path | None = None  # local copy of the embedded model's GGUF
    precision: str | None = None  # None: any the profile allows; a build takes its default
    backend: str = "auto"  # which engines to serve: auto, or a name of backend_names()
    build_if_missing: bool = False
    profile_files: tuple[Path, ...] = ()  # extra profile YAML files (also NEMOTRON_PROFILES)

    @property
    def repository(self) -> Path:
        """The engine repository directory."""
        return self.engine_repo if self.engine_repo is not None else self.cache_dir / "engines"


@dataclass(frozen=True)
class ProfileDecision:
    """The profiles to try on this hardware, best first, and why they were chosen."""

    hardware: Hardware
    candidates: tuple[Profile, ...]
    reason: str
    known: tuple[str, ...] = ()  # every profile name, for the hint on how to force one
    rejected: tuple[str, ...] = ()  # the profiles that do not fit, each with why

    @property
    def preferred(self) -> Profile:
        """The profile to build for when no candidate has an engine."""
        return self.candidates[0]


@dataclass(frozen=True)
class EngineChoice:
    """The engine to serve and how it was chosen (for the startup log and model info)."""

    entry: EngineEntry
    profile: Profile
    hardware: Hardware
    reason: str
    built: bool  # this startup built it

    @property
    def directory(self) -> Path:
        """The engine's directory, for `open_runtime`."""
        return self.entry.directory

    @property
    def device(self) -> str:
        """The torch device type the engine runs on: `cuda` for GPU profiles, else `cpu`."""
        return "cuda" if self.profile.device is DeviceKind.GPU else "cpu"


def resolve_engine(
    options: StartupOptions,
    environ: Mapping[str, str],
    *,
    node_api: NodeReader | None = None,
    nvml: object | None = None,
) -> EngineChoice:
    """Pick the profile and its engine (building it where allowed), or refuse saying why.

    `node_api` replaces the in-cluster `CoreV1Api` and `nvml` the `pynvml` module (tests).
    """
    profiles = _load_profiles(options, environ)
    decision = decide_profiles(options, environ, profiles, node_api=node_api, nvml=nvml)
    hardware, preferred = decision.hardware, decision.preferred
    log_event(
        "profile_selected",
        profile=preferred.name,
        reason=decision.reason,
        alternatives=[p.name for p in decision.candidates[1:]],
    )
    repository = EngineRepository(options.repository)
    if preferred.device is DeviceKind.CPU:
        backend = serving_backend(options.backend, preferred)  # torch, or a refusal
        source = options.checkpoint or ensure_embedded_checkpoint(
            options.cache_dir, gguf=options.gguf
        )
        entry, built = ensure_engine(repository, preferred, source, options.precision, backend)
    else:
        entry, built = _gpu_engine(repository, decision, options)
    profile = next(p for p in decision.candidates if p.name == entry.key.profile)
    reason = decision.reason
    if profile is not preferred:
        reason += (
            f"; the repository has no {preferred.name} engine, so {profile.name} "
            f"({profile.gpu_count} of the {hardware.count} GPUs)"
        )
    log_event("engine_selected", engine=entry.name, id=entry.engine_id, built=built, reason=reason)
    return EngineChoice(entry, profile, hardware, reason, built)


def decide_profiles(
    options: StartupOptions,
    environ: Mapping[str, str],
    profiles: ProfileSet,
    *,
    node_api: NodeReader | None = None,
    nvml: object | None = None,
) -> ProfileDecision:
    """The explicit profile (flag, then env) if any, else the profiles the hardware fits."""
    name, source = options.profile, SOURCE_FLAG
    if not name and environ.get(PROFILE_ENV, "").strip():
        name, source = environ[PROFILE_ENV].strip(), SOURCE_ENV
    if name:
        try:
            profile = profiles.get(name)
        except ProfileError as err:
            raise EngineSelectionError(
                f"cannot start: {err} (given by {source}); add your own with --profiles FILE or "
                f"{PROFILES_ENV}"
            ) from err
        reason = f"profile {name} chosen by {source} (hardware not detected)"
        hardware = Hardware.assumed_from(profile, source)
        return ProfileDecision(hardware, (profile,), reason, tuple(profiles.names))
    hardware = detect_hardware(environ, node_api, nvml)
    log_event(
        "hardware_detected",
        device=hardware.device.value,
        product=hardware.product,
        count=hardware.count,
        compute_capability=hardware.compute_capability,
        source=hardware.source,
        notes=list(hardware.notes),
    )
    return match_profiles(hardware, profiles)


def match_profiles(hardware: Hardware, profiles: ProfileSet) -> ProfileDecision:
    """The profiles `hardware` can run, best first, or an error saying why each one cannot.

    On GPUs the profile using all of them comes first, then those using fewer, most GPUs
    first (the rest stay idle); on the CPU, the cpu profiles in file order.
    """
    runnable, rejected = [], []
    for profile in profiles.profiles.values():
        problems = profile_problems(profile, hardware)
        if problems:
            rejected.append(f"  {profile.name}: " + "; ".join(problems))
        else:
            runnable.append(profile)
    if not runnable:
        raise EngineSelectionError(_no_profile_message(hardware, rejected, profiles))
    if hardware.device is DeviceKind.GPU:
        runnable.sort(key=lambda p: (p.gpu_count != hardware.count, -p.gpu_count))
    best = runnable[0]
    found = hardware.source
    if hardware.device is DeviceKind.GPU:
        found = f"{hardware.describe()} from {hardware.source}"
    reason = f"{found}: profile {best.name}"
    if best.device is DeviceKind.GPU and best.gpu_count < hardware.count:
        reason += f" (no profile uses all {hardware.count} GPUs)"
    return ProfileDecision(
        hardware, tuple(runnable), reason, tuple(profiles.names), tuple(rejected)
    )


def profile_problems(profile: Profile, hardware: Hardware) -> list[str]:
    """Why `profile` cannot run on `hardware` (empty when it can)."""
    if hardware.device is DeviceKind.CPU:
        if profile.device is DeviceKind.CPU:
            return []
        return [f"needs {profile.gpu_count} GPUs; this machine has none"]
    if profile.device is DeviceKind.CPU:
        return ["a cpu profile, and this machine has GPUs (force it with --profile to use the CPU)"]
    problems = []
    if hardware.is_mig:
        problems.append(f"{hardware.product} is a MIG slice; the profile needs whole GPUs")
    elif hardware.product is None or not profile.matches_gpu(hardware.product):
        patterns = " or ".join(profile.gpu_products)
        problems.append(f"GPU {hardware.product} does not match {patterns}")
    capability = hardware.compute_capability
    if capability and profile.compute_capability and capability != profile.compute_capability:
        problems.append(
            f"compute capability {capability}; the profile needs {profile.compute_capability}"
        )
    if profile.gpu_count > hardware.count:
        problems.append(f"needs {profile.gpu_count} GPUs; this machine has {hardware.count}")
    return problems


def serving_backend(requested: str, profile: Profile) -> str:
    """The backend whose engines to serve for `profile`.

    `auto` picks as `nemotron-build --backend auto` does: the profile's TensorRT-LLM flow on GPU
    profiles where the tensorrt_llm package is installed, else torch.
    """
    if requested == "auto":
        return select_backend("auto", profile).name
    if requested not in backend_names():
        raise EngineSelectionError(
            f"unknown backend {requested!r}; allowed: {', '.join(backend_names())}"
        )
    if requested in TENSORRT_LLM_BACKENDS and profile.device is DeviceKind.CPU:
        raise EngineSelectionError(
            f"backend {requested} has no engines for the {profile.name} profile (TensorRT-LLM "
            "needs NVIDIA GPUs); serve it with backend torch or auto"
        )
    return requested


def installed_version(backend: str, profile: Profile) -> str | None:
    """The installed TensorRT-LLM's version where `backend` is one of its flows (their engines
    run only with the release that built them), else None (torch engines, or no package here:
    opening the engine then refuses, naming what to install)."""
    if backend not in TENSORRT_LLM_BACKENDS:
        return None
    try:
        return select_backend(backend, profile).version()
    except BackendError:
        return None


def ensure_engine(
    repository: EngineRepository,
    profile: Profile,
    checkpoint: Path,
    precision: str | None,
    backend: str = "torch",
) -> tuple[EngineEntry, bool]:
    """Build `checkpoint` for `profile` unless already built, then select it (verified).

    Returns the entry and whether this call built it.
    """
    request = BuildRequest(checkpoint, profile, precision=precision, backend=backend)
    result = build_engine(request, repository)
    key = result.entry.key
    need = EngineRequirement(
        profile.name,
        profile.target,
        key.precision,
        key.checkpoint_fingerprint,
        backend=backend,
    )
    return repository.select(need), not result.skipped  # verifies every file's hash


def ensure_cpu_engine(
    cache_dir: Path,
    checkpoint: Path | None = None,
    gguf: Path | None = None,
    precision: str | None = None,
) -> Path:
    """The directory of a cpu-profile torch engine for `checkpoint` (default: the embedded model).

    The embedded model is fetched and imported on first use, and the engine is built into
    `cache_dir/engines` once; later calls find it there. `resolve_engine` does this, and more.
    """
    source = checkpoint or ensure_embedded_checkpoint(cache_dir, gguf=gguf)
    profile = load_profiles().get(CPU_PROFILE)
    entry, _ = ensure_engine(EngineRepository(cache_dir / "engines"), profile, source, precision)
    return entry.directory


def _gpu_engine(
    repository: EngineRepository, decision: ProfileDecision, options: StartupOptions
) -> tuple[EngineEntry, bool]:
    """The newest engine for the best candidate that has one, or the preferred one built."""
    decision.preferred.precision(options.precision)  # refuse a precision the profile lacks
    backend = serving_backend(options.backend, decision.preferred)
    fingerprint = checkpoint_fingerprint(options.checkpoint) if options.checkpoint else None
    version = installed_version(backend, decision.preferred)
    needs = [
        EngineRequirement(p.name, p.target, options.precision, fingerprint, backend, version)
        for p in decision.candidates
        if options.precision is None or options.precision in p.precision_names
    ]
    try:
        return repository.select_first(needs), False
    except EngineMismatchError as err:
        if not options.build_if_missing or options.checkpoint is None:
            raise EngineSelectionError(_refusal(decision, options, err)) from err
        log_event("engine_missing_building", profile=decision.preferred.name, reason=str(err))
        checkpoint = options.checkpoint
    return ensure_engine(repository, decision.preferred, checkpoint, options.precision, backend)


def _refusal(decision: ProfileDecision, options: StartupOptions, err: EngineMismatchError) -> str:
    listing, marker, build = str(err).rpartition("\nBuild one with: ")
    lines = [f"cannot start: {listing or build}", _chosen(decision)]
    lines += [f"Detection: {note}" for note in decision.hardware.notes]
    if marker and options.checkpoint is not None:
        build = build.replace("CHECKPOINT", str(options.checkpoint))
    if marker:
        lines.append(f"Build one with: {build}")
    if options.build_if_missing:
        lines.append(
            f"--build-if-missing needs --checkpoint for the {decision.preferred.name} profile "
            "(the embedded default model is only served on the cpu profile)."
        )
    else:
        checkpoint = options.checkpoint or "CHECKPOINT"
        lines.append(f"Or build it at startup: --checkpoint {checkpoint} --build-if-missing.")
    lines.append(_force_hint(decision.known))
    return "\n".join(lines)


def _chosen(decision: ProfileDecision) -> str:
    alternatives = ", ".join(p.name for p in decision.candidates[1:])
    also = f" (also runnable here: {alternatives})" if alternatives else ""
    return f"Profile choice: {decision.reason}{also}."


def _no_profile_message(hardware: Hardware, rejected: Sequence[str], profiles: ProfileSet) -> str:
    lines = [f"cannot start: no profile fits {hardware.describe()} (from {hardware.source}):"]
    lines += [*rejected, *(f"Detection: {note}" for note in hardware.notes)]
    lines.append(f"Add a profile for this hardware with --profiles FILE (or {PROFILES_ENV}).")
    lines.append(_force_hint(profiles.names))
    return "\n".join(lines)


def _force_hint(known: Sequence[str]) -> str:
    return (
        f"Choose a profile with --profile NAME or {PROFILE_ENV}=NAME (known here: "
        f"{', '.join(known)}); --profile {CPU_PROFILE} serves on the CPU."
    )


def _load_profiles(options: StartupOptions, environ: Mapping[str, str]) -> ProfileSet:
    files = [Path(file) for file in options.profile_files]
    if environ.get(PROFILES_ENV):
        files += [Path(file) for file in environ[PROFILES_ENV].split(os.pathsep) if file]
    return load_profiles(dict.fromkeys(files))  # a file named by flag and env is read once
