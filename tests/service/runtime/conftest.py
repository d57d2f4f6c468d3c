"""Runtime fixtures: a built synthetic engine (fp32) and a helper to drive asyncio from tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from engine_build.build import BuildRequest, build_engine
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from service.runtime.factory import open_runtime
from service.runtime.frontend import TorchRuntime
from service.runtime.interface import GenerationRequest, TokenEvent
from service.runtime.sizing import RuntimeOptions

T = TypeVar("T")


@pytest.fixture(scope="session")
def synthetic_engine(synthetic_checkpoint, tmp_path_factory) -> Path:
    request = BuildRequest(synthetic_checkpoint, load_profiles().get("cpu"), precision="fp32")
    return build_engine(request, EngineRepository(tmp_path_factory.mktemp("repo"))).entry.directory


def run_with_runtime(
    engine_dir: Path, body: Callable[[TorchRuntime], Awaitable[T]], **options: int
) -> T:
    """Start a runtime on `engine_dir`, run `body` with it, shut it down."""

    async def main() -> T:
        runtime = open_runtime(
            engine_dir, RuntimeOptions(**{"kv_cache_bytes": 64_000_000, **options})
        )
        await runtime.start()
        try:
            return await body(runtime)
        finally:
            await runtime.shutdown()

    return asyncio.run(main())


async def collect(runtime: TorchRuntime, request: GenerationRequest) -> list[TokenEvent]:
    """All events of one request."""
    return [event async for event in runtime.generate(request)]


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 60) -> None:
    """Poll `condition` until it holds; fail naming `what` after a generous `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout_s:g} s")
        await asyncio.sleep(0.005)


def tokens_of(events: list[TokenEvent]) -> list[int]:
    """The generated token ids of a finished stream."""
    return [t for e in events for t in e.token_ids]
