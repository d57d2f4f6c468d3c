"""The PyTorch backend: continuous batching over a paged KV cache, driven by one step thread.

Requests arrive from asyncio (`generate`), wait in the scheduler's bounded queue, join the
running batch between steps and stream their tokens back through per-request asyncio queues.
Aborts and deadlines take effect at the next step and free KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import Tensor

from engine_build.graph import ModelGraph
from service.runtime.compute import reserve_cores_for_compute_threads
from service.runtime.interface import (
    EngineError,
    EngineState,
    EngineStats,
    FinishReason,
    GenerationRequest,
    NotReadyError,
    OverloadedError,
    RequestError,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from service.runtime.kv_pages import BlockPool
from service.runtime.runner import ModelRunner, StepPlan, make_plan
from service.runtime.sampler import SampleInput, raw_logprobs, sample_row
from service.runtime.scheduler import Scheduler, SeqStatus, Sequence
from service.runtime.text import StopTextStream
from service.runtime.tokenizer import TextTokenizer
from service.runtime.validation import RequestLimits, validate_request

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


@dataclass(eq=False)
class _Live:
    """The per-request state the step thread keeps beside the scheduler's Sequence."""

    seq: Sequence
    push: Callable[[TokenEvent], None]
    text: StopTextStream
    stop_ids: frozenset[int]
    scheduled_at: float | None = None
    first_token_at: float | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class KVFootprint:
    """KV bytes per token of a graph, and what a model with attention in every layer would need."""

    @staticmethod
    def per_token(graph: ModelGraph, element_bytes: int) -> tuple[int, int]:
        """(actual, uniform) bytes per token across all layers."""
        actual = sum(2 * kv * graph.head_dim * element_bytes for kv in graph.kv_heads_per_layer)
        widest = max(graph.kv_heads_per_layer, default=0)
        uniform = graph.num_layers * 2 * widest * graph.head_dim * element_bytes
        return actual, uniform


@dataclass(frozen=True)
class Booted:
    """What booting produces inside the engine thread: the executor and the sized limits."""

    executor: StepExecutor
    config: RuntimeConfig
    kv_element_bytes: int


