"""Engine profiles as data: the shipped `profiles.yaml` plus users' own files, validated on load."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

BUILTIN_PROFILES = "profiles.yaml"


class ProfileError(ValueError):
    """A profile file that does not validate, or a profile name that does not exist."""


class DeviceKind(StrEnum):
    """Where an engine runs."""

    GPU = "gpu"
    CPU = "cpu"


class Dtype(StrEnum):
    """Storage precisions for weights and KV cache."""

    BF16 = "bf16"
    FP8 = "fp8"
    FP32 = "fp32"
    INT8 = "int8"  # weights only: per output channel, symmetric
    INT4 = "int4"  # weights only: groups of 32 inputs, a scale and a minimum per group


# Weight-only formats: the torch runtime on CPU multiplies by them directly.
WEIGHT_ONLY = frozenset({Dtype.INT8, Dtype.INT4})


@dataclass(frozen=True)
class Precision:
    """Weights and KV-cache precision of an engine; named after the weights."""

    weights: Dtype
    kv_cache: Dtype

    @property
    def name(self) -> str:
        """`bf16`, `fp8` or `fp32`."""
        return self.weights.value


@dataclass(frozen=True)
class EngineLimits:
    """What an engine is built for: batch, sequence and per-step token limits, KV share."""

    max_batch_size: int
    max_seq_len: int
    max_num_tokens: int
    kv_cache_free_fraction: float


@dataclass(frozen=True)
class Profile:
    """One hardware target: devices, parallelism, allowed precisions and engine limits."""

    name: str
    description: str
    device: DeviceKind
    gpu_products: tuple[str, ...]
    gpu_count: int
    compute_capability: str | None
    memory_gb: float
    reserve_gb: float
    tensor_parallel: int
    precisions: tuple[Precision, ...]
    limits: EngineLimits
    source: str
    backend: str = "torch"  # what `--backend auto` builds and serves where it is installed

    @property
    def default_precision(self) -> Precision:
        """The first listed precision."""
        return self.precisions[0]

    @property
    def target(self) -> str:
        """The device an engine for this profile is bound to: `cpu` or `sm<major><minor>`."""
        if self.device is DeviceKind.CPU or self.compute_capability is None:
            return "cpu"
        return "sm" + self.compute_capability.replace(".", "")

    @property
    def precision_names(self) -> list[str]:
        """Names of the allowed precisions, default first."""
        return [p.name for p in self.precisions]

    def precision(self, name: str | None) -> Precision:
        """The precision called `name` (default when None), or a ProfileError listing allowed."""
        if name is None:
            return self.default_precision
        for precision in self.precisions:
            if precision.name == name:
                return precision
        allowed = [p.name for p in self.precisions]
        raise ProfileError(
            f"profile {self.name!r} does not allow precision {name!r}; allowed: {allowed}"
        )

    def matches_gpu(self, product: str) -> bool:
        """Whether a GPU product label or NVML name matches this profile's patterns."""
        return any(fnmatch.fnmatch(product.lower(), p.lower()) for p in self.gpu_products)


@dataclass(frozen=True)
class ProfileSet:
    """All known profiles by name."""

    profiles: dict[str, Profile]

    def get(self, name: str) -> Profile:
        """The profile called `name`, or a ProfileError listing the valid names."""
        if name not in self.profiles:
            raise ProfileError(f"unknown profile {name!r}; valid profiles: {self.names}")
        return self.profiles[name]

    @property
    def names(self) -> list[str]:
        """Profile names in file order."""
        return list(self.profiles)


