"""The engine core: the scheduler, the model steps and output processing, run by one thread.

Built whole once the model is loaded and the KV cache sized (nothing in it waits to be set).
Each `step` schedules a batch, runs it on the executor (every tensor-parallel rank), samples
the next tokens in one batch and hands them to output processing. Requests enter with `add`
and leave through `finish`, which frees their KV blocks at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from engine_build.graph import ModelGraph
from service.runtime.block_pool import BlockPool
from service.runtime.compiled import CompiledDecode
from service.runtime.interface import EngineState, EngineStats, FinishReason, TokenEvent
from service.runtime.kv_manager import KVCacheManager
from service.runtime.output import OutputProcessor, RequestState
from service.runtime.runner import StepPlan, make_plan
from service.runtime.sampler import SampleInput, prompt_logprobs, sample_batch
from service.runtime.scheduler import ScheduledStep, Scheduler
from service.runtime.sequence import SeqStatus

_LOG = logging.getLogger("nemotron.runtime")


class StepExecutor(Protocol):
    """Runs step plans on every rank of the model; rank 0's logits come back."""

    def execute(self, plan: StepPlan) -> Tensor:
        """Logits [len(plan.sample_rows), vocab]."""
        ...

    def shutdown(self) -> None:
        """Release workers and memory."""
        ...

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Have `callback(message)` called when a part of the executor dies on its own."""
        ...


@dataclass(frozen=True)
class RuntimeConfig:
    """Limits of one runtime, normally taken from the engine's profile."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    num_blocks: int
    block_size: int = 16
    max_waiting: int = 1024


@dataclass(frozen=True)
class Booted:
    """What booting produces inside the engine thread: the executor and the sized limits."""

    executor: StepExecutor
    config: RuntimeConfig
    kv_element_bytes: int
    compiled: CompiledDecode | None = None  # the decode step compiling in the background


