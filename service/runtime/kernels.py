"""Which kernel multiplies by each weight matrix: measured on this machine, not assumed.

The same bf16 matrix times one row is about twice as fast through `torch.mv` as through
`F.linear` on an Intel Xeon with AMX, and about twice as slow on an AMD EPYC without it; int8
and int4 weight-only kernels beat bf16 at one row and lose to AMX's bf16 matrix product at 16
(docs/benchmarks.md). So at first load, for every distinct (format, shape) of the model's
matrices, each candidate kernel is timed at a few row counts (ROW_BUCKETS: one decoding
sequence, and the batches the scheduler forms), and every matrix's module then picks, per call,
the fastest kernel for the nearest measured row count.

Candidates per stored format:
- bf16: `linear` (F.linear), `mv` (torch.mv; one row only);
- int8 / int4: torch's kernel for the stored format (`int8`, `int4`), our own (`int8-native`,
  `int4-native`: service/runtime/native, where it could be built on this machine), plus
  `linear` and `mv` on a bf16 copy of the matrix, when the copies of every matrix that would
  use them fit in COPY_SHARE of the memory available (host_budget) — a copy costs 2 bytes per
  weight on top of the stored ones. A layout no chosen kernel reads is dropped after the choice;
- fp32: `linear` only. fp32 engines are the exact reference (tests compare them token for
  token, alone and batched): one kernel keeps them batch-invariant.

The choices are cached in the engine repository (`kernel-choices/<engine>-<machine>.json`),
keyed by the machine's identity (CPU model, its instruction-set flags, the compute threads,
torch's version), and by the native kernels' library they were measured with (none where it
did not load), so a restart on the same kind of machine measures nothing; a different machine,
or changed native kernels, measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine_build.embedded import default_cache_dir
from engine_build.events import log_event
from engine_build.model import Linear
from service.runtime import native
from service.runtime.memory import host_budget
from service.runtime.quantized import Int4Linear, Int8Linear

ROW_BUCKETS = (1, 4, 16, 64)
COPY_SHARE = 0.25  # of the memory available: at most this for bf16 copies of quantized matrices
REPEATS = 20
CHOICES_VERSION = 2
Kernel = Callable[[Tensor], Tensor]
QUANTIZED = ("int8", "int4")
# The native kernel (torch.ops.nemotron.<op>) per stored format. Kernels that round the
# activations to int8 first (llama.cpp's Q8 blocks) were measured ~25% faster at one row and
# left out: they cost int4 +2.07% perplexity against fp32 (allowance 2%), int8 +0.50% (0.5%).
NATIVE_OPS = {"int4": "int4_matmul", "int8": "int8_matmul"}


def machine_identity(threads: int) -> dict[str, str]:
    """What a measurement depends on: CPU model and ISA flags, threads, torch."""
    model, flags = native.cpu_model_and_flags()
    return {
        "cpu": model,
        "flags_sha256": hashlib.sha256(flags.encode()).hexdigest()[:16],
        "threads": str(threads),
        "torch": torch.__version__,
        "version": str(CHOICES_VERSION),
    }


@dataclass
class Matrix:
    """One weight matrix as loaded, with what the kernels need."""

    fmt: str  # bf16 | fp32 | int8 | int4
    out_features: int
    in_features: int
    module: nn.Module

    @property
    def signature(self) -> str:
        """Format and shape: matrices alike in these share a measurement."""
        return f"{self.fmt}:{self.out_features}x{self.in_features}"

    def dense(self) -> Tensor:
        """The matrix in bf16 (for int8/int4: a copy dequantized from the stored values)."""
        if isinstance(self.module, Linear):
            return self.module.weight
        return self.module.dequantized(torch.bfloat16)


def matrices(model: nn.Module) -> dict[str, Matrix]:
    """Every weight matrix of `model` by module path (CPU, bf16/fp32/int8/int4)."""
    found: dict[str, Matrix] = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            fmt = "fp32" if module.weight.dtype == torch.float32 else "bf16"
            found[name] = Matrix(fmt, module.out_features, module.in_features, module)
        elif isinstance(module, (Int8Linear, Int4Linear)):
            fmt = "int8" if isinstance(module, Int8Linear) else "int4"
            found[name] = Matrix(fmt, module.out_features, module.in_features, module)
    return found


def kernels_for(
    matrix: Matrix, dense: Tensor | None, operands: tuple[Tensor, ...] | None = None
) -> dict[str, Kernel]:
    """The candidate kernels of one matrix (`dense`: its bf16 copy where one may be held;
    `operands`: its tensors in the native kernels' layout, where those are loaded)."""
    candidates: dict[str, Kernel] = {}
    if matrix.fmt in QUANTIZED:
        candidates[matrix.fmt] = matrix.module.forward
        if operands is not None:
            op = NATIVE_OPS[matrix.fmt]
            candidates[f"{matrix.fmt}-native"] = native_kernel(matrix, op, operands)
    else:
        dense = matrix.module.weight
    if dense is not None:
        weight = dense
        candidates["linear"] = lambda x: F.linear(x, weight)
        if matrix.fmt != "fp32":
            candidates["mv"] = lambda x: torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], -1)
    return candidates


