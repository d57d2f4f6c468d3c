"""Sampling, the one implementation: penalties, temperature, top-k/p, min-p, seeds, log-probs.

A seeded request draws from a generator seeded by (seed, index of the token it is choosing),
so its tokens do not depend on what else is in the batch, nor on preemption.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from service.runtime.interface import TokenLogprob
from service.runtime.options import SamplingParams


@dataclass(frozen=True)
class SampleInput:
    """One row to sample: its parameters, the token history penalties look at, its position."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    logprobs: int | None = None


class Sampled(NamedTuple):
    """The token chosen for one row, and its log-probabilities when the request asked."""

    token: int
    logprob: TokenLogprob | None


def raw_logprobs(logits: Tensor, rows: Sequence[SampleInput]) -> Tensor | None:
    """Log-softmax of the model's raw logits, when any row asked for log-probabilities.

    Reported log-probabilities describe the model's own distribution, before penalties,
    temperature and filters (as vLLM reports them by default).
    """
    if any(r.logprobs is not None for r in rows):
        return torch.log_softmax(logits.float(), dim=-1)
    return None


def sample_batch(
    logits: Tensor,
    rows: Sequence[SampleInput],
    rng: torch.Generator,
    on_error: Callable[[int, Exception], None] | None = None,
) -> list[Sampled | None]:
    """Choose one token per row of `logits` [rows, vocab]; `rng` serves unseeded rows.

    With `on_error`, a row that fails is reported to it (with its index) and comes back as
    None, so one request's failure does not take the batch down; without, the error is raised.
    """
    raw = raw_logprobs(logits, rows)
    chosen: list[Sampled | None] = []
    for index, row in enumerate(rows):
        try:
            chosen.append(_sample_row(logits[index], row, rng, None if raw is None else raw[index]))
        except Exception as err:
            if on_error is None:
                raise
            on_error(index, err)
            chosen.append(None)
    return chosen


def _sample_row(
    logits: Tensor, row: SampleInput, rng: torch.Generator, raw: Tensor | None
) -> Sampled:
    scores = _penalized(logits.float(), row)
    token = int(scores.argmax()) if row.params.greedy else _draw(scores, row, rng)
    logprob = (
        _logprob(raw, token, row.logprobs) if raw is not None and row.logprobs is not None else None
    )
    return Sampled(token, logprob)


def _penalized(scores: Tensor, row: SampleInput) -> Tensor:
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted({*row.prompt_ids, *row.output_ids}), dtype=torch.long)
        values = scores[seen]
        scores = scores.clone()
        scores[seen] = torch.where(
            values > 0, values / p.repetition_penalty, values * p.repetition_penalty
        )
    if (p.frequency_penalty or p.presence_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids), minlength=scores.shape[0]).float()
        scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()
    return scores


def _draw(scores: Tensor, row: SampleInput, rng: torch.Generator) -> int:
    p = row.params
    scores = scores / p.temperature
    if p.top_k:
        kth = torch.topk(scores, p.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if p.min_p:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        total = sorted_probs.sum()
        outside = sorted_probs.cumsum(-1) - sorted_probs > p.top_p * total  # keeps at least one
        probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0.0))
    generator = rng
    if p.seed is not None:
        generator = torch.Generator().manual_seed(_mix(p.seed, len(row.output_ids)))
    return int(torch.multinomial(probs, 1, generator=generator))


def _mix(seed: int, index: int) -> int:
    """A per-token seed: the request's seed combined with the index of the token."""
    return (seed * 6364136223846793005 + index * 1442695040888963407 + 1) % (2**63)


def prompt_logprobs(logits: Tensor, targets: Sequence[int], top: int) -> list[TokenLogprob]:
    """Each target token's log-probability under its row of `logits` [rows, vocab], with the
    `top` alternatives (the model's own distribution: no sampling options apply). Computed
    where the logits are; only [rows, 1 + top] values come back to the host."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [rows, vocab]
    index = torch.tensor(list(targets), device=logprobs.device).unsqueeze(1)
    chosen = logprobs.gather(1, index).squeeze(1).tolist()
    if not top:
        return [TokenLogprob(t, v, ()) for t, v in zip(targets, chosen, strict=True)]
    values, ids = torch.topk(logprobs, top, dim=-1)
    return [
        TokenLogprob(t, v, tuple(zip(i, w, strict=True)))
        for t, v, i, w in zip(targets, chosen, ids.tolist(), values.tolist(), strict=True)
    ]


def _logprob(logprobs: Tensor, token: int, top: int) -> TokenLogprob:
    alternatives = ()
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
