"""The PyTorch backend's async front end: submit, stream and abort over one engine thread.

`TorchRuntime` is the `Engine` the servers use. Requests are validated here, posted to a
`Mailbox`, and their events come back through per-request asyncio queues (`EventStream`). The
engine thread boots the model (load, size the KV cache), builds the `EngineCore` whole and then
runs it: take new requests and aborts from the mailbox, step, repeat. Aborts and deadlines take
effect at the next step and free KV blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import torch

from engine_build.graph import ModelGraph
from service.runtime.compiled import CompiledDecode
from service.runtime.compute import reserve_cores_for_compute_threads
from service.runtime.core import Booted, EngineCore, RuntimeConfig
from service.runtime.interface import (
    IN_FLIGHT,
    EngineError,
    EngineState,
    EngineStats,
    FinishReason,
    GenerationRequest,
    NotReadyError,
    OverloadedError,
    RequestError,
    RequestLimits,
    TokenEvent,
)
from service.runtime.memory import cpu_budget
from service.runtime.options import RequestOptions
from service.runtime.output import OutputProcessor, RequestState
from service.runtime.sequence import Sequence
from service.runtime.tokenizer import TextTokenizer
from service.runtime.validation import validate_request

_LOG = logging.getLogger("nemotron.runtime")
IDLE_WAIT_S = 0.05  # the engine thread's longest sleep with nothing to do (a post wakes it)


class Outlet:
    """Where one request's events go: its asyncio queue, fed from the engine thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, mailbox: Mailbox, request_id: str) -> None:
        self.loop, self.mailbox, self.request_id = loop, mailbox, request_id
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()

    def __call__(self, event: TokenEvent) -> None:
        """Deliver `event` (the last one releases the request id)."""
        if event.finish_reason is not None:
            self.mailbox.release(self)
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)


