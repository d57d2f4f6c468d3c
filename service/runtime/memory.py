"""The memory a process may still allocate, and the CPUs it may use: its cgroups' limits, not
the host's free memory or core count.

Inside a container `/proc/meminfo` describes the node: a pod limited to 4 GiB on a node with
100 GiB free would size its KV cache from the 100 GiB and be OOM-killed while booting. The
budget here is the tightest of:

- every memory cgroup limit on the way from this process's cgroup to the root (cgroup v2
  `memory.max`, v1 `memory.limit_in_bytes`), less that cgroup's working set (usage less
  inactive file pages, as the kubelet counts it: page cache the kernel can drop is free);
- the host's `MemAvailable`.

On a GPU the budget is `torch.cuda.mem_get_info`'s free memory. `NEMOTRON_CGROUP_ROOT` moves
the cgroup mount (default `/sys/fs/cgroup`), for hosts that mount it elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes that may still be allocated, and what said so (for the startup log)."""

    available: int
    source: str
    limit: int | None = None  # the limiting cgroup's limit (None: no cgroup limit applies)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def host_budget(environ: Mapping[str, str] | None = None) -> MemoryBudget:
    """What this process may still allocate on the host, cgroup limits included."""
    environ = os.environ if environ is None else environ
    root = Path(environ.get("NEMOTRON_CGROUP_ROOT") or CGROUP_ROOT)
    budget = MemoryBudget(mem_available(MEMINFO), f"host MemAvailable ({MEMINFO})")
    for limit_file, limit, working_set in cgroup_limits(root, PROC_CGROUP):
        left = max(0, limit - working_set)
        if left < budget.available:
            budget = MemoryBudget(
                left,
                f"cgroup limit {limit_file} ({_gib(limit)}, working set {_gib(working_set)})",
                limit,
            )
    return budget


def mem_available(meminfo: Path) -> int:
    """The host's MemAvailable in bytes."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{meminfo} has no MemAvailable line")


def cgroup_limits(root: Path, proc_cgroup: Path) -> Iterator[tuple[Path, int, int]]:
    """(limit file, limit, working set) of every limited memory cgroup above this process."""
    for directory, v2 in cgroup_dirs(root, proc_cgroup, "memory"):
        limit_file = directory / ("memory.max" if v2 else "memory.limit_in_bytes")
        limit = _read_limit(limit_file)
        if limit is None:
            continue
        usage = _read_int(directory / ("memory.current" if v2 else "memory.usage_in_bytes"))
        if usage is None:
            continue
        inactive = _stat(
            directory / "memory.stat", "inactive_file" if v2 else "total_inactive_file"
        )
        yield limit_file, limit, max(0, usage - inactive)


def cgroup_dirs(root: Path, proc_cgroup: Path, controller: str) -> Iterator[tuple[Path, bool]]:
    """The cgroup directories of `controller` (memory, cpu) from this process's own up to the
    mount's root, each with whether it is cgroup v2."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths: list[tuple[Path, str, bool]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # the v2 hierarchy: at the root, or at unified/ beside v1's
            for mount in (root, root / "unified"):
                if (mount / "cgroup.controllers").exists():
                    paths.append((mount, path, True))
                    break
        elif controller in controllers.split(","):  # v1: mounted as "cpu,cpuacct" or "cpu"
            named = root / controllers
            paths.append((named if named.is_dir() else root / controller, path, False))
    if not paths:  # nothing says where: the mount's root (a container's own cgroup)
        v2 = (root / "cgroup.controllers").exists()
        paths.append((root if v2 else root / controller, "/", v2))
    for mount, path, v2 in paths:
        own = mount / path.lstrip("/")
        # In a container the mount is usually the container's own cgroup, and the path /proc
        # names (the host's) does not exist under it: then the mount's root is ours.
        directory = own if own.is_dir() else mount
        while True:
            yield directory, v2
            if directory == mount or mount not in directory.parents:
                break
            directory = directory.parent


def cpu_budget(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """How many CPUs this process may keep busy, and what said so: its affinity mask, lowered
    by the tightest cgroup CPU quota above it (v2 `cpu.max`, v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`), rounded up. A thread team larger than the quota is throttled hard."""
    environ = os.environ if environ is None else environ
    root = Path(environ.get("NEMOTRON_CGROUP_ROOT") or CGROUP_ROOT)
    cpus, source = len(os.sched_getaffinity(0)), "CPU affinity"
    for directory, v2 in cgroup_dirs(root, PROC_CGROUP, "cpu"):
        if v2:
            quota, period = _cpu_max(directory / "cpu.max")
        else:
            quota = _read_int(directory / "cpu.cfs_quota_us")
            period = _read_int(directory / "cpu.cfs_period_us")
        if quota is None or period is None or quota <= 0 or period <= 0:
            continue  # no quota (v1 writes -1, v2 "max")
        allowed = max(1, -(-quota // period))
        if allowed < cpus:
            cpus, source = allowed, f"cgroup CPU quota {quota}/{period} ({directory})"
    return cpus, source


def _cpu_max(path: Path) -> tuple[int | None, int | None]:
    try:
        quota, period = path.read_text().split()
        return (None if quota == "max" else int(quota)), int(period)
    except (OSError, ValueError):
        return None, None


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= UNLIMITED else value


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0
