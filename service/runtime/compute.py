"""Where tensor work runs: one fresh thread per heavy job, owning the process's compute threads.

libgomp (PyTorch's OpenMP) keeps a team of worker threads per thread that ever ran a parallel
region. With two teams on the same cores it stops spinning between regions, and every small
kernel pays a wake-up: batch-1 decode took about twice as long (bench/decode_kernels.py). So
a serving process keeps its main thread at one compute thread and runs builds and the engine in
threads of their own, whose teams end with them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from service.runtime.memory import cpu_budget

T = TypeVar("T")


def reserve_cores_for_compute_threads() -> None:
    """Call first in a serving process: the main thread will not form a compute team."""
    torch.set_num_threads(1)


def run_in_compute_thread(
    job: Callable[[], T], threads: int | None = None, name: str = "compute"
) -> T:
    """Run `job` in a fresh thread with `threads` compute threads (default: the CPUs this process
    may use, cgroup quota included); wait."""
    outcome: dict[str, object] = {}

    def target() -> None:
        torch.set_num_threads(threads or cpu_budget()[0])
        try:
            outcome["value"] = job()
        except BaseException as err:  # re-raised in the caller
            outcome["error"] = err

    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]
