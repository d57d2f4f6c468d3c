"""Our runtime against transformers `generate`: same SmolLM2 weights and dtype, in one run.

    python -m bench.compare_hf [--dtype bfloat16] [--decode-tokens 128] [--requests 32]
        [--precision int4] [--compiled-decode 1,2,4,8,16,32|off]

Prints the machine, the configuration and a markdown report: batch-1 decode, the same
requests at concurrency 1, 4, 16 and 32 (ours: continuous batching; transformers: static
batches of that size, left-padded, as people use `generate`), time to first token for a
32-token prompt, the memory-bandwidth bound of batch-1 decode, and a profile of one decode step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.loadgen import LoadReport, RequestSpec, Workload, make_requests, run_load
from engine_build.build import BuildRequest, build_engine
from engine_build.embedded import default_cache_dir, ensure_embedded_checkpoint, fetch_gguf
from engine_build.graph import ModelGraph
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from service.runtime.compiled import SIZES as COMPILED_SIZES
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import open_runtime
from service.runtime.frontend import TorchRuntime
from service.runtime.interface import GenerationRequest
from service.runtime.options import RequestOptions
from service.runtime.sizing import RuntimeOptions
from service.server.flags import batch_sizes

PRECISION = {"bfloat16": "bf16", "float32": "fp32"}
# The operators that multiply by weight matrices: bf16/fp32 (mm, addmm, addmv_ for torch.mv)
# and the weight-only kernels of int8 and int4 engines.
MATMUL_OPERATORS = (
    "aten::mm",
    "aten::addmm",
    "aten::addmv_",
    "aten::_weight_int8pack_mm",
    "aten::_weight_int4pack_mm_for_cpu",
)


def machine() -> str:
    """CPU model, cores, torch version and threads."""
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def weight_bytes_read_per_step(engine_dir: Path) -> int:
    """Bytes of weights a decode step reads, as held in memory (int8/int4 as stored).

    Tied embeddings count once, as the LM head; an embedding table that is not the LM head (an
    untied model, or an int8/int4 engine's own quantized LM head) counts as the one row a token
    reads.
    """
    from service.runtime.loader import load_rank_model

    model = load_rank_model(engine_dir)
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.numel() * t.element_size() for t in tensors}
    embed = model.embed.weight
    head = getattr(model.lm_head, "weight", None)
    if head is None or head.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr():
        row = embed.shape[1] * embed.element_size()
        storages[embed.untyped_storage().data_ptr()] = row
    return sum(storages.values())


def memory_bandwidth_gbs(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Best copy bandwidth (read + write bytes per second) of a large buffer, in GB/s."""
    source = torch.ones(size_bytes // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * size_bytes / best / 1e9


async def our_decode_rate(runtime: TorchRuntime, prompt: tuple[int, ...], tokens: int) -> float:
    """Batch-1 decode tokens/s (first token excluded)."""
    stamps = []
    request = GenerationRequest(
        "b1", prompt, RequestOptions(max_new_tokens=tokens, ignore_eos=True)
    )
    async for event in runtime.generate(request):
        if event.token_ids:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


async def our_ttft_ms(runtime: TorchRuntime, prompts: list[tuple[int, ...]]) -> float:
    """Median time to first token, one request at a time."""
    times = []
    for index, prompt in enumerate(prompts):
        start = time.perf_counter()
        request = GenerationRequest(
            f"ttft{index}", prompt, RequestOptions(max_new_tokens=1, ignore_eos=True)
        )
        async for event in runtime.generate(request):
            if event.token_ids:
                times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def hf_model(checkpoint: Path, dtype: torch.dtype):  # noqa: ANN201 - transformers types
    """A dense transformers `LlamaForCausalLM` with exactly our imported weights, in `dtype`.

    (transformers' own GGUF load keeps the weights quantized and runs dequantizing kernels,
    which would compare different arithmetic; this is the plain model people would run.)
    """
    import json

    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = json.loads((checkpoint / "config.json").read_text())
    block = ours["block_configs"][0]
    heads = ours["num_attention_heads"]
    config = LlamaConfig(
        hidden_size=ours["hidden_size"],
        intermediate_size=ModelGraph.from_hf_config(ours).blocks[0].ffn.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=heads // block["attention"]["n_heads_in_group"],
        num_hidden_layers=ours["num_hidden_layers"],
        vocab_size=ours["vocab_size"],
        rms_norm_eps=ours["rms_norm_eps"],
        rope_theta=ours["rope_theta"],
        max_position_embeddings=ours["max_position_embeddings"],
        tie_word_embeddings=ours["tie_word_embeddings"],
    )
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(
        load_file(checkpoint / "model.safetensors"), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model.to(dtype).eval()


@torch.inference_mode()
def hf_generate(model, prompts: list[tuple[int, ...]], new_tokens: int) -> float:  # noqa: ANN001
    """Seconds for one static batch: left-padded prompts, exactly `new_tokens` greedy tokens."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - start


def hf_decode_rate(model, prompt: tuple[int, ...], tokens: int) -> float:  # noqa: ANN001
    """Batch-1 decode tokens/s (the first token's time, measured apart, excluded)."""
    first = min(hf_generate(model, [prompt], 1) for _ in range(3))
    total = hf_generate(model, [prompt], tokens)
    return (tokens - 1) / (total - first)


def hf_served(model, specs: list[RequestSpec], concurrency: int) -> float:  # noqa: ANN001
    """Output tokens/s serving `specs` in static batches of `concurrency` (useful tokens only)."""
    start = time.perf_counter()
    for first in range(0, len(specs), concurrency):
        batch = specs[first : first + concurrency]
        hf_generate(model, [s.prompt_ids for s in batch], max(s.output_tokens for s in batch))
    return sum(s.output_tokens for s in specs) / (time.perf_counter() - start)


def decode_step_profile(engine_dir: Path, context: int = 64, steps: int = 10) -> tuple[str, float]:
    """Top operators of batch-1 decode steps, and the share of time in matrix multiplies.

    Runs a `ModelRunner` on the engine in this thread (after the runtime has stopped, so this
    thread's compute team is the only one), prefilling `context` tokens, then profiling.
    """
    from torch.profiler import ProfilerActivity, profile

    from bench.decode_kernels import decode_plan, one_sequence_runner, prefill

    torch.set_num_threads(os.cpu_count() or 1)
    runner = one_sequence_runner(engine_dir)
    prefill(runner, context)
    for position in range(context, context + 3):
        runner.execute(decode_plan(position))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for position in range(context + 3, context + 3 + steps):
            runner.execute(decode_plan(position))
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages)
    matmul = sum(e.self_cpu_time_total for e in averages if e.key in MATMUL_OPERATORS)
    return averages.table(sort_by="self_cpu_time_total", row_limit=12), matmul / total


@dataclass
class Results:
    """Everything one run measured."""

    requests: int
    bandwidth_gbs: float
    weight_bytes: int
    ours_b1: float
    ours_ttft_ms: float
    ours_levels: dict[int, LoadReport]
    profile: str
    matmul_share: float
    hf_b1: float | None = None
    hf_levels: dict[int, float] = field(default_factory=dict)


def start_compiled(
    engine_dir: Path, options: RuntimeOptions, loop: asyncio.AbstractEventLoop
) -> TorchRuntime:
    """Our runtime on `engine_dir`, started, once every compiled decode size is in use."""
    runtime = open_runtime(engine_dir, options)
    loop.run_until_complete(runtime.start())  # from here on, tensor work stays in its thread
    started = time.perf_counter()
    compiled = runtime.wait_compiled()
    print(
        f"ours: decode compiled for batch sizes {compiled or 'none'} in "
        f"{time.perf_counter() - started:.0f} s after ready",
        flush=True,
    )
    return runtime


def main() -> None:
    """Run every comparison and print the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", choices=sorted(PRECISION), default="bfloat16")
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--skip-hf", action="store_true", help="only our runtime")
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32", "fp8", "int8", "int4"],
        help="our engine's weights (default: --dtype's); transformers runs in --dtype",
    )
    parser.add_argument(
        "--compiled-decode",
        type=batch_sizes,
        default=COMPILED_SIZES,
        help="ours: decode batch sizes compiled before measuring, as nemotron-serve serves "
        "them (its flag's values; 'off': eager steps only)",
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    reserve_cores_for_compute_threads()
    cache = default_cache_dir(os.environ)
    gguf = fetch_gguf(cache)
    checkpoint = ensure_embedded_checkpoint(cache, gguf=gguf)
    precision = args.precision or PRECISION[args.dtype]
    build = BuildRequest(checkpoint, load_profiles().get("cpu"), precision=precision)
    repository = EngineRepository(cache / "bench-engines")
    engine = run_in_compute_thread(lambda: build_engine(build, repository).entry)
    print(f"machine: {machine()}")
    print(f"engine: {engine.name} ({engine.engine_id}), weights {precision}")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    options = RuntimeOptions(kv_cache_bytes=2_000_000_000, compiled_decode=args.compiled_decode)
    runtime = start_compiled(engine.directory, options, loop)
    workload = Workload(args.requests, (16, 128), (32, 64), seed=0)
    specs = make_requests(workload, runtime.tokenizer.encode, runtime.graph.vocab_size)
    prompt32 = make_requests(
        Workload(10, (32, 32), (1, 1), seed=1), runtime.tokenizer.encode, runtime.graph.vocab_size
    )
    ours_b1 = max(
        loop.run_until_complete(
            our_decode_rate(runtime, prompt32[0].prompt_ids, args.decode_tokens)
        )
        for _ in range(2)
    )
    ours_ttft = loop.run_until_complete(our_ttft_ms(runtime, [s.prompt_ids for s in prompt32]))
    ours_levels = {
        c: loop.run_until_complete(run_load(runtime, specs, concurrency=c)) for c in args.levels
    }
    loop.run_until_complete(runtime.shutdown())
    profile_table, matmul_share = decode_step_profile(engine.directory)
    results = Results(
        requests=args.requests,
        bandwidth_gbs=memory_bandwidth_gbs(),
        weight_bytes=weight_bytes_read_per_step(engine.directory),
        ours_b1=ours_b1,
        ours_ttft_ms=ours_ttft,
        ours_levels=ours_levels,
        profile=profile_table,
        matmul_share=matmul_share,
    )
    if not args.skip_hf:
        model = hf_model(checkpoint, dtype)
        results.hf_b1 = hf_decode_rate(model, prompt32[0].prompt_ids, args.decode_tokens)
        results.hf_levels = {c: hf_served(model, specs, c) for c in args.levels}
    report(results)


def report(r: Results) -> None:
    """Print the markdown report."""
    bound = r.bandwidth_gbs * 1e9 / r.weight_bytes
    print(
        f"\nmemory copy bandwidth: {r.bandwidth_gbs:.1f} GB/s (read + write); weights read per "
        f"decode step {r.weight_bytes / 1e6:.0f} MB -> bound ~{bound:.0f} tokens/s at batch 1"
    )
    print("\n| measure | nemotron-serve | transformers generate | ratio |\n|---|---|---|---|")
    rows = [("batch-1 decode tokens/s", r.ours_b1, r.hf_b1)]
    rows += [
        (
            f"{r.requests} requests at concurrency {level}: output tokens/s",
            load.output_tokens_per_s,
            r.hf_levels.get(level),
        )
        for level, load in r.ours_levels.items()
    ]
    for label, ours, theirs in rows:
        theirs_cell = f"{theirs:.1f}" if theirs else "-"
        ratio = f"{ours / theirs:.2f}x" if theirs else "-"
        print(f"| {label} | {ours:.1f} | {theirs_cell} | {ratio} |")
    print(f"\ntime to first token, 32-token prompt, concurrency 1: p50 {r.ours_ttft_ms:.1f} ms")
    for level, load in r.ours_levels.items():
        print(
            f"concurrency {level}: TTFT p50/p90 {load.ttft_ms['p50']}/{load.ttft_ms['p90']} ms, "
            f"ITL p50/p90 {load.itl_ms['p50']}/{load.itl_ms['p90']} ms, peak KV blocks "
            f"{load.peak_kv_blocks_used}/{load.kv_blocks_total}"
        )
    if 16 in r.ours_levels:
        ratio = r.ours_levels[16].output_tokens_per_s / r.ours_b1
        print(f"\nconcurrency 16 vs our batch-1: {ratio:.1f}x")
    print(
        f"\neager batch-1 decode steps (not the compiled one), share of operator time in matrix "
        f"multiplies: {r.matmul_share:.0%}; top operators:\n{r.profile}"
    )


if __name__ == "__main__":
    main()
