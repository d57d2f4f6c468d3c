"""Every candidate kernel of the int4 engine's decode step, side by side on this machine.

    python -m bench.native_kernels [--threads 2] [--repeats 30]

For each distinct weight matrix of the embedded model's int4 engine (the int8 lm_head included),
the candidates that service/runtime/kernels.py chooses among (torch's `int4`/`int8`, our
`*-native`, F.linear on a bf16 copy) at 1, 4 and 16 rows; then the decode step's
attention, `decode_attention` against SDPA over gathered slots, at a few batch sizes and context
lengths with the model's heads, reading slots scattered over a store of STORE_SLOTS. Best time of
`--repeats` calls in turns (kernels.best_seconds), and for one row the bytes the stored format
reads per second. Numbers are the machine's: the runtime measures its own at first load.
"""

from __future__ import annotations

import argparse
import os
from functools import partial

import torch

from bench.compare_hf import machine
from engine_build.embedded import default_cache_dir
from service.runtime import native
from service.runtime.compiled import gathered_attention
from service.runtime.kernels import best_seconds, kernels_for, matrices, native_operands
from service.runtime.loader import load_rank_model
from service.startup.selection import ensure_cpu_engine

ROWS = (1, 4, 16)
ATTENTION = ((1, 100), (1, 512), (16, 100), (16, 512), (32, 100))
STORE_SLOTS = 20_000


def stored_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes one product reads of a matrix in the native layout (fp32 scales/minimums)."""
    weights = out_features * in_features
    if fmt == "int4":
        return weights // 2 + 8 * weights // 32
    return weights + 4 * out_features


def main(argv: list[str] | None = None) -> None:
    """Print both tables (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native.load():
        raise SystemExit("the native kernels could not be built here (see the log)")
    print(machine(), f"threads {args.threads}")
    engine = ensure_cpu_engine(default_cache_dir(os.environ), precision="int4")
    model = load_rank_model(engine)
    print("\n| matrix | rows | best of each candidate, us | one row: fastest, stored bytes read |")
    print("|---|---|---|---|")
    for matrix in {m.signature: m for m in matrices(model).values()}.values():
        candidates = kernels_for(matrix, matrix.dense(), native_operands(matrix))
        for rows in ROWS:
            x = torch.randn(rows, matrix.in_features).to(torch.bfloat16)
            usable = {k: v for k, v in candidates.items() if k != "mv" or rows == 1}
            with torch.inference_mode():
                best = best_seconds({k: partial(f, x) for k, f in usable.items()}, args.repeats)
            timed = ", ".join(f"{name} {seconds * 1e6:.0f}" for name, seconds in best.items())
            rate = ""
            if rows == 1:
                size = stored_bytes(matrix.fmt, matrix.out_features, matrix.in_features)
                fastest = min(best, key=best.__getitem__)
                rate = f"{fastest}: {size / best[fastest] / 1e9:.1f} GB/s"
            print(f"| {matrix.signature} | {rows} | {timed} | {rate} |")
    graph = model.graph
    kv_heads, dim = graph.kv_heads_per_layer[graph.attention_layers[0]], graph.head_dim
    keys = torch.randn(STORE_SLOTS, kv_heads, dim).to(torch.bfloat16)
    values = torch.randn(STORE_SLOTS, kv_heads, dim).to(torch.bfloat16)
    print("\n| batch | context | decode_attention us | SDPA over gathered slots us |")
    print("|---|---|---|---|")
    for batch, length in ATTENTION:
        q = torch.randn(batch, graph.num_attention_heads, dim).to(torch.bfloat16)
        read = torch.randint(0, STORE_SLOTS, (batch, length))
        lengths = torch.full((batch,), length)
        bias = torch.zeros(batch, 1, 1, length, dtype=torch.bfloat16)
        op = torch.ops.nemotron.decode_attention
        with torch.inference_mode():
            best = best_seconds(
                {
                    "native": partial(op, q, keys, values, read, lengths, dim**-0.5),
                    "sdpa": partial(gathered_attention, q, keys, values, read, bias),
                },
                args.repeats,
            )
        print(f"| {batch} | {length} | {best['native'] * 1e6:.0f} | {best['sdpa'] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