def load_profiles(extra_files: Iterable[str | Path] = ()) -> ProfileSet:
    """The built-in profiles plus those of `extra_files` (which may not redefine a name)."""
    text = resources.files("engine_build").joinpath(BUILTIN_PROFILES).read_text()
    profiles = parse_profiles(text, f"built-in {BUILTIN_PROFILES}")
    for file in extra_files:
        path = Path(file)
        if not path.is_file():
            problem = "is a directory, not a YAML file" if path.is_dir() else "not found"
            raise ProfileError(f"{path}: profile file {problem}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ProfileError(f"{path}: not UTF-8 text ({err})") from err
        for name, profile in parse_profiles(text, str(path)).items():
            if name in profiles:
                raise ProfileError(
                    f"{path}: profile {name!r} is already defined in {profiles[name].source}; "
                    "choose another name"
                )
            profiles[name] = profile
    return ProfileSet(profiles)


def parse_profiles(text: str, source: str) -> dict[str, Profile]:
    """Validate one YAML document of the `profiles:` shape."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ProfileError(f"{source}: not valid YAML ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), dict):
        raise ProfileError(f"{source}: expected a mapping with a 'profiles:' mapping inside")
    return {
        str(name): _parse_profile(str(name), raw, _Fields(source, f"profiles.{name}"))
        for name, raw in data["profiles"].items()
    }


@dataclass(frozen=True)
class _Fields:
    """Typed reads of one mapping, with errors that name the file and the field path."""

    source: str
    path: str

    def fail(self, key: str, problem: str) -> ProfileError:
        return ProfileError(f"{self.source}: {self.path}.{key}: {problem}")

    def mapping(self, raw: Any, key: str, allowed: set[str], required: set[str]) -> dict:
        if not isinstance(raw, dict):
            raise ProfileError(f"{self.source}: {self.path}{key}: expected a mapping")
        for unknown in sorted(set(raw) - allowed):
            raise self.fail(str(unknown), f"unknown field; allowed: {sorted(allowed)}")
        for missing in sorted(required - set(raw)):
            raise self.fail(missing, "missing")
        return raw

    def number(self, raw: dict, key: str, low: float, high: float, integer: bool = False) -> Any:
        value = raw.get(key)
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise self.fail(key, f"{value!r} must be {kind} in [{low}, {high}]")
        return value

    def choice(self, raw: dict, key: str, enum: type[StrEnum]) -> Any:
        value = raw.get(key)
        allowed = [e.value for e in enum]
        if value not in allowed:
            raise self.fail(key, f"{value!r} is not one of {allowed}")
        return enum(value)

    def child(self, key: str) -> _Fields:
        return _Fields(self.source, f"{self.path}.{key}")


_PROFILE_KEYS = {
    "description",
    "device",
    "gpu",
    "memory_gb",
    "reserve_gb",
    "tensor_parallel",
    "precisions",
    "limits",
    "backend",
}
_REQUIRED_KEYS = _PROFILE_KEYS - {"gpu", "description", "backend"}
# TensorRT-LLM's two flows: TensorRT engines, and its PyTorch flow. Both need NVIDIA GPUs and
# the tensorrt_llm package, and their engines run only with the release that built them.
TENSORRT_LLM_BACKENDS = ("tensorrt-llm", "tensorrt-llm-pytorch")
# The backends a profile may prefer (`backend:`), by device; the first is the default.
PROFILE_BACKENDS = {
    DeviceKind.GPU: (*TENSORRT_LLM_BACKENDS, "torch"),
    DeviceKind.CPU: ("torch",),
}
_LIMIT_KEYS = {"max_batch_size", "max_seq_len", "max_num_tokens", "kv_cache_free_fraction"}


def _parse_profile(name: str, raw: Any, fields: _Fields) -> Profile:
    raw = fields.mapping(raw, "", _PROFILE_KEYS, _REQUIRED_KEYS)
    device = fields.choice(raw, "device", DeviceKind)
    products, count, capability = _parse_gpu(raw.get("gpu"), device, fields)
    tp = fields.number(raw, "tensor_parallel", 1, 64, integer=True)
    if device is DeviceKind.GPU and tp != count:
        raise fields.fail(
            "tensor_parallel", f"{tp} must equal gpu.count {count} (pipeline parallel is 1)"
        )
    return Profile(
        name=name,
        description=str(raw.get("description", "")),
        device=device,
        gpu_products=products,
        gpu_count=count,
        compute_capability=capability,
        memory_gb=float(fields.number(raw, "memory_gb", 0.1, 1e6)),
        reserve_gb=float(fields.number(raw, "reserve_gb", 0.0, 1e6)),
        tensor_parallel=tp,
        precisions=_parse_precisions(raw.get("precisions"), capability, fields),
        limits=_parse_limits(raw.get("limits"), fields.child("limits")),
        source=fields.source,
        backend=_parse_backend(raw.get("backend"), device, fields),
    )


def _parse_backend(raw: Any, device: DeviceKind, fields: _Fields) -> str:
    allowed = PROFILE_BACKENDS[device]
    if raw is None:
        return allowed[0]
    if raw not in allowed:
        problem = f"{raw!r} is not one of {list(allowed)} on a {device.value} profile"
        raise fields.fail("backend", problem)
    return str(raw)


def _parse_gpu(
    raw: Any, device: DeviceKind, fields: _Fields
) -> tuple[tuple[str, ...], int, str | None]:
    if device is DeviceKind.CPU:
        if raw is not None:
            raise fields.fail("gpu", "a cpu profile has no gpu section")
        return (), 1, None
    gpu = fields.child("gpu")
    raw = gpu.mapping(
        raw,
        "",
        {"products", "count", "compute_capability"},
        {"products", "count", "compute_capability"},
    )
    products = raw["products"]
    if (
        not isinstance(products, list)
        or not products
        or not all(isinstance(p, str) for p in products)
    ):
        raise gpu.fail("products", "must be a non-empty list of name patterns")
    capability = str(raw["compute_capability"])
    major, _, minor = capability.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise gpu.fail("compute_capability", f"{capability!r} must look like '9.0'")
    return tuple(products), gpu.number(raw, "count", 1, 64, integer=True), capability


def _parse_precisions(raw: Any, capability: str | None, fields: _Fields) -> tuple[Precision, ...]:
    if not isinstance(raw, list) or not raw:
        raise fields.fail("precisions", "must be a non-empty list of {weights, kv_cache}")
    precisions = []
    for index, entry in enumerate(raw):
        item = fields.child(f"precisions[{index}]")
        entry = item.mapping(entry, "", {"weights", "kv_cache"}, {"weights", "kv_cache"})
        precision = Precision(
            item.choice(entry, "weights", Dtype), item.choice(entry, "kv_cache", Dtype)
        )
        if precision.kv_cache in WEIGHT_ONLY:
            raise item.fail(
                "kv_cache",
                f"{precision.kv_cache} is a weight-only format; the KV cache is bf16, fp8 or fp32",
            )
        if precision.weights in WEIGHT_ONLY and capability is not None:
            raise item.fail(
                "weights",
                f"{precision.weights} weights run on the cpu profile only (CPU kernels)",
            )
        uses_fp8 = Dtype.FP8 in (precision.weights, precision.kv_cache)
        if uses_fp8 and capability is not None and _version(capability) < (8, 9):
            raise item.fail(
                "weights",
                f"FP8 needs compute capability 8.9 or newer; this GPU is {capability}",
            )
        precisions.append(precision)
    names = [p.name for p in precisions]
    if len(set(names)) != len(names):
        raise fields.fail("precisions", f"weights precisions repeat: {names}")
    return tuple(precisions)


def _parse_limits(raw: Any, fields: _Fields) -> EngineLimits:
    raw = fields.mapping(raw, "", _LIMIT_KEYS, _LIMIT_KEYS)
    return EngineLimits(
        max_batch_size=fields.number(raw, "max_batch_size", 1, 65536, integer=True),
        max_seq_len=fields.number(raw, "max_seq_len", 16, 1 << 24, integer=True),
        max_num_tokens=fields.number(raw, "max_num_tokens", 16, 1 << 24, integer=True),
        kv_cache_free_fraction=float(fields.number(raw, "kv_cache_free_fraction", 0.01, 1.0)),
    )


def _version(capability: str) -> tuple[int, ...]:
    return tuple(int(part) for part in capability.split("."))
