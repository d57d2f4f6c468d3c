"""The runtime's own cost between model steps, apart from the model: a refactoring guard.

    python -m bench.step_overhead [--concurrency 1 16] [--requests 32] [--rounds 3]
        [--precision bf16|int8|int4]

Runs the same closed-loop load as `bench.compare_hf` (SmolLM2, bf16, the cpu profile) and
times every model step (`ModelRunner.execute`) from outside. What is left of the wall time is
the runtime itself: scheduling, sampling, detokenizing, events, the asyncio side. Machine noise
moves the model's time far more than the runtime's, so the step count, the batch sizes and the
gaps between steps compare two versions of the runtime better than tokens/s do. The script
only uses names that existed before the runtime was split, so pointing PYTHONPATH at an older
checkout measures that one with the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import time

from bench.compare_hf import machine
from bench.loadgen import Workload, make_requests, run_load
from engine_build.build import BuildRequest, build_engine
from engine_build.embedded import default_cache_dir, ensure_embedded_checkpoint, fetch_gguf
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from service.runtime import runner
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import open_runtime

try:
    from service.runtime.sizing import RuntimeOptions
except ImportError:  # before the runtime split, RuntimeOptions lived in the factory
    from service.runtime.factory import RuntimeOptions  # type: ignore[attr-defined, no-redef]

Step = tuple[float, float, int]  # start, seconds, sequences in the step


def _timed_steps() -> list[Step]:
    """Record every model step from now on (start, duration, batch size)."""
    steps: list[Step] = []
    execute = runner.ModelRunner.execute

    def timed(self: runner.ModelRunner, plan: runner.StepPlan) -> object:
        start = time.perf_counter()
        logits = execute(self, plan)
        steps.append((start, time.perf_counter() - start, len(plan.segments)))
        return logits

    runner.ModelRunner.execute = timed  # type: ignore[method-assign]
    return steps


def _row(concurrency: int, tokens_per_s: float, wall: float, steps: list[Step]) -> str:
    model = sum(seconds for _, seconds, _ in steps)
    gaps = [b[0] - (a[0] + a[1]) for a, b in itertools.pairwise(steps)]
    return (
        f"| {concurrency} | {tokens_per_s:.1f} | {len(steps)} | "
        f"{statistics.mean(s[2] for s in steps):.1f} | {model:.2f} | {wall - model:.2f} | "
        f"{statistics.median(gaps) * 1000:.2f} |"
    )


def main() -> None:
    """Print the machine and one table row per round and concurrency."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", choices=["bf16", "int8", "int4"], default="bf16")
    args = parser.parse_args()
    reserve_cores_for_compute_threads()
    cache = default_cache_dir(os.environ)
    checkpoint = ensure_embedded_checkpoint(cache, gguf=fetch_gguf(cache))
    build = BuildRequest(checkpoint, load_profiles().get("cpu"), precision=args.precision)
    repository = EngineRepository(cache / "bench-engines")
    engine = run_in_compute_thread(lambda: build_engine(build, repository).entry)
    steps = _timed_steps()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runtime = open_runtime(engine.directory, RuntimeOptions(kv_cache_bytes=2_000_000_000))
    loop.run_until_complete(runtime.start())
    workload = Workload(args.requests, (16, 128), (32, 64), seed=0)
    specs = make_requests(workload, runtime.tokenizer.encode, runtime.graph.vocab_size)
    print(f"machine: {machine()}; engine {engine.name}; {args.requests} requests a round")
    print("| concurrency | tokens/s | steps | mean batch | model s | runtime s | gap p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for _ in range(args.rounds):
        for concurrency in args.concurrency:
            steps.clear()
            started = time.perf_counter()
            report = loop.run_until_complete(run_load(runtime, specs, concurrency=concurrency))
            wall = time.perf_counter() - started
            print(_row(concurrency, report.output_tokens_per_s, wall, list(steps)), flush=True)
    loop.run_until_complete(runtime.shutdown())


if __name__ == "__main__":
    main()
