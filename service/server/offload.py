"""CPU-heavy request work off the serving event loop, in a small bounded pool of threads.

The loop that carries every stream's tokens (gRPC and HTTP share it) must never run a long
computation: a 4 MB text takes seconds to tokenize, and every other stream would stall meanwhile.
Tokenizing, chat-template rendering, tool-schema checks and decoding of long id lists go to
`Offload.run` when they are large; small ones (almost all requests) run inline, since a thread
hop costs more than the work. The tokenizer's batch encoder releases the GIL while it works, so
the loop keeps running beside it; template rendering is Python, and the interpreter still
switches to the loop every few milliseconds.

The pool is bounded: when `max_waiting` jobs are already queued or running, the next is refused
as overload (RESOURCE_EXHAUSTED, 429), with a retry hint, instead of queueing without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from service.runtime.interface import OverloadedError
from service.runtime.memory import cpu_budget

T = TypeVar("T")

INLINE_CHARS = 16_384  # texts up to this size are tokenized on the loop (well under 1 ms)
INLINE_IDS = 16_384  # id lists up to this size are decoded on the loop


class Offload:
    """A bounded thread pool for request preparation."""

    def __init__(self, workers: int | None = None, max_waiting: int = 64) -> None:
        # The CPUs this process may use (affinity, cgroup quota), not the host's count.
        self.workers = workers or min(4, max(1, cpu_budget()[0] // 2))
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="nemotron-prepare")
        self._pending = 0

    async def run(self, work: Callable[[], T], size: int = INLINE_CHARS + 1) -> T:
        """`work()`, inline when `size` (characters or ids) is small, else in the pool."""
        if size <= INLINE_CHARS:
            return work()
        if self._pending >= self.max_waiting:
            raise OverloadedError(
                f"{self._pending} large requests are being prepared (limit {self.max_waiting}); "
                "retry later"
            )
        loop = asyncio.get_running_loop()
        self._pending += 1
        job = self._pool.submit(work)
        # Counted until the job itself ends: a caller that goes away leaves a running job.
        job.add_done_callback(lambda _: self._ended(loop))
        return await asyncio.wrap_future(job)

    def _ended(self, loop: asyncio.AbstractEventLoop) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
            loop.call_soon_threadsafe(self._count_down)

    def _count_down(self) -> None:
        self._pending -= 1

    def shutdown(self) -> None:
        """Stop the threads (pending work finishes first)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
