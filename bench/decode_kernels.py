"""Two measurements behind the runtime's design choices, on the embedded model's bf16 engine.

    python -m bench.decode_kernels

1. One-row products: all of the model's linear layers back to back, through the general
   matrix-matrix path (`F.linear`) and through `torch.mv`.
2. Compute teams: a batch-1 decode step in the main thread, then in a second thread while the
   main thread keeps its own OpenMP team (what the runtime avoids).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine_build.embedded import default_cache_dir
from engine_build.model import Linear
from service.runtime.kv_pages import PagedKVStore
from service.runtime.loader import load_rank_model
from service.runtime.runner import ModelRunner, StepPlan
from service.startup.selection import ensure_cpu_engine


def best_ms(job: Callable[[], object], repeats: int = 10) -> float:
    """Mean time of `job` over `repeats` runs after two warm-ups, in milliseconds."""
    for _ in range(2):
        job()
    start = time.perf_counter()
    for _ in range(repeats):
        job()
    return (time.perf_counter() - start) / repeats * 1000


BLOCKS = list(range(16))  # one sequence, up to 256 tokens in 16-token blocks


def one_sequence_runner(engine_dir: Path) -> ModelRunner:
    """A runner with KV pages for one sequence of up to 256 tokens."""
    model = load_rank_model(engine_dir)
    return ModelRunner(model, PagedKVStore(model.graph, len(BLOCKS), 16, model.dtype))


def prefill(runner: ModelRunner, context: int) -> None:
    """Fill the sequence's first `context` positions."""
    prompt = list(range(5, 5 + context))
    runner.execute(StepPlan(prompt, list(range(context)), [(0, context, 0, BLOCKS)], [context - 1]))


def decode_plan(position: int) -> StepPlan:
    """One decoded token at `position` of the sequence."""
    return StepPlan([7], [position], [(0, 1, position, BLOCKS)], [0])


def decode_step_ms(runner: ModelRunner, context: int = 64) -> float:
    """Mean batch-1 decode step after a `context`-token prefill."""
    prefill(runner, context)
    positions = iter(range(context, context + 40))
    return best_ms(lambda: runner.execute(decode_plan(next(positions))), repeats=30)


def main() -> None:
    """Print both measurements."""
    torch.set_num_threads(os.cpu_count() or 1)
    engine = ensure_cpu_engine(default_cache_dir(os.environ), precision="bf16")
    runner = one_sequence_runner(engine)
    layers = [m for m in runner.model.modules() if isinstance(m, Linear)]
    rows = {m: torch.randn(1, m.in_features, dtype=torch.bfloat16) for m in layers}
    with torch.inference_mode():
        general = best_ms(lambda: [F.linear(rows[m], m.weight) for m in layers])
        vector = best_ms(lambda: [torch.mv(m.weight, rows[m][0]) for m in layers])
    print(
        f"{len(layers)} linear layers, one row, bf16: F.linear {general:.1f} ms, "
        f"torch.mv {vector:.1f} ms"
    )
    main_thread = decode_step_ms(runner)
    result: dict[str, float] = {}
    second = threading.Thread(target=lambda: result.update(ms=decode_step_ms(runner)))
    second.start()
    second.join()
    print(
        f"batch-1 decode step: main thread {main_thread:.1f} ms; second thread while the main "
        f"thread keeps its team {result['ms']:.1f} ms"
    )


if __name__ == "__main__":
    main()