class Mailbox:
    """What passes from the front end to the engine thread: new requests and aborts.

    It also knows which request ids are in use (submitted and not finished), so that an id is
    never taken twice and `abort` can say whether it found the request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._in_use: dict[str, Outlet] = {}
        self._new: list[RequestState] = []
        self._aborted: set[str] = set()
        self._closed: str | None = None  # why no more requests are taken

    @property
    def pending(self) -> int:
        """Requests posted that the engine thread has not taken yet."""
        return len(self._new)

    def post(self, state: RequestState, outlet: Outlet, waiting: int, max_waiting: int) -> None:
        """Hand a request to the engine thread (`waiting`: the engine's own queue length)."""
        request_id = state.request_id
        with self._lock:
            if self._closed is not None:
                raise NotReadyError(self._closed)
            if request_id in self._in_use:
                raise RequestError(IN_FLIGHT)
            waiting += len(self._new)
            if waiting >= max_waiting:
                raise OverloadedError(
                    f"{waiting} requests are waiting (limit {max_waiting}); retry later"
                )
            self._new.append(state)
            self._in_use[request_id] = outlet
        self._wakeup.set()

    def abort(self, request_id: str, outlet: Outlet | None = None) -> bool:
        """Ask for a request to stop (only if `outlet` still owns the id, when given)."""
        with self._lock:
            owner = self._in_use.get(request_id)
            found = owner is not None and (outlet is None or owner is outlet)
            if found:
                self._aborted.add(request_id)
        self._wakeup.set()
        return found

    def release(self, outlet: Outlet) -> None:
        """The request of `outlet` finished: its id is free again."""
        with self._lock:
            if self._in_use.get(outlet.request_id) is outlet:
                del self._in_use[outlet.request_id]

    def take(self) -> tuple[list[RequestState], set[str]]:
        """The requests and aborts posted since the last call (engine thread)."""
        with self._lock:
            new, self._new = self._new, []
            aborted, self._aborted = self._aborted, set()
        return new, aborted

    def close(self, reason: str) -> None:
        """Take no more requests (shutting down or failed)."""
        with self._lock:
            self._closed = self._closed or reason
        self._wakeup.set()

    def wait(self, timeout_s: float) -> None:
        """Sleep until something is posted or `timeout_s` passes (engine thread)."""
        self._wakeup.wait(timeout_s)
        self._wakeup.clear()


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
        self._tokenizer, self.graph, self._eos_ids = tokenizer, graph, eos_ids
        self._boot, self._threads = boot, threads or cpu_budget()[0]
        self._mailbox = Mailbox()
        self._core: EngineCore | None = None  # built by the engine thread once booted
        self._booted = threading.Event()
        self._boot_error: BaseException | None = None
        self._state = EngineState.STARTING
        self._compiled: CompiledDecode | None = None
        self._failure: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    @property
    def state(self) -> EngineState:
        """Readiness."""
        return self._state

    @property
    def tokenizer(self) -> TextTokenizer:
        """The engine's tokenizer."""
        return self._tokenizer

    @property
    def core(self) -> EngineCore:
        """The engine core (after `start()`)."""
        if self._core is None:
            raise NotReadyError(self._failure or f"engine is {self._state.value}")
        return self._core

    @property
    def config(self) -> RuntimeConfig:
        """The sized limits: batch, tokens per step, sequence length, KV blocks."""
        return self.core.config

    @property
    def limits(self) -> RequestLimits:
        """What one request may ask for."""
        config = self.core.config
        return RequestLimits(
            self.graph.vocab_size, config.max_seq_len, config.num_blocks * config.block_size
        )

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
        warmup = GenerationRequest("warmup", (0,) * 8, RequestOptions(max_new_tokens=1))
        self._state = EngineState.READY  # admit the warm-up request
        try:
            async for _ in self._submit(warmup, 1):
                pass
        except Exception:
            self._state = EngineState.FAILED
            raise
        _LOG.info("engine_ready", extra={"fields": {"blocks": self.core.config.num_blocks}})
        if self._compiled is not None:  # after the warm-up: readiness does not wait for it
            self._compiled.start(self._threads)

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Validate and submit; stream events. Raises RequestError/OverloadedError/NotReadyError."""
        if self._state is not EngineState.READY:
            raise NotReadyError(self._failure or f"engine is {self._state.value}")
        return self._submit(request, validate_request(request, self.limits))

    def _submit(self, request: GenerationRequest, max_new_tokens: int) -> AsyncIterator[TokenEvent]:
        core = self.core
        outlet = Outlet(self._loop, self._mailbox, request.request_id)
        seq = Sequence(request, time.monotonic())
        state = core.output.new_state(seq, outlet, max_new_tokens)
        waiting = len(core.scheduler.waiting)  # read across threads: a snapshot is enough
        self._mailbox.post(state, outlet, waiting, core.config.max_waiting)
        return EventStream(outlet.queue, lambda: self._mailbox.abort(request.request_id, outlet))

    def abort(self, request_id: str) -> bool:
        """Stop a request at the next step; False when it is not known."""
        return self._mailbox.abort(request_id)

    def wait_compiled(self, timeout: float | None = None) -> tuple[int, ...]:
        """Wait for the background decode compilation to end; the batch sizes it made ready."""
        if self._compiled is None:
            return ()
        self._compiled.wait(timeout)
        return self._compiled.ready

    def stats(self) -> EngineStats:
        """A snapshot (read without stopping the engine thread)."""
        if self._core is None:
            return EngineStats.empty(self._state)
        return self._core.stats(self._state, self._mailbox.pending)

    async def shutdown(self) -> None:
        """Refuse new requests, abort the pending ones, stop the engine thread and executor."""
        self._mailbox.close("engine is shutting down")
        self._stopping = True
        if self._compiled is not None:
            self._compiled.stop()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        if self._state is not EngineState.FAILED:
            self._state = EngineState.STOPPED
        if self._core is not None:
            self._core.executor.shutdown()

    def fail(self, message: str) -> None:
        """Mark the engine FAILED (not ready); pending requests end with `message` as error."""
        _LOG.error("engine_failed", extra={"fields": {"reason": message}})
        self._failure = message
        self._state = EngineState.FAILED
        self._mailbox.close(message)
        self._stopping = True

    # --- the engine thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            torch.set_num_threads(self._threads)
            booted = self._boot()
            output = OutputProcessor(self._tokenizer, self._eos_ids, booted.config.max_seq_len)
            core = EngineCore(booted, self.graph, output)
            booted.executor.on_failure(self.fail)
            self._compiled = booted.compiled
            self._core = core
        except BaseException as err:  # reported by start()
            self._boot_error = err
            return
        finally:
            self._booted.set()
        self._run(core)

    def _run(self, core: EngineCore) -> None:
        try:
            while not self._stopping:
                self._admit(core)
                if not core.has_work:
                    self._mailbox.wait(IDLE_WAIT_S)
                    continue
                core.step()
        except Exception as err:  # the engine is broken: fail everything, report not ready
            described = str(err) if isinstance(err, EngineError) else f"{type(err).__name__}: {err}"
            self.fail(self._failure or f"engine step failed: {described}")
            _LOG.exception("engine_failed")
        finally:
            failed = self._state is EngineState.FAILED
            self._mailbox.close(self._failure or "engine is shutting down")
            self._admit(core)  # nothing can be posted after this last look
            core.finish_all(FinishReason.ERROR if failed else FinishReason.ABORTED, self._failure)

    def _admit(self, core: EngineCore) -> None:
        new, aborted = self._mailbox.take()
        for state in new:
            core.add(state)
        core.expire(aborted, time.monotonic())


def merge_events(first: TokenEvent, then: TokenEvent) -> TokenEvent:
    """Two consecutive events of a request as one (the finish data is the later one's)."""
    return replace(
        then,
        token_ids=first.token_ids + then.token_ids,
        text=first.text + then.text,
        logprobs=first.logprobs + then.logprobs,
        prompt_logprobs=first.prompt_logprobs + then.prompt_logprobs,
    )


class EventStream:
    """The async iterator `generate` returns: events until the one with a finish reason.

    Events that are already waiting when the consumer asks are merged into one, so a consumer
    that falls behind (or a token followed by the finish in the same step) gets one delta.

    If the consumer stops early (closes it, or drops it, even before the first event), the
    request is abandoned and its KV blocks are freed at the next step.
    """

    def __init__(self, queue: asyncio.Queue[TokenEvent], abandon: Callable[[], object]) -> None:
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
