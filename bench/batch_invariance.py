"""How often a greedy request's tokens change when it runs inside a batch instead of alone.

    python -m bench.batch_invariance [--precision bf16|fp32] [--requests 100]

Builds a cpu engine of the embedded SmolLM2 in the given precision, runs `--requests` greedy
requests (mixed prompt and output lengths, fixed seed) one at a time, then all at once, and
counts the requests whose tokens differ. Different batch sizes take different matrix-multiply
kernels, which round differently; fp32 leaves far less room for a near-tie to flip.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from bench.loadgen import Workload, make_requests
from engine_build.embedded import default_cache_dir
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import open_runtime
from service.runtime.interface import GenerationRequest
from service.runtime.options import RequestOptions
from service.runtime.sizing import RuntimeOptions
from service.startup.selection import ensure_cpu_engine


async def measure(engine_dir: str, requests: int) -> None:
    """Run the requests alone, then together, and print the differences."""
    runtime = open_runtime(engine_dir, RuntimeOptions(kv_cache_bytes=500_000_000))
    await runtime.start()
    specs = make_requests(
        Workload(requests, (3, 150), (1, 24), seed=0),
        runtime.tokenizer.encode,
        runtime.graph.vocab_size,
    )
    batch = [
        GenerationRequest(
            f"r{i}", s.prompt_ids, RequestOptions(max_new_tokens=s.output_tokens, ignore_eos=True)
        )
        for i, s in enumerate(specs)
    ]

    async def tokens(request: GenerationRequest) -> list[int]:
        return [t async for event in runtime.generate(request) for t in event.token_ids]

    start = time.perf_counter()
    alone = [await tokens(r) for r in batch]
    alone_s = time.perf_counter() - start
    start = time.perf_counter()
    together = await asyncio.gather(*(tokens(r) for r in batch))
    together_s = time.perf_counter() - start
    await runtime.shutdown()
    differing = [i for i, (a, b) in enumerate(zip(alone, together, strict=True)) if a != b]
    print(
        f"{len(differing)} of {requests} requests differ between alone and batched "
        f"({sum(map(len, alone))} tokens; alone {alone_s:.1f} s, batched {together_s:.1f} s)"
    )
    for index in differing[:5]:
        pairs = enumerate(zip(alone[index], together[index], strict=True))
        first = next(k for k, (a, b) in pairs if a != b)
        print(f"  request {index}: first difference at token {first} of {len(alone[index])}")


def main() -> None:
    """Parse arguments, build the engine, measure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--requests", type=int, default=100)
    args = parser.parse_args()
    reserve_cores_for_compute_threads()
    cache = default_cache_dir(os.environ)
    engine = run_in_compute_thread(lambda: ensure_cpu_engine(cache, precision=args.precision))
    print(f"engine: {engine}")
    asyncio.run(measure(str(engine), args.requests))


if __name__ == "__main__":
    main()
