"""Load generator for the in-process runtime: open-loop arrivals or closed-loop concurrency.

Prompt and output lengths are drawn from uniform ranges with a fixed seed, so every run (and
every peer in a comparison) sees the same requests. Reports output tokens/s, time to first
token and inter-token latency percentiles, and peak KV usage.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from service.runtime.interface import Engine, GenerationRequest
from service.runtime.options import RequestOptions, SamplingParams

WORDS = (
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
)


@dataclass(frozen=True)
class Workload:
    """What to send: how many requests, their length ranges, the seed."""

    requests: int
    prompt_tokens: tuple[int, int]
    output_tokens: tuple[int, int]
    seed: int = 0


@dataclass(frozen=True)
class RequestSpec:
    """One generated request: prompt token ids and how many tokens to produce."""

    prompt_ids: tuple[int, ...]
    output_tokens: int


def make_requests(workload: Workload, encode: object, vocab_size: int) -> list[RequestSpec]:
    """Deterministic prompts of the drawn lengths (English words, cut to the token count)."""
    rng = random.Random(workload.seed)
    specs = []
    for _ in range(workload.requests):
        length = rng.randint(*workload.prompt_tokens)
        text = " ".join(rng.choice(WORDS) for _ in range(length))
        ids = list(encode(text))[:length]  # type: ignore[operator]
        while len(ids) < length:
            ids.append(rng.randrange(vocab_size))
        specs.append(RequestSpec(tuple(ids), rng.randint(*workload.output_tokens)))
    return specs


@dataclass
class RequestResult:
    """Measured times of one request."""

    tokens: int
    ttft_s: float
    itl_s: list[float]
    total_s: float


@dataclass(frozen=True)
class LoadReport:
    """The figures of one load run."""

    mode: str
    level: float
    requests: int
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    peak_kv_blocks_used: int
    kv_blocks_total: int


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 in milliseconds."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50": round(pick(0.50), 2), "p90": round(pick(0.90), 2), "p99": round(pick(0.99), 2)}


async def _one(engine: Engine, name: str, spec: RequestSpec) -> RequestResult:
    request = GenerationRequest(
        name,
        spec.prompt_ids,
        RequestOptions(SamplingParams(), max_new_tokens=spec.output_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    stamps: list[float] = []
    async for event in engine.generate(request):
        if event.token_ids:
            stamps.append(time.perf_counter())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    return RequestResult(len(stamps), stamps[0] - start, gaps, time.perf_counter() - start)


async def run_load(
    engine: Engine,
    specs: list[RequestSpec],
    concurrency: int | None = None,
    rate_per_s: float | None = None,
    seed: int = 0,
) -> LoadReport:
    """Closed loop (`concurrency` in flight) or open loop (Poisson arrivals at `rate_per_s`)."""
    peak = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, engine.stats().kv_blocks_used)
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    start = time.perf_counter()
    if rate_per_s is not None:
        results = await _open_loop(engine, specs, rate_per_s, seed)
        mode, level = "open-loop", rate_per_s
    else:
        results = await _closed_loop(engine, specs, concurrency or 1)
        mode, level = "closed-loop", float(concurrency or 1)
    wall = time.perf_counter() - start
    done.set()
    await watcher
    tokens = sum(r.tokens for r in results)
    return LoadReport(
        mode=mode,
        level=level,
        requests=len(results),
        output_tokens=tokens,
        wall_s=round(wall, 3),
        output_tokens_per_s=round(tokens / wall, 2),
        ttft_ms=percentiles([r.ttft_s for r in results]),
        itl_ms=percentiles([g for r in results for g in r.itl_s]),
        peak_kv_blocks_used=peak,
        kv_blocks_total=engine.stats().kv_blocks_total,
    )


async def _closed_loop(
    engine: Engine, specs: list[RequestSpec], concurrency: int
) -> list[RequestResult]:
    queue = list(enumerate(specs))
    results: list[RequestResult] = []

    async def client() -> None:
        while queue:
            index, spec = queue.pop(0)
            results.append(await _one(engine, f"load-{index}", spec))

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return results


async def _open_loop(
    engine: Engine, specs: list[RequestSpec], rate: float, seed: int
) -> list[RequestResult]:
    rng = random.Random(seed)
    tasks = []
    for index, spec in enumerate(specs):
        tasks.append(asyncio.create_task(_one(engine, f"load-{index}", spec)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


def main() -> None:
    """`python -m bench.loadgen ENGINE_DIR ...`: one load run against a built torch engine."""
    from service.runtime.factory import open_runtime
    from service.runtime.sizing import RuntimeOptions

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("engine_dir")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(16, 256))
    parser.add_argument("--output-tokens", type=int, nargs=2, default=(16, 128))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, help="open loop: mean arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-bytes", type=int, default=1_000_000_000)
    args = parser.parse_args()

    async def run() -> LoadReport:
        engine = open_runtime(args.engine_dir, RuntimeOptions(kv_cache_bytes=args.kv_cache_bytes))
        await engine.start()
        try:
            workload = Workload(
                args.requests, tuple(args.prompt_tokens), tuple(args.output_tokens), args.seed
            )
            specs = make_requests(workload, engine.tokenizer.encode, engine.graph.vocab_size)
            return await run_load(engine, specs, args.concurrency, args.rate, args.seed)
        finally:
            await engine.shutdown()

    report = asyncio.run(run())
    print(json.dumps(asdict(report), indent=2))


if __name__ == "__main__":
    main()