class TorchRuntime:
    """The `Engine` of the PyTorch backend.

    All tensor work (loading, warm-up, every step) runs in one engine thread, which owns the
    compute threads; `start()` keeps the main thread at one (see `service.runtime.compute`).
    """

    def __init__(
        self,
        boot: Callable[[], Booted],
        tokenizer: TextTokenizer,
        graph: ModelGraph,
        eos_ids: frozenset[int],
        threads: int | None = None,
    ) -> None:
        self.tokenizer, self.graph, self.eos_ids = tokenizer, graph, eos_ids
        self._boot, self.threads = boot, threads or os.cpu_count() or 1
        self.executor: StepExecutor | None = None
        self.config: RuntimeConfig | None = None
        self.scheduler: Scheduler | None = None
        self.limits: RequestLimits | None = None
        self._footprint = (0, 0)
        self._booted = threading.Event()
        self._boot_error: BaseException | None = None
        self._state = EngineState.STARTING
        self._failure: str | None = None
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._inbox: list[_Live] = []  # submitted, not yet seen by the engine thread
        self._known: dict[str, _Live] = {}  # every unfinished request by id (under _lock)
        self._aborts: set[_Live] = set()
        self._closed = False  # no more submissions (shutting down or failed)
        self._live: dict[str, _Live] = {}  # engine thread only
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._rng = torch.Generator()
        self._rng.seed()  # unseeded requests differ from run to run
        self._counters = {"tokens_processed": 0, "generated_tokens": 0, "steps": 0}

    @property
    def state(self) -> EngineState:
        """Readiness."""
        return self._state

    async def start(self) -> None:
        """Boot in the engine thread (load, size the KV cache), warm up, then serve."""
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            reserve_cores_for_compute_threads()
        self._thread = threading.Thread(target=self._main, name="nemotron-engine", daemon=True)
        self._thread.start()
        await self._loop.run_in_executor(None, self._booted.wait)
        if self._boot_error is not None:
            self._state = EngineState.FAILED
            self._failure = f"engine failed to load: {self._boot_error}"
            raise self._boot_error
        warmup = GenerationRequest("warmup", (0,) * 8, max_new_tokens=1)
        self._state = EngineState.READY  # admit the warm-up request
        try:
            async for _ in self._submit(warmup):
                pass
        except Exception:
            self._state = EngineState.FAILED
            raise
        _LOG.info("engine_ready", extra={"fields": {"blocks": self.config.num_blocks}})

    def _install(self, booted: Booted) -> None:
        config = booted.config
        self.executor, self.config = booted.executor, config
        booted.executor.on_failure(self.fail)
        self.scheduler = Scheduler(
            BlockPool(config.num_blocks, config.block_size),
            config.max_batch_size,
            config.max_num_tokens,
        )
        self.limits = RequestLimits(
            self.graph.vocab_size, config.max_seq_len, config.num_blocks * config.block_size
        )
        self._footprint = KVFootprint.per_token(self.graph, booted.kv_element_bytes)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Validate and submit; stream events. Raises RequestError/OverloadedError/NotReadyError."""
        if self._state is not EngineState.READY:
            raise NotReadyError(self._failure or f"engine is {self._state.value}")
        validate_request(request, self.limits)
        return self._submit(request)

    def _submit(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        loop = self._loop

        def push(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        stop_ids = frozenset(request.stop_token_ids) | (
            frozenset() if request.ignore_eos else self.eos_ids
        )
        text = StopTextStream(self.tokenizer, request.stop_strings)
        live = _Live(Sequence(request, time.monotonic()), push, text, stop_ids)
        with self._lock:
            if self._closed:
                raise NotReadyError(self._failure or "engine is shutting down")
            if request.request_id in self._known:
                raise RequestError(f"request_id {request.request_id!r} is already in use")
            waiting = len(self._inbox) + len(self.scheduler.waiting)
            if waiting >= self.config.max_waiting:
                raise OverloadedError(
                    f"{waiting} requests are waiting (limit {self.config.max_waiting}); retry later"
                )
            self._inbox.append(live)
            self._known[request.request_id] = live
        self._wakeup.set()
        return EventStream(queue, lambda: self._abandon(live))

    def _abandon(self, live: _Live) -> None:
        """The consumer of `live`'s stream went away: stop generating for it."""
        with self._lock:
            if self._known.get(live.seq.request.request_id) is live:
                self._aborts.add(live)
        self._wakeup.set()

    def abort(self, request_id: str) -> bool:
        """Stop a request at the next step; False when it is not known."""
        with self._lock:
            live = self._known.get(request_id)
            if live is not None:
                self._aborts.add(live)
        self._wakeup.set()
        return live is not None

    def stats(self) -> EngineStats:
        """A snapshot (read without stopping the step thread)."""
        scheduler = self.scheduler or Scheduler(BlockPool(0, 1), 1, 1)
        pool = scheduler.pool
        actual, uniform = self._footprint
        return EngineStats(
            state=self._state,
            running=len(scheduler.running),
            waiting=len(scheduler.waiting) + len(self._inbox),
            kv_blocks_total=pool.num_blocks,
            kv_blocks_used=pool.num_used,
            kv_blocks_free=pool.num_free,
            kv_block_size=pool.block_size,
            kv_bytes_per_token=actual,
            uniform_kv_bytes_per_token=uniform,
            tokens_processed=self._counters["tokens_processed"],
            generated_tokens=self._counters["generated_tokens"],
            preemptions=scheduler.preemptions,
            prefix_cache_queries=scheduler.prefix_queries,
            prefix_cache_hits=scheduler.prefix_hits,
            steps=self._counters["steps"],
        )

    async def shutdown(self) -> None:
        """Refuse new requests, abort the pending ones, stop the engine thread and executor."""
        with self._lock:
            self._closed = True
        self._stopping = True
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._state is not EngineState.FAILED:
            self._state = EngineState.STOPPED
        if self.executor is not None:
            self.executor.shutdown()

    # --- the step thread -------------------------------------------------------------------

    def _main(self) -> None:
        try:
            torch.set_num_threads(self.threads)
            self._install(self._boot())
        except BaseException as err:  # reported by start()
            self._boot_error = err
            return
        finally:
            self._booted.set()
        self._run()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._admit_and_abort()
                if not self.scheduler.running and not self.scheduler.waiting:
                    self._wakeup.wait(0.05)
                    self._wakeup.clear()
                    continue
                self._step()
        except Exception as err:  # the engine is broken: fail everything, report not ready
            described = str(err) if isinstance(err, EngineError) else f"{type(err).__name__}: {err}"
            self.fail(self._failure or f"engine step failed: {described}")
            _LOG.exception("engine_failed")
        finally:
            reason = (
                FinishReason.ERROR if self._state is EngineState.FAILED else FinishReason.ABORTED
            )
            with self._lock:
                self._closed = True  # nothing can be submitted after this last drain
            self._admit_and_abort()
            for live in list(self._live.values()):
                self._finish(live, reason, error=self._failure)

    def fail(self, message: str) -> None:
        """Mark the engine FAILED (not ready); pending requests end with `message` as error."""
        _LOG.error("engine_failed", extra={"fields": {"reason": message}})
        self._failure = message
        self._state = EngineState.FAILED
        with self._lock:
            self._closed = True
        self._stopping = True
        self._wakeup.set()

    def _admit_and_abort(self) -> None:
        with self._lock:
            incoming, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for live in incoming:
            self._live[live.seq.request.request_id] = live
            self.scheduler.add(live.seq)
        now = time.monotonic()
        for live in list(self._live.values()):
            deadline = live.seq.request.deadline
            if live in aborts:
                self._finish(live, FinishReason.ABORTED)
            elif deadline is not None and now > deadline:
                self._finish(live, FinishReason.DEADLINE)

    def _step(self) -> None:
        step = self.scheduler.schedule()
        if not step.items:
            time.sleep(0.001)
            return
        now = time.monotonic()
        for seq, _ in step.items:
            live = self._live[seq.request.request_id]
            live.scheduled_at = live.scheduled_at or now
        plan = make_plan(step)
        logits = self.executor.execute(plan)
        self._counters["steps"] += 1
        ready = []
        self._counters["tokens_processed"] += step.num_tokens
        for seq, count in step.items:
            self.scheduler.computed(seq, count)
            if seq.num_computed == len(seq.token_ids):
                ready.append(seq)
        self._sample(ready, logits, plan)

    def _sample(self, ready: list[Sequence], logits: Tensor, plan: StepPlan) -> None:
        logits = logits.float().cpu()  # sampling state (generators, counts) lives on the CPU
        rows = [
            SampleInput(
                s.request.sampling,
                s.request.prompt_ids,
                s.token_ids[s.num_prompt :],
                s.request.logprobs,
            )
            for s in ready
        ]
        raw = raw_logprobs(logits, rows)
        # First tokens are pushed (and so delivered) first: time to first token is what waits.
        order = sorted(range(len(ready)), key=lambda i: ready[i].num_generated > 0)
        for index in order:
            seq, row = ready[index], rows[index]
            live = self._live[seq.request.request_id]
            try:  # one request's failure must not take the batch down with it
                token, logprob = sample_row(
                    logits[index], row, self._rng, None if raw is None else raw[index]
                )
                self._append(live, token, logprob)
            except Exception as err:
                _LOG.exception(
                    "request_failed", extra={"fields": {"request": seq.request.request_id}}
                )
                if live.seq.status is not SeqStatus.FINISHED:
                    self._finish(live, FinishReason.ERROR, error=f"sampling failed: {err}")

    def _append(self, live: _Live, token: int, logprob: TokenLogprob | None) -> None:
        seq = live.seq
        live.first_token_at = live.first_token_at or time.monotonic()
        self._counters["generated_tokens"] += 1
        if token in live.stop_ids:
            self._finish(live, FinishReason.STOP)
            return
        seq.token_ids.append(token)
        if logprob is not None:
            live.logprobs.append(logprob)
        update = live.text.push(token)
        live.push(
            TokenEvent(
                seq.request.request_id,
                (token,),
                update.text,
                (logprob,) if logprob is not None else (),
            )
        )
        if update.stopped:
            self._finish(live, FinishReason.STOP, flush=False)
        elif (
            seq.num_generated >= seq.request.max_new_tokens
            or len(seq.token_ids) >= self.config.max_seq_len
        ):
            self._finish(live, FinishReason.LENGTH)

    def _finish(
        self, live: _Live, reason: FinishReason, error: str | None = None, flush: bool = True
    ) -> None:
        seq = live.seq
        self.scheduler.finish(seq, reason)
        self._live.pop(seq.request.request_id, None)
        with self._lock:
            if self._known.get(seq.request.request_id) is live:
                del self._known[seq.request.request_id]
        tail = ""
        if flush and reason is not FinishReason.ERROR:  # held-back text that no stop matched
            final = live.text.finish()
            tail = final.text
            if final.stopped and reason is FinishReason.LENGTH:
                reason = FinishReason.STOP
        now = time.monotonic()
        started = live.scheduled_at or now
        live.push(
            TokenEvent(
                request_id=seq.request.request_id,
                token_ids=(),
                text=tail,
                finish_reason=reason,
                usage=Usage(seq.num_prompt, seq.num_generated, seq.cached_prompt_tokens),
                timings=Timings(
                    queue_s=started - seq.arrival,
                    time_to_first_token_s=(live.first_token_at or now) - seq.arrival,
                    total_s=now - seq.arrival,
                ),
                error=error,
            )
        )


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


