"""The KV cache's memory budget comes from the cgroup limits above the process, not the host.

Each test builds a fake cgroup mount (v2, v1 with nested groups, or the hybrid layout) and a
fake `/proc/self/cgroup`; the budget is the tightest limit less that cgroup's working set, or
the host's MemAvailable when no limit is tighter.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.runtime import memory
from service.runtime.memory import cgroup_limits, cpu_budget, host_budget

GIB = 2**30
HOST_AVAILABLE = 100 * GIB


@pytest.fixture
def fake_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /proc/meminfo with 100 GiB available, and the path of a fake /proc/self/cgroup."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: 200000000 kB\nMemAvailable: {HOST_AVAILABLE // 1024} kB\n")
    monkeypatch.setattr(memory, "MEMINFO", meminfo)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    monkeypatch.setattr(memory, "PROC_CGROUP", proc_cgroup)
    return proc_cgroup


def write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limit_less_working_set(tmp_path, fake_proc):
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="memory cpu\n")
    write(
        root,
        memory_max=f"{4 * GIB}\n",
        memory_current=f"{GIB + 256 * 2**20}\n",
        memory_stat=f"anon {GIB}\ninactive_file {256 * 2**20}\nactive_file 0\n",
    )
    budget = host_budget({"NEMOTRON_CGROUP_ROOT": str(root)})
    assert budget.available == 3 * GIB  # page cache the kernel can drop is not counted
    assert budget.limit == 4 * GIB
    assert "memory.max" in budget.source and "4.00 GiB" in budget.source


def test_cgroup_v2_without_a_limit_is_the_host(tmp_path, fake_proc):
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="memory\n", memory_max="max\n", memory_current="1000\n")
    budget = host_budget({"NEMOTRON_CGROUP_ROOT": str(root)})
    assert budget.available == HOST_AVAILABLE
    assert budget.limit is None and "MemAvailable" in budget.source


def test_a_limit_above_the_host_memory_leaves_the_host_figure(tmp_path, fake_proc):
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="", memory_max=f"{500 * GIB}", memory_current="0")
    assert host_budget({"NEMOTRON_CGROUP_ROOT": str(root)}).available == HOST_AVAILABLE


def test_cgroup_v1_nested_groups_take_the_tightest(tmp_path, fake_proc):
    root = tmp_path / "cgroup"
    fake_proc.write_text("5:cpu:/\n4:memory:/kubepods/pod1/ctr\n0::/\n")
    unlimited = "9223372036854771712\n"
    write(root / "memory", memory_limit_in_bytes=unlimited, memory_usage_in_bytes="1\n")
    write(
        root / "memory/kubepods",
        memory_limit_in_bytes=f"{64 * GIB}\n",
        memory_usage_in_bytes=f"{60 * GIB}\n",
        memory_stat=f"inactive_file 9\ntotal_inactive_file {GIB}\n",
    )
    write(
        root / "memory/kubepods/pod1",
        memory_limit_in_bytes=f"{8 * GIB}\n",
        memory_usage_in_bytes=f"{2 * GIB}\n",
    )
    write(root / "memory/kubepods/pod1/ctr", memory_limit_in_bytes=unlimited)
    budget = host_budget({"NEMOTRON_CGROUP_ROOT": str(root)})
    # the pod has 6 GiB left, the node's kubepods group 64 - (60 - 1) = 5 GiB: the tighter wins
    assert budget.available == 5 * GIB
    assert budget.source.startswith(f"cgroup limit {root / 'memory/kubepods'}")
    found = {
        str(path.parent): (limit, used) for path, limit, used in cgroup_limits(root, fake_proc)
    }
    assert found == {
        str(root / "memory/kubepods"): (64 * GIB, 59 * GIB),
        str(root / "memory/kubepods/pod1"): (8 * GIB, 2 * GIB),
    }


def test_cgroup_v1_in_a_container_reads_the_mount_root(tmp_path, fake_proc):
    """The host path /proc names does not exist inside the container's own mount."""
    root = tmp_path / "cgroup"
    fake_proc.write_text("4:memory:/kubepods/burstable/pod9/abc\n")
    write(
        root / "memory",
        memory_limit_in_bytes=f"{4 * GIB}\n",
        memory_usage_in_bytes=f"{GIB}\n",
    )
    assert host_budget({"NEMOTRON_CGROUP_ROOT": str(root)}).available == 3 * GIB


def test_hybrid_layout_finds_the_v1_memory_controller(tmp_path, fake_proc):
    root = tmp_path / "cgroup"
    fake_proc.write_text("4:memory:/job\n0::/\n")
    write(root / "unified", cgroup_controllers="\n")  # v2 beside v1, without memory
    write(root / "memory/job", memory_limit_in_bytes=f"{2 * GIB}", memory_usage_in_bytes="0")
    assert host_budget({"NEMOTRON_CGROUP_ROOT": str(root)}).available == 2 * GIB


def test_over_the_limit_leaves_nothing(tmp_path, fake_proc):
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="memory\n", memory_max=f"{GIB}", memory_current=f"{2 * GIB}")
    assert host_budget({"NEMOTRON_CGROUP_ROOT": str(root)}).available == 0


def test_no_cgroup_files_at_all_is_the_host(tmp_path, fake_proc):
    budget = host_budget({"NEMOTRON_CGROUP_ROOT": str(tmp_path / "absent")})
    assert budget.available == HOST_AVAILABLE


# --- CPUs: the thread team follows the cgroup CPU quota, not the host's cores ----------------


@pytest.fixture
def many_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process allowed on 64 cores (a big node)."""
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: set(range(64)))


def test_cgroup_v2_cpu_max_caps_the_cpus(tmp_path, fake_proc, many_cores):
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="cpu memory\n", cpu_max="200000 100000\n")
    cpus, source = cpu_budget({"NEMOTRON_CGROUP_ROOT": str(root)})
    assert cpus == 2 and "200000/100000" in source


def test_a_fractional_quota_rounds_up_and_no_quota_is_the_affinity(tmp_path, fake_proc, many_cores):
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="cpu\n", cpu_max="150000 100000\n")
    assert cpu_budget({"NEMOTRON_CGROUP_ROOT": str(root)})[0] == 2
    (root / "cpu.max").write_text("max 100000\n")
    assert cpu_budget({"NEMOTRON_CGROUP_ROOT": str(root)}) == (64, "CPU affinity")


def test_cgroup_v1_cfs_quota_in_the_joined_mount(tmp_path, fake_proc, many_cores):
    root = tmp_path / "cgroup"
    fake_proc.write_text("3:cpu,cpuacct:/kubepods/pod1\n4:memory:/kubepods/pod1\n")
    write(root / "cpu,cpuacct/kubepods", cpu_cfs_quota_us="-1\n", cpu_cfs_period_us="100000\n")
    write(
        root / "cpu,cpuacct/kubepods/pod1",
        cpu_cfs_quota_us="400000\n",
        cpu_cfs_period_us="100000\n",
    )
    assert cpu_budget({"NEMOTRON_CGROUP_ROOT": str(root)})[0] == 4


def test_the_affinity_mask_wins_when_it_is_tighter(tmp_path, fake_proc, monkeypatch):
    monkeypatch.setattr(memory.os, "sched_getaffinity", lambda pid: {0, 1})
    root = tmp_path / "cgroup"
    fake_proc.write_text("0::/\n")
    write(root, cgroup_controllers="cpu\n", cpu_max="800000 100000\n")
    assert cpu_budget({"NEMOTRON_CGROUP_ROOT": str(root)}) == (2, "CPU affinity")
