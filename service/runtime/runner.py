"""Running one scheduled step on one rank: the packed token batch through the model.

A `StepPlan` is plain data (lists of ints), so rank 0 can broadcast it to tensor-parallel
workers, which run the same step on their shard and their own copy of the KV pages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine_build.model import NemotronModel
from service.runtime.compiled import CompiledDecode
from service.runtime.kv_pages import PagedKVStore, PagedStep, Segment
from service.runtime.scheduler import ScheduledStep


@dataclass(frozen=True)
class StepPlan:
    """Everything needed to run one step: tokens, positions, per-sequence layout, rows to sample."""

    token_ids: list[int]
    positions: list[int]
    segments: list[tuple[int, int, int, list[int]]]  # (start, count, context, block ids)
    sample_rows: list[int]  # packed rows whose logits are needed: next tokens, then prompts'
    # (item index, first prompt position, count): the prompt rows after the next-token ones,
    # for requests that asked for prompt log-probabilities
    prompt_spans: list[tuple[int, int, int]] = field(default_factory=list)


def make_plan(step: ScheduledStep) -> StepPlan:
    """The plan of a scheduled step (rank 0)."""
    tokens: list[int] = []
    positions: list[int] = []
    segments, sample_rows, prompt_rows, prompt_spans = [], [], [], []
    for index, (seq, count) in enumerate(step.items):
        start, first = len(tokens), seq.num_computed
        tokens.extend(seq.token_ids[first : first + count])
        positions.extend(range(first, first + count))
        segments.append((start, count, first, list(seq.blocks)))
        if first + count == len(seq.token_ids):  # prefill finished or decoding: sample next
            sample_rows.append(start + count - 1)
        # A row at position p predicts the prompt's token p + 1, while p + 1 is in the prompt.
        scored = min(first + count, seq.num_prompt - 1) - first
        if seq.request.options.prompt_logprobs is not None and scored > 0 and not seq.prompt_scored:
            prompt_rows.extend(range(start, start + scored))
            prompt_spans.append((index, first, scored))
    return StepPlan(tokens, positions, segments, sample_rows + prompt_rows, prompt_spans)


class ModelRunner:
    """One rank's model and KV pages."""

    def __init__(self, model: NemotronModel, store: PagedKVStore) -> None:
        self.model, self.store = model, store
        self.device = model.embed.weight.device
        self.compiled: CompiledDecode | None = None  # set when the decode step is compiled
        avoid_per_shape_attention_plans(self.device)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> Tensor:
        """Logits [len(plan.sample_rows), vocab] (float32)."""
        if self.compiled is not None and is_decode_only(plan):
            compiled_size = self.compiled.size_for(len(plan.segments))
            if compiled_size is not None:
                try:
                    return self.compiled.run(compiled_size, self._decode_rows(plan))
                except Exception as error:  # the eager step below serves it, and every later one
                    self.compiled.drop(compiled_size, error)
        device = self.device
        segments = [
            Segment(start, count, context, self._slots(blocks, context + count))
            for start, count, context, blocks in plan.segments
        ]
        tokens = torch.tensor([plan.token_ids], dtype=torch.long, device=device)
        positions = torch.tensor([plan.positions], dtype=torch.long, device=device)
        attention = PagedStep(self.store, positions, segments)
        select = torch.tensor(plan.sample_rows, dtype=torch.long, device=device)
        return self.model.forward_step(tokens, attention, select).float()

    def _slots(self, blocks: list[int], length: int) -> Tensor:
        """The cache slots of a sequence's positions 0..length-1, through its block table."""
        size = self.store.block_size
        positions = torch.arange(length, device=self.device)
        table = torch.tensor(blocks, dtype=torch.long, device=self.device)
        return table[positions // size] * size + positions % size

    def _decode_rows(self, plan: StepPlan) -> list[tuple[int, Tensor]]:
        """(token, slots of positions 0..context) per sequence of a decode-only plan."""
        return [
            (token, self._slots(blocks, context + 1))
            for token, (_, _, context, blocks) in zip(plan.token_ids, plan.segments, strict=True)
        ]


def is_decode_only(plan: StepPlan) -> bool:
    """Every sequence adds one token and only those rows are sampled, in order."""
    return all(count == 1 for _, count, _, _ in plan.segments) and plan.sample_rows == list(
        range(len(plan.segments))
    )


def avoid_per_shape_attention_plans(device: torch.device) -> None:
    """On CUDA, keep `scaled_dot_product_attention` off its cuDNN backend (process-wide).

    With an additive mask, PyTorch picks cuDNN's attention on Hopper, and cuDNN builds an
    execution plan for every new key length. A decode step attends one more position each time,
    so nearly every step met a new length: measured on an H200 (torch 2.11, cu130) with a
    49B layer slice, 46 ms per batch-1 step at new lengths against 5 ms once the lengths had been
    seen, and 5.9 ms with cuDNN's backend off (docs/benchmarks.md, the GPU check). The
    memory-efficient and flash kernels take any length without planning.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class LocalExecutor:
    """tp = 1: the runner in this process."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def execute(self, plan: StepPlan) -> Tensor:
        """Run the step here."""
        return self.runner.execute(plan)

    def shutdown(self) -> None:
        """Nothing to release beyond the tensors themselves."""

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """A local executor has no workers to lose."""
