"""Quality of the embedded model's engines against the fp32 engine (the GGUF's exact values).

    python -m bench.quality [--precisions fp32 bf16 int8 int4] [--tokens 2048] [--new-tokens 32]
        [--kernels torch native]

For each engine of the cpu profile: the perplexity of a fixed local text
(tests/data/perplexity_text.txt: prose paragraphs of this repository's docs, frozen), and the
greedy tokens of the 16 prompts the GPU check uses (10 text prompts, 6 chat prompts), compared
with the fp32 engine's as the tokens before the first divergence. fp32 is the reference because
the embedded model's import dequantizes the GGUF exactly into fp32. The int8 and int4 engines'
perplexity is also given with every matrix through one kernel (`--kernels`: torch's, our native
one): the runtime picks among them by speed per row count (service/runtime/kernels.py), so each
must hold the quality on its own. Greedy
tokens come from the runtime, with whatever kernels it chose on this machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.gpu_check import agreement, chat_and_text_prompts, greedy_tokens

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "perplexity_text.txt"
PRECISIONS = ("fp32", "bf16", "int8", "int4")


def perplexity(engine_dir: Path, tokens: int, kernel: str | None = None) -> tuple[float, int]:
    """exp(mean next-token cross-entropy) of the text's first `tokens` tokens, in one forward;
    `kernel` (torch, native): every int8/int4 matrix through that kernel (None: as loaded,
    torch's)."""
    from service.runtime.kernels import force_kernels
    from service.runtime.loader import load_rank_model
    from service.runtime.tokenizer import TextTokenizer

    ids = TextTokenizer(engine_dir).encode(TEXT.read_text())[:tokens]
    model = load_rank_model(engine_dir)
    if kernel is not None:
        force_kernels(model, kernel)
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).float()[0]
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(float(loss)), len(ids)


def measure(
    precisions: Sequence[str],
    tokens: int,
    new_tokens: int,
    threads: int | None = None,
    kernels: Sequence[str] = (),
) -> dict:
    """Perplexity and greedy agreement per precision (the first must be the reference); for
    int8/int4, the perplexity again through each of `kernels` ("<precision> <kernel>")."""
    from engine_build.embedded import default_cache_dir
    from service.startup.selection import ensure_cpu_engine

    cache = default_cache_dir(os.environ)
    results: dict = {}
    reference: list[list[int]] | None = None
    for precision in precisions:
        engine = ensure_cpu_engine(cache, precision=precision)
        started = time.perf_counter()
        ppl, counted = perplexity(engine, tokens)
        answers = greedy_tokens(
            engine, "cpu", chat_and_text_prompts(engine), threads, new_tokens=new_tokens
        )
        reference = reference or answers
        results[precision] = {
            "perplexity": round(ppl, 4),
            "text_tokens": counted,
            "greedy_vs_reference": agreement(reference, answers),
            "seconds": round(time.perf_counter() - started, 1),
        }
        for kernel in kernels if precision in ("int8", "int4") else ():
            started = time.perf_counter()
            ppl, counted = perplexity(engine, tokens, kernel)
            results[f"{precision} {kernel}"] = {
                "perplexity": round(ppl, 4),
                "text_tokens": counted,
                "seconds": round(time.perf_counter() - started, 1),
            }
    base = results[precisions[0]]["perplexity"]
    for entry in results.values():
        entry["perplexity_change"] = round(entry["perplexity"] / base - 1, 5)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Print a markdown table and the JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--tokens", type=int, default=2048, help="text tokens scored")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument(
        "--kernels",
        nargs="*",
        default=["torch", "native"],
        choices=["torch", "native"],
        help="int8/int4: the perplexity again with every matrix through each of these kernels",
    )
    args = parser.parse_args(argv)
    results = measure(args.precisions, args.tokens, args.new_tokens, kernels=args.kernels)
    reference = args.precisions[0]
    print(f"| engine | perplexity | vs {reference} | greedy prompts identical | tokens agreeing |")
    print("|---|---|---|---|---|")
    for precision, entry in results.items():
        greedy = entry.get("greedy_vs_reference")
        cells = ["-", "-"]
        if greedy is not None:
            cells = [f"{greedy['identical_prompts']}/{greedy['prompts']}", f"{greedy['rate']:.1%}"]
        print(
            f"| {precision} | {entry['perplexity']:.4f} | {entry['perplexity_change']:+.2%} | "
            + " | ".join(cells)
            + " |"
        )
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
