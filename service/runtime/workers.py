"""Tensor-parallel workers: rank 0 schedules, ranks 1..tp-1 run the same steps in processes.

Step plans travel to the workers over pipes (so an idle worker can wait forever); inside a step
the ranks meet in torch.distributed collectives (gloo on CPU, NCCL on GPU), which time out
instead of hanging when a rank is gone. A monitor thread watches the worker processes: a dead
worker turns the engine FAILED at once, and the step it interrupted fails its requests with an
error naming the worker.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import torch
import torch.distributed as dist
from torch import Tensor

from engine_build.backends.torch_engine import TorchEngine
from engine_build.sharding import rank_graph
from service.runtime.core import Booted
from service.runtime.heap import freeze_startup_heap
from service.runtime.interface import EngineError
from service.runtime.kv_pages import PagedKVStore
from service.runtime.loader import load_rank_model
from service.runtime.runner import ModelRunner, StepPlan
from service.runtime.sizing import (
    RuntimeOptions,
    check_weights_fit,
    element_bytes,
    kv_store_and_config,
)

MONITOR_INTERVAL_S = 0.1


class WorkerDiedError(EngineError):
    """A tensor-parallel worker process is gone."""


@dataclass(frozen=True)
class _WorkerArgs:
    rank: int
    world_size: int
    engine_dir: str
    device: str
    init_method: str
    timeout_s: float
    block_size: int


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def _rank_device(device: str, rank: int) -> str:
    return f"cuda:{rank}" if device.startswith("cuda") else device


def _worker_main(args: _WorkerArgs, plans: Connection) -> None:  # runs in the worker process
    device = _rank_device(args.device, args.rank)
    dist.init_process_group(
        _backend(device),
        init_method=args.init_method,
        rank=args.rank,
        world_size=args.world_size,
        timeout=timedelta(seconds=args.timeout_s),
    )
    model = load_rank_model(args.engine_dir, args.rank, args.world_size, device)
    engine = TorchEngine.open(args.engine_dir)
    num_blocks = plans.recv()  # rank 0 sized the cache; every rank holds the same blocks
    store = PagedKVStore(
        rank_graph(engine.graph, args.world_size), num_blocks, args.block_size, model.dtype, device
    )
    runner = ModelRunner(model, store)
    freeze_startup_heap()  # as rank 0's server does: a collection here would stall every rank
    plans.send("ready")
    while (plan := plans.recv()) is not None:
        runner.execute(plan)
    dist.barrier()  # leave together: a rank destroying its group early aborts its peers
    dist.destroy_process_group()


class TensorParallelExecutor:
    """Rank 0's side: send each plan to the workers, run it here, watch the workers."""

    def __init__(
        self, runner: ModelRunner, workers: list[BaseProcess], pipes: list[Connection]
    ) -> None:
        self.runner, self.workers, self.pipes = runner, workers, pipes
        self.failure: str | None = None
        self._on_failure: list[Callable[[str], None]] = []
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._watch, name="tp-monitor", daemon=True)
        self._monitor.start()

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """Call `callback(message)` (from the monitor thread) when a worker dies."""
        self._on_failure.append(callback)

    def execute(self, plan: StepPlan) -> Tensor:
        """Run one step on every rank."""
        if self.failure:
            raise WorkerDiedError(self.failure)
        try:
            for pipe in self.pipes:
                pipe.send(plan)
            return self.runner.execute(plan)
        except (RuntimeError, OSError) as err:  # a collective timed out, or a peer vanished
            dead = self._dead_worker(wait_s=2.0)
            self.failure = dead or f"tensor-parallel step failed: {err}"
            raise WorkerDiedError(self.failure) from err

    def shutdown(self) -> None:
        """Stop the workers and leave the process group."""
        self._stop.set()
        for pipe, worker in zip(self.pipes, self.workers, strict=True):
            if worker.is_alive():
                with contextlib.suppress(OSError):  # it may die between the check and the send
                    pipe.send(None)
        if self.failure is None and all(w.is_alive() for w in self.workers):
            with contextlib.suppress(RuntimeError):  # a stalled worker times the barrier out
                dist.barrier()
        _stop_workers(self.workers)

    def _dead_worker(self, wait_s: float = 0.0) -> str | None:
        """A message naming the first worker that has exited (waiting up to `wait_s`)."""
        for rank, worker in enumerate(self.workers, start=1):
            worker.join(timeout=wait_s)
            if not worker.is_alive():
                return (
                    f"tensor-parallel worker rank {rank} (pid {worker.pid}) exited with code "
                    f"{worker.exitcode}"
                )
        return None

    def _watch(self) -> None:
        while not self._stop.wait(MONITOR_INTERVAL_S):
            dead = self._dead_worker()
            if dead and not self._stop.is_set():
                self.failure = dead
                for callback in self._on_failure:
                    callback(dead)
                return


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tensor_parallel_boot(
    engine: TorchEngine, options: RuntimeOptions, device: str = "cpu"
) -> Callable[[], Booted]:
    """The boot function of a tp > 1 runtime: start tp - 1 workers, join them, load rank 0."""

    def boot() -> Booted:
        tp = engine.tensor_parallel
        check_weights_fit(engine, torch.device(_rank_device(device, 0)))
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        workers, pipes = _start_workers(engine, options, device, init_method)
        try:
            rank0 = _rank_device(device, 0)
            dist.init_process_group(
                _backend(rank0),
                init_method=init_method,
                rank=0,
                world_size=tp,
                timeout=timedelta(seconds=options.tp_timeout_s),
            )
            model = load_rank_model(engine.directory, 0, tp, rank0)
            store, config = kv_store_and_config(engine, model.dtype, options, torch.device(rank0))
            for pipe in pipes:
                pipe.send(config.num_blocks)
            for rank, pipe in enumerate(pipes, start=1):
                _expect_ready(rank, pipe, options.boot_timeout_s)
        except BaseException:
            _stop_workers(workers)  # no orphans, and the process group can be made again
            raise
        executor = TensorParallelExecutor(ModelRunner(model, store), workers, pipes)
        return Booted(executor, config, element_bytes(model.dtype))

    return boot


def _start_workers(
    engine: TorchEngine, options: RuntimeOptions, device: str, init_method: str
) -> tuple[list[BaseProcess], list[Connection]]:
    context = mp.get_context("spawn")
    workers, pipes = [], []
    for rank in range(1, engine.tensor_parallel):
        ours, theirs = context.Pipe()
        args = _WorkerArgs(
            rank,
            engine.tensor_parallel,
            str(engine.directory),
            device,
            init_method,
            options.tp_timeout_s,
            options.block_size,
        )
        worker = context.Process(
            target=_worker_main, args=(args, theirs), daemon=True, name=f"nemotron-tp{rank}"
        )
        worker.start()
        workers.append(worker)
        pipes.append(ours)
    return workers, pipes


def _expect_ready(rank: int, pipe: Connection, timeout_s: float) -> None:
    """Wait for a worker's "ready" (it loads its shard meanwhile)."""
    try:
        started = pipe.poll(timeout_s) and pipe.recv() == "ready"
    except (EOFError, OSError):
        started = False
    if not started:
        raise WorkerDiedError(
            f"tensor-parallel worker rank {rank} did not start within {timeout_s:g} s"
        )


def _stop_workers(workers: list[BaseProcess]) -> None:
    """Leave the process group and make sure no worker outlives us."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)