def native_kernel(matrix: Matrix, op: str, operands: tuple[Tensor, ...]) -> Kernel:
    """x [..., in] -> [..., out] through `torch.ops.nemotron.<op>`."""
    call = getattr(torch.ops.nemotron, op)
    width, height = matrix.in_features, matrix.out_features
    return lambda x: call(x.reshape(-1, width).contiguous(), *operands).reshape(
        *x.shape[:-1], height
    )


def native_operands(matrix: Matrix) -> tuple[Tensor, ...] | None:
    """The matrix's tensors for its native kernel, when the native kernels are loaded."""
    if matrix.fmt not in QUANTIZED or not native.available():
        return None
    return matrix.module.native_operands()


def time_kernels(
    candidates: dict[str, Kernel], rows: int, in_features: int, dtype: torch.dtype
) -> dict[str, float]:
    """Best seconds of one call of each candidate on `rows` random rows."""
    x = torch.randn(rows, in_features).to(dtype)
    with torch.inference_mode():
        return best_seconds({name: partial(kernel, x) for name, kernel in candidates.items()})


def best_seconds(
    calls: dict[str, Callable[[], object]], repeats: int = REPEATS, warmups: int = 2
) -> dict[str, float]:
    """Best seconds of one call of each of `calls`.

    The calls take turns, one by one, and each keeps its fastest: a burst of other work on the
    machine then slows every candidate alike instead of the one it happened to hit.
    """
    best = dict.fromkeys(calls, float("inf"))
    for call in calls.values():
        for _ in range(warmups):
            call()
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def measure(found: dict[str, Matrix], allow_copies: bool) -> dict[str, dict[str, str]]:
    """{signature: {rows: fastest kernel}} for every distinct signature."""
    choices: dict[str, dict[str, str]] = {}
    for matrix in {m.signature: m for m in found.values()}.values():
        dtype = torch.float32 if matrix.fmt == "fp32" else torch.bfloat16
        copy = matrix.dense() if allow_copies and matrix.fmt in QUANTIZED else None
        candidates = kernels_for(matrix, copy, native_operands(matrix))
        table: dict[str, str] = {}
        for rows in ROW_BUCKETS:
            usable = {k: v for k, v in candidates.items() if k != "mv" or rows == 1}
            if len(usable) == 1:
                table[str(rows)] = next(iter(usable))
                continue
            timed = time_kernels(usable, rows, matrix.in_features, dtype)
            table[str(rows)] = min(timed, key=timed.__getitem__)
        choices[matrix.signature] = table
    return choices