class EngineCore:
    """Scheduler + executor + output processing; every method runs on the engine thread."""

    def __init__(self, booted: Booted, graph: ModelGraph, output: OutputProcessor) -> None:
        config = booted.config
        self.executor, self.config, self.output = booted.executor, config, output
        self.scheduler = Scheduler(
            KVCacheManager(BlockPool(config.num_blocks, config.block_size)),
            config.max_batch_size,
            config.max_num_tokens,
        )
        self.kv_bytes_per_token = graph.kv_bytes_per_token(booted.kv_element_bytes)
        self.uniform_kv_bytes_per_token = graph.uniform_kv_bytes_per_token(booted.kv_element_bytes)
        self.requests: dict[str, RequestState] = {}
        self.rng = torch.Generator()
        self.rng.seed()  # unseeded requests differ from run to run
        self.steps = self.tokens_processed = self.generated_tokens = 0

    @property
    def has_work(self) -> bool:
        """Whether any request is running or waiting."""
        return bool(self.scheduler.running or self.scheduler.waiting)

    def add(self, state: RequestState) -> None:
        """Queue a request."""
        self.requests[state.request_id] = state
        self.scheduler.add(state.seq)

    def expire(self, aborted: set[str], now: float) -> None:
        """End the aborted requests and those past their deadline."""
        for state in list(self.requests.values()):
            deadline = state.seq.request.options.deadline
            if state.request_id in aborted:
                self.finish(state, FinishReason.ABORTED)
            elif deadline is not None and now > deadline:
                self.finish(state, FinishReason.DEADLINE)

    def step(self) -> None:
        """Schedule and run one batch, then sample and process the outputs."""
        step = self.scheduler.schedule()
        if not step.items:
            time.sleep(0.001)
            return
        now = time.monotonic()
        for seq, _ in step.items:
            state = self.requests[seq.request.request_id]
            state.scheduled_at = state.scheduled_at or now
        plan = make_plan(step)
        logits = self.executor.execute(plan)
        self.steps += 1
        self.tokens_processed += step.num_tokens
        ready = []  # the requests whose next token is due, in the order of the logits rows
        for seq, count in step.items:
            self.scheduler.computed(seq, count)
            if seq.num_computed == len(seq.token_ids):
                ready.append(self.requests[seq.request.request_id])
        if plan.prompt_spans:
            self._score_prompts(step, plan, logits[len(ready) :])
        self._sample(ready, logits[: len(ready)])

    def _score_prompts(self, step: ScheduledStep, plan: StepPlan, logits: Tensor) -> None:
        """Log-probabilities of prompt tokens; the whole prompt's go out in one event."""
        row = 0
        for index, first, count in plan.prompt_spans:
            seq = step.items[index][0]
            state = self.requests[seq.request.request_id]
            rows, row = logits[row : row + count], row + count
            targets = seq.token_ids[first + 1 : first + 1 + count]
            top = seq.request.options.prompt_logprobs or 0
            done = len(state.prompt_logprobs)  # a preempted prompt is computed again
            for offset, scored in enumerate(prompt_logprobs(rows, targets, top)):
                if first + offset >= done:
                    state.prompt_logprobs.append(scored)
            if len(state.prompt_logprobs) == seq.num_prompt - 1 and not seq.prompt_scored:
                seq.prompt_scored = True
                state.push(
                    TokenEvent(
                        state.request_id, (), "", prompt_logprobs=tuple(state.prompt_logprobs)
                    )
                )

    def _sample(self, ready: list[RequestState], logits: Tensor) -> None:
        """Sample every ready row at once; first tokens are pushed (delivered) first."""
        inputs = [
            SampleInput(
                s.seq.request.options.sampling,
                s.seq.request.prompt_ids,
                s.seq.token_ids[s.seq.num_prompt :],
                s.seq.request.options.logprobs,
            )
            for s in ready
        ]

        def failed(index: int, error: Exception) -> None:
            self._fail_request(ready[index], error)

        # Sampling state (generators, token counts) lives on the CPU.
        sampled = sample_batch(logits.float().cpu(), inputs, self.rng, on_error=failed)
        first_tokens_first = sorted(range(len(ready)), key=lambda i: ready[i].seq.num_generated > 0)
        for index in first_tokens_first:  # time to first token is what waits
            state, chosen = ready[index], sampled[index]
            if chosen is None:
                continue
            self.generated_tokens += 1
            try:
                reason, flush = self.output.append(state, chosen.token, chosen.logprob)
            except Exception as err:
                self._fail_request(state, err)
                continue
            if reason is not None:
                self.finish(state, reason, flush=flush)

    def _fail_request(self, state: RequestState, error: Exception) -> None:
        """One request failed (a bug): it ends with an error, the batch goes on."""
        _LOG.error(
            "request_failed", exc_info=error, extra={"fields": {"request": state.request_id}}
        )
        if state.seq.status is not SeqStatus.FINISHED:
            self.finish(state, FinishReason.ERROR, error=f"sampling failed: {error}")

    def finish(
        self,
        state: RequestState,
        reason: FinishReason,
        error: str | None = None,
        flush: bool = True,
    ) -> None:
        """End a request: free its blocks, forget it, push its last event."""
        self.scheduler.finish(state.seq, reason)
        self.requests.pop(state.request_id, None)
        state.push(self.output.finish_event(state, reason, error, flush))

    def finish_all(self, reason: FinishReason, error: str | None) -> None:
        """End every request (the engine is stopping or failed)."""
        for state in list(self.requests.values()):
            self.finish(state, reason, error=error)

    def stats(self, state: EngineState, submitted: int) -> EngineStats:
        """A snapshot; `submitted`: requests posted to the engine thread, not yet taken."""
        pool = self.scheduler.kv.pool
        kv = self.scheduler.kv
        return EngineStats(
            state=state,
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + submitted,
            kv_blocks_total=pool.num_blocks,
            kv_blocks_used=pool.num_used,
            kv_blocks_free=pool.num_free,
            kv_block_size=pool.block_size,
            kv_bytes_per_token=self.kv_bytes_per_token,
            uniform_kv_bytes_per_token=self.uniform_kv_bytes_per_token,
            tokens_processed=self.tokens_processed,
            generated_tokens=self.generated_tokens,
            preemptions=self.scheduler.preemptions,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            steps=self.steps,
        )
