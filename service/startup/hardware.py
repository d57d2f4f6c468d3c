"""Finding out what this process runs on: GPU Feature Discovery node labels, NVML, or the CPU.

In a cluster (`KUBERNETES_SERVICE_HOST` set) the node named by `NODE_NAME` (the downward API's
`spec.nodeName`) is read with the `kubernetes` client and its GFD labels give the GPU product,
count and compute capability. Otherwise, or when that fails, NVML (`nvidia-ml-py`) is asked;
failing that the answer is the CPU. A source that gives no answer leaves a note saying why, so
a later refusal can say what was tried.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from engine_build.events import log_event
from engine_build.profiles import DeviceKind, Profile

PRODUCT_LABEL = "nvidia.com/gpu.product"
COUNT_LABEL = "nvidia.com/gpu.count"
COMPUTE_MAJOR_LABEL = "nvidia.com/gpu.compute.major"
COMPUTE_MINOR_LABEL = "nvidia.com/gpu.compute.minor"
NODE_READ_TIMEOUT_S = 10.0
SOURCE_NVML = "nvml"
SOURCE_NONE = "no GPU found"
_MIG = re.compile(r"\bMIG\b", re.IGNORECASE)


@dataclass(frozen=True)
class Hardware:
    """The devices this process runs on, and how that was decided."""

    device: DeviceKind
    product: str | None  # GFD label (NVIDIA-A100-SXM4-80GB) or NVML name (NVIDIA A100-SXM4-80GB)
    count: int  # GPUs this process can use (0 on the CPU)
    compute_capability: str | None  # "8.0"; None when the source does not say
    source: str  # "flag", "env NEMOTRON_PROFILE", "node labels of <node>", "nvml", "no GPU found"
    notes: tuple[str, ...] = ()  # why earlier sources gave no answer, and other caveats

    @classmethod
    def assumed_from(cls, profile: Profile, source: str) -> Hardware:
        """What an explicitly chosen profile says the hardware is (nothing is detected)."""
        if profile.device is DeviceKind.CPU:
            return cls(DeviceKind.CPU, None, 0, None, source)
        product = " or ".join(profile.gpu_products)
        return cls(DeviceKind.GPU, product, profile.gpu_count, profile.compute_capability, source)

    @property
    def is_mig(self) -> bool:
        """Whether the product is a MIG slice (GFD: `...-MIG-1g.10gb`), not a whole GPU."""
        return self.product is not None and bool(_MIG.search(self.product))

    def describe(self) -> str:
        """`8 x NVIDIA-A100-SXM4-80GB (compute capability 8.0)`, or `no GPU`."""
        if self.device is DeviceKind.CPU:
            return "no GPU (cpu)"
        capability = f" (compute capability {self.compute_capability})"
        return f"{self.count} x {self.product}" + (capability if self.compute_capability else "")


class NodeReader(Protocol):
    """The part of `kubernetes.client.CoreV1Api` detection uses."""

    def read_node(self, name: str, **kwargs: Any) -> Any:
        """The V1Node called `name`."""
        ...


class _NoAnswer(Exception):
    """A detection source that could not say; the message is the reason."""


def detect_hardware(
    environ: Mapping[str, str], node_api: NodeReader | None = None, nvml: Any = None
) -> Hardware:
    """Node labels when in a cluster, else NVML, else the CPU; each skip leaves a note.

    `node_api` replaces the in-cluster `CoreV1Api`; `nvml` replaces the `pynvml` module.
    """
    notes: list[str] = []
    sources = [lambda: _from_nvml(nvml)]
    if environ.get("KUBERNETES_SERVICE_HOST"):
        sources.insert(0, lambda: _from_node_labels(environ, node_api))
    for source in sources:
        try:
            found = source()
        except _NoAnswer as reason:
            notes.append(str(reason))
            log_event("hardware_source_skipped", reason=str(reason))
            continue
        return replace(found, notes=(*notes, *found.notes))
    return Hardware(DeviceKind.CPU, None, 0, None, SOURCE_NONE, tuple(notes))


def visible_gpu_count(environ: Mapping[str, str]) -> int | None:
    """GPUs the device plugin gave this container (`NVIDIA_VISIBLE_DEVICES`), None if unknown.

    The plugin lists the allocated GPUs' ids; `all` (the CUDA images' default), an empty value
    or a mount path (the volume-mounts strategy) say nothing; `void` and `none` mean no GPU.
    """
    value = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip()
    if value in ("void", "none"):
        return 0
    if value in ("", "all") or value.startswith("/"):
        return None
    return len([item for item in value.split(",") if item.strip()])


def _from_node_labels(environ: Mapping[str, str], node_api: NodeReader | None) -> Hardware:
    node = environ.get("NODE_NAME", "").strip()
    if not node:
        raise _NoAnswer(
            "in a Kubernetes cluster but NODE_NAME is not set (set it from the downward API, "
            "fieldRef spec.nodeName), so the node's GPU labels were not read"
        )
    labels = _node_labels(node, node_api or _in_cluster_api())
    product = labels.get(PRODUCT_LABEL)
    if not product:
        raise _NoAnswer(
            f"node {node} has no {PRODUCT_LABEL} label (is GPU Feature Discovery running there?)"
        )
    count = _label_int(labels, COUNT_LABEL, node)
    notes = []
    visible = visible_gpu_count(environ)
    if visible == 0:
        raise _NoAnswer(
            f"node {node} has {count} x {product}, but NVIDIA_VISIBLE_DEVICES="
            f"{environ['NVIDIA_VISIBLE_DEVICES']} gives this container none"
        )
    if visible is not None and visible < count:
        notes.append(
            f"node {node} has {count} GPUs; NVIDIA_VISIBLE_DEVICES gives this container {visible}"
        )
        count = visible
    capability = None
    if COMPUTE_MAJOR_LABEL in labels and COMPUTE_MINOR_LABEL in labels:
        capability = f"{labels[COMPUTE_MAJOR_LABEL]}.{labels[COMPUTE_MINOR_LABEL]}"
    return Hardware(
        DeviceKind.GPU, product, count, capability, f"node labels of {node}", tuple(notes)
    )


def _in_cluster_api() -> NodeReader:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException as err:
        raise _NoAnswer(f"in-cluster Kubernetes configuration failed: {err}") from err
    return client.CoreV1Api()


def _node_labels(node: str, api: NodeReader) -> dict[str, str]:
    """The node's labels; any failure (RBAC, network, a missing node) becomes a reason."""
    try:
        found = api.read_node(node, _request_timeout=NODE_READ_TIMEOUT_S)
    except Exception as err:  # every failure of an optional probe is a reason, not a crash
        raise _NoAnswer(f"reading node {node} failed: {_api_problem(err)}") from err
    return dict(getattr(found.metadata, "labels", None) or {})


