"""The engine repository: a directory of built engines and a manifest keyed by what they need.

    REPO/manifest.json          {"format_version": 2, "engines": {id: entry}} (the only truth)
    REPO/engines/<id>/          one engine's files (engine.json, rank<r>.safetensors, ...)
    REPO/.staging/              builds in progress; never read by loaders
    REPO/.locks/                one lock file per engine id, plus one for the manifest

An engine's id is a hash of its key (checkpoint fingerprint, profile, backend and version,
precision, tp, target device, builder version, build options). Builds are written to staging,
renamed into place and only then entered in the manifest, under file locks, so a killed build
leaves no entry and two builders never write the same engine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from engine_build import __version__ as BUILDER_VERSION
from engine_build.digest import file_sha256

MANIFEST = "manifest.json"
FORMAT_VERSION = 2
ENGINES_DIR = "engines"
STAGING_DIR = ".staging"
LOCKS_DIR = ".locks"


class RepositoryError(RuntimeError):
    """A repository that cannot be used: unwritable, corrupted, locked, or without a match."""


class EngineMismatchError(RepositoryError):
    """An engine that exists but does not fit what the loader needs; says what differs."""


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; its hash is the engine id."""

    checkpoint_fingerprint: str
    profile: str
    backend: str
    backend_version: str
    precision: str
    kv_cache_dtype: str
    tensor_parallel: int
    target: str
    builder_version: str = BUILDER_VERSION
    pipeline_parallel: int = 1
    build_options: dict[str, Any] = field(default_factory=dict)

    @property
    def engine_id(self) -> str:
        """A stable 16-hex-digit id: sha256 of the canonical JSON of the key."""
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        """The human name users know from NIM, e.g. `torch-h100x2-fp8-tp2`."""
        return f"{self.backend}-{self.profile}-{self.precision}-tp{self.tensor_parallel}"


@dataclass(frozen=True)
class EngineEntry:
    """One manifest entry: the key, the files with their sha256, and where it lives."""

    engine_id: str
    name: str
    key: EngineKey
    files: dict[str, str]  # relative path -> sha256
    sizes: dict[str, int]  # relative path -> bytes
    created: str
    directory: Path

    def to_json(self) -> dict[str, Any]:
        """The manifest form (directory relative to the repository)."""
        return {
            "id": self.engine_id,
            "name": self.name,
            "key": asdict(self.key),
            "files": self.files,
            "sizes": self.sizes,
            "created": self.created,
            "directory": f"{ENGINES_DIR}/{self.engine_id}",
        }


# Checkpoint files an engine depends on: the graph, the weights and the tokenizer it carries.
_FINGERPRINTED = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
)


def checkpoint_fingerprint(directory: Path) -> str:
    """sha256 over config.json, the tokenizer files and every safetensors file (name + hash)."""
    files = sorted(
        p
        for p in directory.iterdir()
        if p.name in _FINGERPRINTED
        or p.suffix == ".safetensors"
        or p.name.endswith(".safetensors.index.json")
    )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class EngineRequirement:
    """What a loader needs: a profile on a device, optionally a precision and a checkpoint."""

    profile: str
    target: str
    precision: str | None = None
    checkpoint_fingerprint: str | None = None
    backend: str | None = None  # the loader's backend: it cannot run another's engines
    backend_version: str | None = None  # for backends whose engines only run on the same version


def describe_target(target: str) -> str:
    """`sm90` -> `compute capability 9.0`; `cpu` stays `cpu`."""
    if target.startswith("sm") and target[2:].isdigit():
        return f"compute capability {target[2:-1]}.{target[-1]}"
    return target