class ChosenKernels(nn.Module):
    """A matrix's module with the measured kernel per row count."""

    def __init__(self, matrix: Matrix, table: dict[str, str]) -> None:
        super().__init__()
        self.inner = matrix.module
        self.in_features, self.out_features = matrix.in_features, matrix.out_features
        chosen = set(table.values())
        copy = matrix.dense() if chosen & {"linear", "mv"} and matrix.fmt in QUANTIZED else None
        if copy is not None:
            self.register_buffer("dense", copy, persistent=False)
        operands = None
        if f"{matrix.fmt}-native" in chosen:
            operands = matrix.module.native_operands()
            for index, tensor in enumerate(operands):
                self.register_buffer(f"native_{index}", tensor, persistent=False)
        if matrix.fmt in QUANTIZED and matrix.fmt not in chosen:
            matrix.module.drop_kernel_layout()  # its own kernel is never called
        kernels = kernels_for(matrix, copy, operands)
        self.by_bucket = {int(rows): kernels[name] for rows, name in table.items()}

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out] through the kernel measured fastest for this many rows."""
        return self.by_bucket[bucket_of(x.numel() // self.in_features)](x)


def bucket_of(rows: int) -> int:
    """The measured row count standing for `rows`: 1 alone, else the nearest (log scale) > 1.

    No rows (a prefill chunk whose logits nobody samples) is not one row: `torch.mv` cannot
    take it, so it goes to the smallest batched count.
    """
    # Called for every matrix of every step: plain comparisons at the log-scale midpoints
    # between 4, 16 and 64 (8 and 32; a tie goes to the smaller count).
    if rows == 1:
        return 1
    if rows <= 8:
        return 4
    return 16 if rows <= 32 else 64


def choices_file(engine_dir: Path, identity: dict[str, str]) -> Path:
    """Where the choices of this engine on this kind of machine are kept.

    Its repository's `kernel-choices/` where that is writable, else the product's cache
    (`$NEMOTRON_CACHE_DIR/kernel-choices/`: the chart mounts engines read-only and the cache
    writable).
    """
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{engine_dir.name}-{digest}.json"
    beside = engine_dir.parent.parent / "kernel-choices"
    if (beside / name).is_file() or _writable(beside):
        return beside / name
    return default_cache_dir(os.environ) / "kernel-choices" / name


def _writable(directory: Path) -> bool:
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    return existing is not None and os.access(existing, os.W_OK)


def apply_measured_kernels(model: nn.Module, engine_dir: Path, threads: int) -> dict:
    """Measure (or read the cached) kernel choices and install them in `model` (CPU).

    Returns the record: machine identity, choices, whether they were measured now, seconds.
    """
    found = matrices(model)
    if not found or all(m.fmt == "fp32" for m in found.values()):
        return {"choices": {}, "measured": False, "seconds": 0.0}
    identity = machine_identity(threads)
    path = choices_file(Path(engine_dir), identity)
    quantized = [m for m in found.values() if m.fmt in QUANTIZED]
    if quantized:
        native.load()  # built at the first start on this machine kind; candidates if it loads
    copy_bytes = sum(2 * m.out_features * m.in_features for m in quantized)
    allow_copies = bool(quantized) and copy_bytes <= COPY_SHARE * host_budget().available
    started = time.perf_counter()
    signatures = {m.signature for m in found.values() if m.fmt != "fp32"}
    record = _read(path, identity, allow_copies, signatures)
    measured = record is None
    if record is None:
        record = {
            "machine": identity,
            "allow_bf16_copies": allow_copies,
            "native_kernels": native.library_key(),
            "choices": measure(found, allow_copies),
        }
        _write(path, record)
    install(model, found, record["choices"])
    seconds = round(time.perf_counter() - started, 2)
    log_event(
        "kernels_chosen",
        logging.INFO,
        measured=measured,
        seconds=seconds,
        file=str(path),
        choices=record["choices"],
    )
    return {**record, "measured": measured, "seconds": seconds}


def install(model: nn.Module, found: dict[str, Matrix], choices: dict[str, dict[str, str]]) -> None:
    """Wrap every matrix's module in `ChosenKernels` (bf16 copies made where a choice needs one)."""
    for name, matrix in found.items():
        table = choices.get(matrix.signature)
        if table is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, ChosenKernels(matrix, table))


def force_kernels(model: nn.Module, variant: str) -> None:
    """Serve every int8/int4 matrix of `model` through one kernel at every row count: torch's
    for its format ("torch") or the native one ("native"), to measure that kernel's numerics
    (bench/quality.py) where a timed choice would mix them."""
    allowed = ("torch", "native")
    if variant not in allowed:
        raise ValueError(f"kernel variant {variant!r}: expected one of {', '.join(allowed)}")
    if variant != "torch" and not native.load():
        raise RuntimeError("the native kernels could not be built here (see the log)")
    found = {name: m for name, m in matrices(model).items() if m.fmt in QUANTIZED}
    name = "{fmt}" if variant == "torch" else "{fmt}-" + variant
    choices = {
        m.signature: dict.fromkeys(map(str, ROW_BUCKETS), name.format(fmt=m.fmt))
        for m in found.values()
    }
    install(model, found, choices)


def _read(
    path: Path, identity: dict[str, str], allow_copies: bool, signatures: set[str]
) -> dict | None:
    """The cached record if it is for this machine and complete for these matrices."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("machine") != identity:
        return None
    choices = record.get("choices")
    if record.get("allow_bf16_copies") != allow_copies or not isinstance(choices, dict):
        return None
    native_loaded = native.available()
    if record.get("native_kernels") != native.library_key():  # measured with other kernels
        return None
    buckets = {str(rows) for rows in ROW_BUCKETS}
    for signature in signatures:
        table = choices.get(signature)
        fmt = signature.partition(":")[0]
        allowed = {"linear", "mv"}
        if fmt in QUANTIZED:
            allowed |= {fmt, f"{fmt}-native"} if native_loaded else {fmt}
        if not isinstance(table, dict) or set(table) != buckets:
            return None
        if not set(table.values()) <= allowed or any(table[b] == "mv" for b in buckets - {"1"}):
            return None
        if fmt in QUANTIZED and not allow_copies and set(table.values()) & {"linear", "mv"}:
            return None
    return record


def _write(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        temporary.replace(path)
    except OSError as err:  # a read-only repository: measured again at the next start
        log_event("kernel_choices_not_saved", logging.WARNING, file=str(path), error=str(err))