def merge_events(first: TokenEvent, then: TokenEvent) -> TokenEvent:
    """Two consecutive events of a request as one (the finish data is the later one's)."""
    return replace(
        then,
        token_ids=first.token_ids + then.token_ids,
        text=first.text + then.text,
        logprobs=first.logprobs + then.logprobs,
    )


class EventStream:
    """The async iterator `generate` returns: events until the one with a finish reason.

    Events that are already waiting when the consumer asks are merged into one, so a consumer
    that falls behind (or a token followed by the finish in the same step) gets one delta.

    If the consumer stops early (closes it, or drops it, even before the first event), the
    request is abandoned and its KV blocks are freed at the next step.
    """

    def __init__(self, queue: asyncio.Queue[TokenEvent], abandon: Callable[[], None]) -> None:
        self._queue, self._abandon, self._finished = queue, abandon, False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> TokenEvent:
        if self._finished:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except asyncio.CancelledError:  # the consumer's task is going away
            self._close()
            raise
        while event.finish_reason is None and not self._queue.empty():
            event = merge_events(event, self._queue.get_nowait())  # one delta, not a backlog
        self._finished = event.finish_reason is not None
        return event

    async def aclose(self) -> None:
        """Stop consuming; the request is aborted unless it already finished."""
        self._close()

    def _close(self) -> None:
        if not self._finished:
            self._finished = True
            self._abandon()

    def __del__(self) -> None:
        self._close()
