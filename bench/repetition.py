"""Repetition in the embedded model's open-ended answers: greedy against its sampling defaults.

    python -m bench.repetition [--new-tokens 128] [--seed 0]

Each of the 20 open prompts of bench/prompts.py is answered twice through the chat path in
process: greedily (`--sampling-defaults none`) and with the model's defaults (what a request that
sets no sampling field runs with: for the embedded SmolLM2, its card's temperature 0.2 and top-p
0.9), each answer seeded (`--seed` plus the prompt's index). Reported per mode: the distinct
4-gram ratio of the answers' tokens (distinct 4-grams over all 4-grams, per answer, then the
mean; 1.0 means no 4-gram repeats) and the answers' mean length.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

from bench.compare_hf import machine
from bench.prompts import OPEN_PROMPTS
from engine_build.embedded import default_cache_dir
from service.chat.formats import family_of, load_families
from service.chat.sampling import model_defaults
from service.chat.turns import ChatContext, ChatTurn, run_chat_turn
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import open_runtime
from service.runtime.options import RequestOptions
from service.runtime.tokenizer import ChatMessage
from service.startup.selection import ensure_cpu_engine


def distinct_ngram_ratio(tokens: list[int], n: int = 4) -> float:
    """Distinct n-grams over all n-grams of one answer (1.0 for an answer shorter than n)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


async def answer(context: ChatContext, prompt: str, options: RequestOptions, rid: str) -> list[int]:
    """The token ids of one chat answer (its text, encoded again)."""
    messages = (ChatMessage(role="user", content=prompt),)
    text = []
    async for delta in run_chat_turn(context, ChatTurn(rid, messages, options=options)):
        text.append(delta.reasoning + delta.content)
    return context.tokenizer.encode("".join(text))


def main() -> None:
    """Answer every prompt in both modes and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reserve_cores_for_compute_threads()
    cache = default_cache_dir(os.environ)
    engine_dir = run_in_compute_thread(lambda: ensure_cpu_engine(cache))
    runtime = open_runtime(engine_dir)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(runtime.start())
    family = family_of(runtime.tokenizer.chat_template_source, load_families())
    rows = {}
    for mode in ("none", "model"):
        defaults = model_defaults(mode, family.sampling_on, family.sampling_off, engine_dir)
        context = ChatContext(runtime, family, defaults)
        ratios, lengths = [], []
        for index, prompt in enumerate(OPEN_PROMPTS):
            options = RequestOptions.asked(  # everything but the seed from the defaults
                {"seed": args.seed + index}, max_new_tokens=args.new_tokens
            )
            tokens = loop.run_until_complete(answer(context, prompt, options, f"{mode}-{index}"))
            ratios.append(distinct_ngram_ratio(tokens))
            lengths.append(len(tokens))
        values = defaults.values(None)
        rows[mode] = (values, statistics.mean(ratios), statistics.mean(lengths))
    loop.run_until_complete(runtime.shutdown())
    print(f"machine: {machine()}")
    print(
        f"engine: {engine_dir.name}; {len(OPEN_PROMPTS)} prompts, up to {args.new_tokens} tokens,"
    )
    print(f"seeds {args.seed}..{args.seed + len(OPEN_PROMPTS) - 1}\n")
    print("| --sampling-defaults | sampling that ran | distinct 4-gram ratio | mean tokens |")
    print("|---|---|---|---|")
    for mode, (values, ratio, length) in rows.items():
        ran = ", ".join(f"{k} {v}" for k, v in values.items()) or "greedy"
        print(f"| {mode} | {ran} | {ratio:.3f} | {length:.0f} |")


if __name__ == "__main__":
    main()
