"""Our runtime against llama.cpp on the embedded model's GGUF, same threads, in one run.

    bash tools/build_llamacpp.sh            # once: llama-bench + llama-batched-bench (~15 min)
    python -m bench.compare_llamacpp [--precision int4] [--threads 2] [--levels 1 4 16 32]

llama.cpp runs the GGUF as shipped (Q4_1; weight repacking off unless `--llamacpp-repack`),
ours an engine built from the same GGUF at `--precision`. Batch 1: `llama-bench -p 0 -n N`
(decode from an empty context, N tokens, repeated) against our runtime decoding N tokens after
a prompt, repeated as often. Under load: `llama-batched-bench` decodes B sequences in lockstep
after prefilling them (its TG speed counts decode steps only); ours serves B concurrent requests
of the same prompt and output lengths through the runtime's scheduler (continuous batching),
and its output tokens/s counts the whole run, prefill and queueing included; B / ITL p50 is
given as ours' decode-only rate. Prints the machine, llama.cpp's build, the commands run and a
markdown report with the memory-bandwidth bounds of batch-1 decode for the bytes each format
reads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.compare_hf import (
    machine,
    memory_bandwidth_gbs,
    our_decode_rate,
    start_compiled,
    weight_bytes_read_per_step,
)
from bench.loadgen import LoadReport, Workload, make_requests, run_load
from engine_build.build import BuildRequest, build_engine
from engine_build.embedded import default_cache_dir, ensure_embedded_checkpoint, fetch_gguf
from engine_build.profiles import load_profiles
from engine_build.repository import EngineEntry, EngineRepository
from service.runtime.compiled import SIZES as COMPILED_SIZES
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.sizing import RuntimeOptions
from service.server.flags import batch_sizes

BENCH, BATCHED_BENCH = "llama-bench", "llama-batched-bench"
BUILD_HINT = "bash tools/build_llamacpp.sh"
KV_CACHE_BYTES = 2_000_000_000
DIFFERENCES = (
    "llama-batched-bench prefills B sequences, then decodes them in lockstep; its TG speed counts "
    "decode steps only. Ours serves B concurrent requests through the scheduler (continuous "
    "batching); its output tokens/s counts the whole run (prefill, first tokens, scheduling), "
    "B / ITL p50 is its decode-only rate."
)


@dataclass(frozen=True)
class Settings:
    """One run's configuration, shared by both peers."""

    threads: int
    precision: str
    levels: tuple[int, ...]
    prompt_tokens: int
    new_tokens: int
    repetitions: int
    rounds: int
    repack: bool
    compiled_decode: tuple[int, ...] = ()


@dataclass(frozen=True)
class LlamaCppRun:
    """What llama.cpp measured, and how."""

    build: str
    b1_mean: float
    b1_stdev: float
    tg_per_level: dict[int, float]
    commands: tuple[str, ...]


@dataclass(frozen=True)
class OurRun:
    """What our runtime measured, and on which engine."""

    engine: str
    weight_bytes: int
    b1_mean: float
    b1_stdev: float
    levels: dict[int, LoadReport]


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path | None]:
    """The run's settings and the llama.cpp binaries' directory, if given."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="compute threads of both peers")
    parser.add_argument("--precision", choices=["bf16", "fp32", "int8", "int4"], default="int4")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length under load")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens decoded per sequence")
    parser.add_argument("--repetitions", type=int, default=5, help="batch-1 repetitions")
    parser.add_argument("--rounds", type=int, default=2, help="ours: B x rounds requests per B")
    parser.add_argument("--llamacpp-dir", type=Path, help="directory holding the two binaries")
    parser.add_argument(
        "--compiled-decode",
        type=batch_sizes,
        default=COMPILED_SIZES,
        help="ours: decode batch sizes compiled before measuring (as nemotron-serve's flag; 'off')",
    )
    # Weight repacking is off unless asked for: on x86 the only repacked layout of Q4_1 is
    # ggml's AMX buffer, whose matmul segfaults on batches of this model (llama.cpp issue 20824,
    # seen with llama-batched-bench on an AMX Xeon); without AMX the flag changes nothing here.
    parser.add_argument(
        "--llamacpp-repack",
        action="store_true",
        help="let llama.cpp repack weights (its AMX path, which crashes batched Q4_1 here)",
    )
    args = parser.parse_args(argv)
    counts = [args.threads, args.prompt_tokens, args.new_tokens, args.repetitions, args.rounds]
    if min([*counts, *args.levels]) < 1 or args.new_tokens < 2:
        parser.error("counts must be >= 1 and --new-tokens >= 2")
    settings = Settings(
        threads=args.threads,
        precision=args.precision,
        levels=tuple(args.levels),
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        repetitions=args.repetitions,
        rounds=args.rounds,
        repack=args.llamacpp_repack,
        compiled_decode=args.compiled_decode,
    )
    return settings, args.llamacpp_dir


def llamacpp_dir(cache: Path, override: Path | None) -> Path | None:
    """The directory with both binaries: `override`, else the newest build in the tool cache."""
    candidates = [override] if override else sorted(cache.glob("tools/llama.cpp-*/bin"))[::-1]
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in (BENCH, BATCHED_BENCH)):
            return directory
    return None


def run_tool(command: list[str]) -> str:
    """A llama.cpp tool's stdout; its stderr is shown if it fails."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{shlex.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def llama_bench(binaries: Path, gguf: Path, s: Settings) -> tuple[dict[str, Any], str]:
    """llama-bench's batch-1 decode record (tokens/s avg and stddev), and its command."""
    command = [str(binaries / BENCH), "-m", str(gguf), "-t", str(s.threads)]
    command += ["-n", str(s.new_tokens), "-p", "0", "-r", str(s.repetitions), "-o", "json"]
    command += ["--repack", str(int(s.repack))]
    records = json.loads(run_tool(command))
    decode = [r for r in records if r["n_gen"] > 0 and r["n_prompt"] == 0]
    if len(decode) != 1:
        sys.exit(f"{shlex.join(command)}: expected one decode record, got {records}")
    return decode[0], shlex.join(command)