def mismatches(entry: EngineEntry, need: EngineRequirement) -> list[str]:
    """Why `entry` cannot serve `need` (empty when it can)."""
    key, reasons = entry.key, []
    if key.profile != need.profile:
        reasons.append(f"built for profile {key.profile}, not {need.profile}")
    if key.target != need.target:
        built, here = describe_target(key.target), describe_target(need.target)
        reasons.append(f"built for {built}; this device has {here}")
    if need.backend is not None and key.backend != need.backend:
        reasons.append(f"built by the {key.backend} backend; this loader runs {need.backend}")
    elif need.backend_version is not None and key.backend_version != need.backend_version:
        reasons.append(f"built with {key.backend_version}; this runtime has {need.backend_version}")
    if need.precision is not None and key.precision != need.precision:
        reasons.append(f"precision {key.precision}, not {need.precision}")
    if (
        need.checkpoint_fingerprint is not None
        and key.checkpoint_fingerprint != need.checkpoint_fingerprint
    ):
        reasons.append(
            "built from a different checkpoint (config.json or weights changed: fingerprint "
            f"{key.checkpoint_fingerprint[:12]}..., the checkpoint now is "
            f"{need.checkpoint_fingerprint[:12]}...)"
        )
    return reasons


class EngineRepository:
    """A directory of engines with a locked, atomically replaced manifest."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entries(self) -> list[EngineEntry]:
        """Every engine in the manifest, oldest first."""
        entries = [self._entry(raw) for raw in self._read_manifest()["engines"].values()]
        return sorted(entries, key=lambda e: (e.created, e.engine_id))

    def get(self, engine_id: str) -> EngineEntry | None:
        """The entry with this id, if any."""
        raw = self._read_manifest()["engines"].get(engine_id)
        return self._entry(raw) if raw else None

    def ensure_writable(self) -> None:
        """Create the layout, or raise a RepositoryError saying why the path cannot be used."""
        try:
            for sub in (ENGINES_DIR, STAGING_DIR, LOCKS_DIR):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root / STAGING_DIR):
                pass
        except OSError as err:
            raise RepositoryError(
                f"engine repository {self.root} is not writable: {err.strerror or err}"
            ) from err

    @contextlib.contextmanager
    def build_lock(self, engine_id: str, wait: bool = True) -> Iterator[None]:
        """Hold the lock of one engine id (another builder waits, or fails when `wait` is off)."""
        with _flock(self.root / LOCKS_DIR / f"{engine_id}.lock", wait, f"engine {engine_id}"):
            yield

    def staging_dir(self, engine_id: str) -> Path:
        """A fresh staging directory (stale ones of this id are removed; hold the build lock)."""
        staging = self.root / STAGING_DIR
        for stale in staging.glob(f"{engine_id}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f"{engine_id}-", dir=staging))

    def commit(self, key: EngineKey, staging: Path) -> EngineEntry:
        """Hash and sync the staged files, move them into place, then add the manifest entry."""
        engine_id = key.engine_id
        files, sizes = {}, {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            name = path.relative_to(staging).as_posix()
            path.chmod(0o644)  # readable by serving pods running as another user
            _fsync(path)
            files[name], sizes[name] = file_sha256(path), path.stat().st_size
        for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            directory.chmod(0o755)
        target = self.root / ENGINES_DIR / engine_id
        if target.exists():  # left by a build killed between rename and manifest update
            shutil.rmtree(target)
        os.rename(staging, target)
        _fsync(target.parent)
        created = datetime.now(UTC).isoformat(timespec="microseconds")
        entry = EngineEntry(engine_id, key.name, key, files, sizes, created, target)
        with self._manifest_lock():
            manifest = self._read_manifest()
            manifest["engines"][engine_id] = entry.to_json()
            _write_json_atomic(self.root / MANIFEST, manifest)
        return entry

    def remove(self, engine_id: str) -> None:
        """Drop an engine: its manifest entry first, then its files."""
        with self._manifest_lock():
            manifest = self._read_manifest()
            manifest["engines"].pop(engine_id, None)
            _write_json_atomic(self.root / MANIFEST, manifest)
        shutil.rmtree(self.root / ENGINES_DIR / engine_id, ignore_errors=True)

    def damage(self, entry: EngineEntry) -> str | None:
        """A cheap check (existence and sizes, no hashing): what is wrong with the files, if any."""
        for name, size in entry.sizes.items():
            path = entry.directory / name
            if not path.is_file():
                return f"file {name} is missing"
            if path.stat().st_size != size:
                return f"file {name} has {path.stat().st_size} bytes, the manifest says {size}"
        return None

    def verify_files(self, entry: EngineEntry, names: Iterable[str] | None = None) -> None:
        """Recompute the sha256 of every file (or of `names`); raise naming the first bad one."""
        wanted = set(entry.files) if names is None else set(names)
        for name, expected in entry.files.items():
            if name not in wanted:
                continue
            path = entry.directory / name
            if not path.is_file():
                raise EngineMismatchError(
                    f"engine {entry.name} ({entry.engine_id}): file {name} is missing; rebuild it "
                    f"with nemotron-build build --profile {entry.key.profile} --force ..."
                )
            actual = file_sha256(path)
            if actual != expected:
                raise EngineMismatchError(
                    f"engine {entry.name} ({entry.engine_id}): file {name} is corrupted "
                    f"(sha256 {actual[:16]}..., manifest says {expected[:16]}...); rebuild it with "
                    f"nemotron-build build --profile {entry.key.profile} --force ..."
                )

    def select(self, need: EngineRequirement) -> EngineEntry:
        """The newest engine that fits `need`, with its files verified.

        Raises EngineMismatchError listing every engine and why it was rejected.
        """
        return self.select_first((need,))

    def select_first(self, needs: Sequence[EngineRequirement]) -> EngineEntry:
        """The newest engine fitting the first of `needs` (best first) that any engine fits.

        Raises EngineMismatchError listing every engine with why it fits none of them, each
        judged against the requirement it comes closest to, and the command that builds one.
        """
        if not needs:
            raise ValueError("select_first needs at least one requirement")
        newest_first = list(reversed(self.entries()))
        for need in needs:
            for entry in newest_first:
                if not mismatches(entry, need):
                    self.verify_files(entry)
                    return entry
        raise EngineMismatchError(self._refusal(newest_first, needs))

    def _refusal(self, entries: list[EngineEntry], needs: Sequence[EngineRequirement]) -> str:
        best = needs[0]
        wanted = " or ".join(dict.fromkeys(need.profile for need in needs))
        rejected = []
        for entry in entries:
            reasons = min((mismatches(entry, need) for need in needs), key=len)
            rejected.append(f"  {entry.name} ({entry.engine_id}): " + "; ".join(reasons))
        listing = "\n".join(rejected) if rejected else "  (the repository has no engines)"
        precision = f" --precision {best.precision}" if best.precision else ""
        backend = f" --backend {best.backend}" if best.backend else ""
        return (
            f"no engine in {self.root} fits profile {wanted} on {describe_target(best.target)}:"
            f"\n{listing}\nBuild one with: nemotron-build build --profile {best.profile}"
            f"{precision}{backend} --checkpoint CHECKPOINT --repo {self.root}"
        )

    @contextlib.contextmanager
    def _manifest_lock(self) -> Iterator[None]:
        with _flock(self.root / LOCKS_DIR / "manifest.lock", True, "the manifest"):
            yield

    def _read_manifest(self) -> dict[str, Any]:
        path = self.root / MANIFEST
        if not path.is_file():
            return {"format_version": FORMAT_VERSION, "engines": {}}
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RepositoryError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            found = manifest.get("format_version") if isinstance(manifest, dict) else manifest
            raise RepositoryError(
                f"{path}: format_version {found!r}; this builder reads {FORMAT_VERSION}"
            )
        if not isinstance(manifest.get("engines"), dict):
            raise RepositoryError(f"{path}: 'engines' must be an object of engine entries")
        return manifest

    def _entry(self, raw: Any) -> EngineEntry:
        try:
            return EngineEntry(
                engine_id=raw["id"],
                name=raw["name"],
                key=EngineKey(**raw["key"]),
                files=dict(raw["files"]),
                sizes={name: int(size) for name, size in raw["sizes"].items()},
                created=raw["created"],
                directory=self.root / raw["directory"],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            identity = raw.get("id") if isinstance(raw, dict) else raw
            raise RepositoryError(
                f"{self.root / MANIFEST}: entry {identity!r} is malformed ({type(err).__name__}: "
                f"{err}); remove it or rebuild the repository"
            ) from err


@contextlib.contextmanager
def _flock(path: Path, wait: bool, what: str) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as err:
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise RepositoryError(
                    f"another builder holds the lock on {what}; not waiting"
                ) from err
            raise
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(handle.name, path)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's) data to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