def _api_problem(err: Exception) -> str:
    status = getattr(err, "status", None)
    if not isinstance(status, int):
        return f"{type(err).__name__}: {err}"
    message = getattr(err, "reason", "") or ""
    with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError):
        message = json.loads(err.body)["message"]  # type: ignore[attr-defined]  # a Status
    hints = {
        403: " (the service account may not get nodes: enable the chart's RBAC, or choose the "
        "profile with --profile / NEMOTRON_PROFILE)",
        404: " (is NODE_NAME the node this pod runs on?)",
    }
    return f"HTTP {status}: {message}{hints.get(status, '')}"


def _label_int(labels: Mapping[str, str], label: str, node: str) -> int:
    value = labels.get(label, "")
    if not value.isdigit() or int(value) < 1:
        raise _NoAnswer(f"node {node} has {label}={value!r}; expected a GPU count of 1 or more")
    return int(value)


def _from_nvml(nvml: Any) -> Hardware:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as err:
            raise _NoAnswer(f"NVML: nvidia-ml-py is not installed ({err})") from err
    try:
        nvml.nvmlInit()
    except (nvml.NVMLError, OSError) as err:
        raise _NoAnswer(f"NVML: {err or type(err).__name__}") from err
    try:
        return _nvml_devices(nvml)
    except nvml.NVMLError as err:
        raise _NoAnswer(f"NVML: querying the GPUs failed: {err}") from err
    finally:
        nvml.nvmlShutdown()


def _nvml_devices(nvml: Any) -> Hardware:
    names, capabilities = [], []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        names.append(name.decode() if isinstance(name, bytes) else str(name))
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        capabilities.append(f"{major}.{minor}")
    if not names:
        raise _NoAnswer("NVML: the driver reports no GPU")
    notes = []
    same = [i for i, name in enumerate(names) if name == names[0]]
    if len(same) < len(names):
        notes.append(f"GPUs differ ({', '.join(names)}); counting the {len(same)} like GPU 0")
    return Hardware(DeviceKind.GPU, names[0], len(same), capabilities[0], SOURCE_NVML, tuple(notes))