def llama_batched_bench(binaries: Path, gguf: Path, s: Settings) -> tuple[dict[int, float], str]:
    """llama-batched-bench's decode (TG) tokens/s per number of sequences, and its command."""
    per_sequence = s.prompt_tokens + s.new_tokens
    context = -(-max(s.levels) * per_sequence // 256) * 256  # every level fits: none skipped
    command = [str(binaries / BATCHED_BENCH), "-m", str(gguf), "-t", str(s.threads)]
    command += ["-tb", str(s.threads), "-c", str(context), "-npp", str(s.prompt_tokens)]
    command += ["-ntg", str(s.new_tokens), "-npl", ",".join(map(str, s.levels))]
    command += ["--repack" if s.repack else "--no-repack", "--output-format", "jsonl"]
    rows = [json.loads(line) for line in run_tool(command).splitlines() if line.startswith("{")]
    speeds = {row["pl"]: row["speed_tg"] for row in rows}
    missing = set(s.levels) - set(speeds)
    if missing:
        sys.exit(f"{shlex.join(command)}: no result for B={sorted(missing)}")
    return speeds, shlex.join(command)


def measure_llamacpp(binaries: Path, gguf: Path, s: Settings) -> LlamaCppRun:
    """Both llama.cpp benchmarks, before our runtime starts (so nothing else computes)."""
    record, bench_command = llama_bench(binaries, gguf, s)
    speeds, batched_command = llama_batched_bench(binaries, gguf, s)
    source = binaries.parent / "SOURCE.txt"
    build = f"build {record['build_commit']} ({record['build_number']})"
    if source.is_file():
        build += "; " + "; ".join(source.read_text().strip().splitlines())
    return LlamaCppRun(
        build=build,
        b1_mean=float(record["avg_ts"]),
        b1_stdev=float(record["stddev_ts"]),
        tg_per_level=speeds,
        commands=(bench_command, batched_command),
    )


def build_our_engine(gguf: Path, cache: Path, s: Settings) -> EngineEntry:
    """Our cpu-profile engine at `s.precision`, imported from `gguf` (cached like compare_hf)."""
    checkpoint = ensure_embedded_checkpoint(cache, gguf=gguf)
    build = BuildRequest(checkpoint, load_profiles().get("cpu"), precision=s.precision)
    repository = EngineRepository(cache / "bench-engines")
    return run_in_compute_thread(lambda: build_engine(build, repository).entry, s.threads)


def measure_ours(engine: EngineEntry, s: Settings) -> OurRun:
    """Batch-1 decode (repeated, one warm-up dropped) and each load level, on one runtime."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    options = RuntimeOptions(
        kv_cache_bytes=KV_CACHE_BYTES, threads=s.threads, compiled_decode=s.compiled_decode
    )
    runtime = start_compiled(engine.directory, options, loop)
    encode, vocab = runtime.tokenizer.encode, runtime.graph.vocab_size
    lengths = (s.prompt_tokens, s.prompt_tokens), (s.new_tokens, s.new_tokens)
    prompt = make_requests(Workload(1, lengths[0], (1, 1), seed=1), encode, vocab)
    rates = [
        loop.run_until_complete(our_decode_rate(runtime, prompt[0].prompt_ids, s.new_tokens))
        for _ in range(s.repetitions + 1)
    ][1:]
    levels: dict[int, LoadReport] = {}
    for level in s.levels:
        workload = Workload(s.rounds * level, *lengths, seed=level)
        specs = make_requests(workload, encode, vocab)
        levels[level] = loop.run_until_complete(run_load(runtime, specs, concurrency=level))
    loop.run_until_complete(runtime.shutdown())
    loop.close()
    return OurRun(
        engine=f"{engine.name} ({engine.engine_id}), weights {s.precision}",
        weight_bytes=weight_bytes_read_per_step(engine.directory),
        b1_mean=statistics.mean(rates),
        b1_stdev=statistics.stdev(rates) if len(rates) > 1 else 0.0,
        levels=levels,
    )


def ratio(ours: float, theirs: float) -> str:
    """`ours / theirs` as `1.23x`."""
    return f"{ours / theirs:.2f}x" if theirs else "-"


def report(s: Settings, gguf: Path, cpp: LlamaCppRun, ours: OurRun, bandwidth: float) -> None:
    """Print the configuration and the markdown report."""
    gguf_bytes = gguf.stat().st_size
    print(f"\nmachine: {machine()}")
    print(f"threads: {s.threads} (llama.cpp -t/-tb; our engine thread's compute team)")
    print(f"llama.cpp: {cpp.build}")
    print(f"GGUF: {gguf} ({gguf_bytes / 1e6:.0f} MB)")
    print(f"ours: {ours.engine}, continuous batching through the runtime's scheduler")
    print("commands:\n" + "\n".join(f"  {c}" for c in cpp.commands))
    print(
        f"  ours: batch 1 = {s.repetitions} x {s.new_tokens} tokens after a "
        f"{s.prompt_tokens}-token prompt (+1 warm-up); level B = {s.rounds} x B requests of "
        f"{s.prompt_tokens} prompt + {s.new_tokens} new tokens, B in flight"
    )
    print(f"differences: {DIFFERENCES}")
    print(f"\nmemory copy bandwidth ({s.threads} threads): {bandwidth:.1f} GB/s (read + write)")
    for label, size in (("ours", ours.weight_bytes), ("GGUF file", gguf_bytes)):
        bound = bandwidth * 1e9 / size
        print(f"batch-1 bound for {label}: {size / 1e6:.0f} MB per step -> ~{bound:.0f} tokens/s")
    print("\n| measure | nemotron-serve | llama.cpp | ratio |\n|---|---|---|---|")
    print(
        f"| batch-1 decode tokens/s | {ours.b1_mean:.1f} ± {ours.b1_stdev:.1f} | "
        f"{cpp.b1_mean:.1f} ± {cpp.b1_stdev:.1f} | {ratio(ours.b1_mean, cpp.b1_mean)} |"
    )
    for level, load in ours.levels.items():
        theirs = cpp.tg_per_level[level]
        print(
            f"| B={level}: output tokens/s (llama.cpp: TG) | {load.output_tokens_per_s:.1f} | "
            f"{theirs:.1f} | {ratio(load.output_tokens_per_s, theirs)} |"
        )
    print("\n| B | ours ITL p50 ms | ours ITL p90 ms | ours B / ITL p50 tokens/s | ratio to TG |")
    print("|---|---|---|---|---|")
    for level, load in ours.levels.items():
        decode = level * 1000 / load.itl_ms["p50"] if load.itl_ms["p50"] else 0.0
        print(
            f"| {level} | {load.itl_ms['p50']} | {load.itl_ms['p90']} | {decode:.1f} | "
            f"{ratio(decode, cpp.tg_per_level[level])} |"
        )


def main(argv: list[str] | None = None) -> None:
    """Run llama.cpp, then ours, on the same GGUF and threads; print the report."""
    settings, override = parse_args(argv)
    cache = default_cache_dir(os.environ)
    binaries = llamacpp_dir(cache, override)
    if binaries is None:
        where = override or cache / "tools" / "llama.cpp-<version>" / "bin"
        print(
            f"llama.cpp's {BENCH} and {BATCHED_BENCH} not found in {where}; build them with "
            f"`{BUILD_HINT}` (~15 minutes on 2 cores) or pass --llamacpp-dir",
            file=sys.stderr,
        )
        sys.exit(2)
    reserve_cores_for_compute_threads()
    gguf = fetch_gguf(cache)
    engine = build_our_engine(gguf, cache, settings)
    cpp = measure_llamacpp(binaries, gguf, settings)
    ours = measure_ours(engine, settings)
    bandwidth = run_in_compute_thread(memory_bandwidth_gbs, settings.threads)
    report(settings, gguf, cpp, ours, bandwidth)


if __name__ == "__main__":
    main()
