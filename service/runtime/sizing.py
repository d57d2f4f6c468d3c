"""How big a torch engine's runtime is: its limits and its KV cache, from the profile and memory.

Used by rank 0 (`factory`) and by every tensor-parallel worker (`workers`), which must size the
same cache; kept apart from both so that neither imports the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine_build.backends.torch_engine import TorchEngine
from engine_build.events import log_event
from engine_build.profiles import WEIGHT_ONLY, Dtype
from engine_build.sharding import rank_graph
from service.runtime.core import RuntimeConfig
from service.runtime.interface import EngineError
from service.runtime.kv_pages import PagedKVStore
from service.runtime.memory import MemoryBudget, host_budget


@dataclass(frozen=True)
class RuntimeOptions:
    """Overrides of what the engine's profile says (None: take the profile's value)."""

    kv_cache_bytes: int | None = None  # per device; default: kv_cache_free_fraction x free memory
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_seq_len: int | None = None
    block_size: int = 16
    max_waiting: int = 1024
    tp_timeout_s: float = 30.0  # a tensor-parallel collective slower than this means a lost rank
    boot_timeout_s: float = 1800.0  # tensor-parallel workers must have loaded their shards by then
    threads: int | None = None  # compute threads of the engine thread (default: all cores)
    measure_kernels: bool = True  # CPU: time the candidate kernels per matrix (runtime/kernels.py)
    compiled_decode: tuple[int, ...] = ()  # CPU, tp 1: batch sizes of compiled decode steps


class MemoryBudgetError(EngineError):
    """The memory left after loading the weights cannot hold the smallest useful KV cache."""


def memory_budget(device: torch.device) -> MemoryBudget:
    """Memory the KV cache may take from: free GPU memory, or the host's under its cgroup."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return MemoryBudget(int(free), f"torch.cuda.mem_get_info({device})", int(total))
    return host_budget()


def check_weights_fit(engine: TorchEngine, device: torch.device) -> None:
    """Refuse, before loading, weights that the memory budget cannot hold (CPU engines).

    In a container a load beyond the cgroup limit is not an error but an OOM kill, with no
    message. Every rank of a CPU engine loads into the same host memory, so all of them count;
    FP8 weights are held in bf16 for compute, twice their stored size; int8 and int4 loads peak
    near twice theirs too (the stored tensors beside the kernels' aligned or packed copies).
    """
    if device.type != "cpu":
        return  # a GPU load past its memory fails with CUDA's own out-of-memory error
    stored = sum(
        (engine.directory / file).stat().st_size
        for files in engine.rank_files.values()
        for file in files
    )
    doubled = engine.precision.weights in (Dtype.FP8, *WEIGHT_ONLY)
    resident = stored * (2 if doubled else 1)
    budget = host_budget()
    if resident > budget.available:
        raise MemoryBudgetError(
            f"the engine's weights take about {resident} bytes in memory and only "
            f"{budget.available} are available ({budget.source}): raise the memory limit "
            "(the chart's profiles.<profile>.resources) or serve a smaller precision"
        )


def kv_store_and_config(
    engine: TorchEngine, dtype: torch.dtype, options: RuntimeOptions, device: torch.device
) -> tuple[PagedKVStore, RuntimeConfig]:
    """This rank's KV pages and the runtime limits, from the engine's profile and free memory."""
    local = rank_graph(engine.graph, engine.tensor_parallel)
    limits = engine.limits
    block_bytes = PagedKVStore.bytes_per_block(local, options.block_size, dtype)
    max_seq_len = min(
        options.max_seq_len or limits.max_seq_len, engine.graph.max_position_embeddings
    )
    needed = -(-max_seq_len // options.block_size) * block_bytes
    if options.kv_cache_bytes is not None:
        budget, source = options.kv_cache_bytes, "--kv-cache-memory"
        if budget < needed:  # the operator's choice: kept, but not silently
            log_event(
                "kv_cache_below_context",
                logging.WARNING,
                bytes=budget,
                needed=needed,
                max_seq_len=max_seq_len,
                note="a request may hold no more tokens than the cache (prompt plus output)",
            )
    else:
        memory = memory_budget(device)
        available = memory.available
        if device.type == "cpu":  # every rank of a CPU engine takes from the same host memory
            available //= engine.tensor_parallel
        budget = int(limits.kv_cache_free_fraction * available)
        source = f"{limits.kv_cache_free_fraction} x {available} bytes free ({memory.source})"
        if budget < needed:
            raise MemoryBudgetError(
                f"the KV cache can have {budget} bytes ({source}), and one sequence of the "
                f"engine's max_seq_len {max_seq_len} needs {needed}: raise the memory limit, "
                "lower the profile's max_seq_len, or set the cache size with --kv-cache-memory "
                "(NEMOTRON_KV_CACHE_MEMORY)"
            )
    num_blocks = max(1, budget // block_bytes) if block_bytes else 1
    log_event(
        "kv_cache_sized",
        logging.INFO,
        bytes=budget,
        blocks=num_blocks,
        block_size=options.block_size,
        tokens=num_blocks * options.block_size,
        source=source,
    )
    max_num_tokens = options.max_num_tokens or limits.max_num_tokens
    config = RuntimeConfig(
        # A step gives every running sequence at least one token: never more of them than tokens.
        max_batch_size=min(options.max_batch_size or limits.max_batch_size, max_num_tokens),
        max_num_tokens=max_num_tokens,
        max_seq_len=max_seq_len,
        num_blocks=num_blocks,
        block_size=options.block_size,
        max_waiting=options.max_waiting,
    )
    return PagedKVStore(local, num_blocks, options.block_size, dtype, device), config


def element_bytes(dtype: torch.dtype) -> int:
    """Bytes of one element of `dtype`."""
    return torch.tensor([], dtype=dtype).element_size()
