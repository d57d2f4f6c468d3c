"""What the gRPC service costs over the in-process engine, on the same requests in one run.

    python -m bench.service_overhead [--requests 48] [--concurrency 16] [--rounds 2]

The peer is our own engine called in process (`engine.generate`), with the options the server
uses. The service side is a real `nemotron-serve` process on a loopback port, serving the same
engine directory, with clients streaming `GenerateStream` from this process over grpc.aio (a
closed loop of `--concurrency` streams). Rounds alternate peer and service; both engines are
idle while the other runs.

Reported: output tokens/s of each side and their ratio; added latency per streamed token,
measured on the first and the last token of every stream as the time the client received it
minus the time the engine reports for it (its own `time_to_first_token` and `total` timings,
counted from the request's arrival in the engine), so it holds the request's way in plus the
token's way out; inter-token latency on both sides. Client and server share this machine's
cores, so client work is part of the service's cost here.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc

from bench.compare_hf import machine
from bench.loadgen import RequestSpec, Workload, make_requests, percentiles
from engine_build.embedded import default_cache_dir
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import RuntimeOptions, open_runtime
from service.runtime.interface import Engine, GenerationRequest, SamplingParams
from service.startup import ensure_cpu_engine


@dataclass(frozen=True)
class StreamResult:
    """One stream as its client saw it, against the engine's own timings."""

    tokens: int
    itl_s: list[float]
    first_added_s: float  # client time to first token - engine time to first token
    last_added_s: float  # client total - engine total


@dataclass(frozen=True)
class Round:
    """One closed-loop round of all requests."""

    output_tokens_per_s: float
    wall_s: float
    results: list[StreamResult]


def _result(
    start: float, stamps: list[float], end: float, ttft_s: float, total_s: float
) -> StreamResult:
    return StreamResult(
        tokens=len(stamps),
        itl_s=[b - a for a, b in itertools.pairwise(stamps)],
        first_added_s=(stamps[0] - start) - ttft_s,
        last_added_s=(end - start) - total_s,
    )


async def _in_process(engine: Engine, spec: RequestSpec, name: str) -> StreamResult:
    request = GenerationRequest(
        name, spec.prompt_ids, SamplingParams(), max_new_tokens=spec.output_tokens, ignore_eos=True
    )
    start = time.perf_counter()
    stamps: list[float] = []
    last = None
    async for event in engine.generate(request):
        now = time.perf_counter()
        stamps.extend([now] * len(event.token_ids))
        last = event
    end = time.perf_counter()
    assert last is not None and last.timings is not None
    return _result(start, stamps, end, last.timings.time_to_first_token_s, last.timings.total_s)


async def _through_grpc(
    stub: pb_grpc.GenerationServiceStub, spec: RequestSpec, name: str
) -> StreamResult:
    request = pb.GenerateStreamRequest(
        request_id=name,
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=spec.prompt_ids)),
        limits=pb.GenerationLimits(max_new_tokens=spec.output_tokens, ignore_eos=True),
    )
    start = time.perf_counter()
    stamps: list[float] = []
    last = None
    async for message in stub.GenerateStream(request, timeout=600):
        now = time.perf_counter()
        stamps.extend([now] * len(message.token_ids))
        last = message
    end = time.perf_counter()
    assert last is not None and last.HasField("timings"), "the last message carries timings"
    t = last.timings
    return _result(start, stamps, end, t.time_to_first_token_ms / 1000, t.total_ms / 1000)


async def closed_loop(
    one: Callable[[RequestSpec, str], Awaitable[StreamResult]],
    specs: list[RequestSpec],
    concurrency: int,
) -> Round:
    """All `specs` through `one`, `concurrency` at a time."""
    queue = list(enumerate(specs))
    results: list[StreamResult] = []

    async def client() -> None:
        while queue:
            index, spec = queue.pop(0)
            results.append(await one(spec, f"overhead-{index}-{time.monotonic_ns()}"))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    return Round(round(tokens / wall, 2), round(wall, 3), results)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(cache_dir: str) -> tuple[subprocess.Popen, str]:
    """A `nemotron-serve` process on loopback, ready (readiness SERVING)."""
    port = _free_port()
    exe = shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"
    command = [exe, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    command += ["--cache-dir", cache_dir, "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
            if status.status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return process, address
        except grpc.RpcError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready in 600 s")


def main() -> None:
    """Run the rounds and print the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    reserve_cores_for_compute_threads()
    cache = default_cache_dir(os.environ)
    engine_dir = run_in_compute_thread(lambda: ensure_cpu_engine(cache, precision="bf16"))
    server, address = start_server(str(cache))
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        runtime = open_runtime(engine_dir, RuntimeOptions())  # the server's options
        loop.run_until_complete(runtime.start())
        workload = Workload(args.requests, (16, 128), (32, 64), seed=0)
        specs = make_requests(workload, runtime.tokenizer.encode, runtime.graph.vocab_size)
        channel = grpc.aio.insecure_channel(address)
        stub = pb_grpc.GenerationServiceStub(channel)

        def peer_one(spec: RequestSpec, name: str) -> Awaitable[StreamResult]:
            return _in_process(runtime, spec, name)

        def ours_one(spec: RequestSpec, name: str) -> Awaitable[StreamResult]:
            return _through_grpc(stub, spec, name)

        for one in (peer_one, ours_one):  # warm both paths
            loop.run_until_complete(closed_loop(one, specs[:4], 4))
        peer: list[Round] = []
        ours: list[Round] = []
        for _ in range(args.rounds):
            peer.append(loop.run_until_complete(closed_loop(peer_one, specs, args.concurrency)))
            ours.append(loop.run_until_complete(closed_loop(ours_one, specs, args.concurrency)))
        loop.run_until_complete(channel.close())
        loop.run_until_complete(runtime.shutdown())
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    report(engine_dir.name, args, peer, ours)


def report(engine_id: str, args: argparse.Namespace, peer: list[Round], ours: list[Round]) -> None:
    """Print the markdown report."""
    print(f"machine: {machine()}")
    print(f"engine: {engine_id}; {args.requests} requests, prompts 16-128 tokens, outputs 32-64")
    print(f"closed loop of {args.concurrency} concurrent streams, {args.rounds} rounds\n")
    print("| round | in-process tokens/s | gRPC tokens/s | gRPC / in-process |\n|---|---|---|---|")
    for index, (p, o) in enumerate(zip(peer, ours, strict=True), start=1):
        ratio = o.output_tokens_per_s / p.output_tokens_per_s
        print(
            f"| {index} | {p.output_tokens_per_s:.1f} | {o.output_tokens_per_s:.1f} | {ratio:.3f} |"
        )
    rate = [
        sum(r.tokens for x in side for r in x.results) / sum(x.wall_s for x in side)
        for side in (peer, ours)
    ]
    print(f"| all | {rate[0]:.1f} | {rate[1]:.1f} | {rate[1] / rate[0]:.3f} |\n")
    print(
        "delivery delay per streamed token (client receipt - engine timing), first and last "
        "token of each stream, ms:\n\n| path | p50 | p90 | p99 |\n|---|---|---|---|"
    )
    delays = {}
    for label, side in (("in-process", peer), ("gRPC", ours)):
        values = [d for x in side for r in x.results for d in (r.first_added_s, r.last_added_s)]
        delays[label] = q = percentiles(values)
        print(f"| {label} | {q['p50']} | {q['p90']} | {q['p99']} |")
    added = delays["gRPC"]["p50"] - delays["in-process"]["p50"]
    print(f"\nadded by the service, p50: {added:.2f} ms per streamed token")
    for label, side in (("in-process", peer), ("gRPC", ours)):
        q = percentiles([g for x in side for r in x.results for g in r.itl_s])
        print(f"inter-token latency {label}: p50 {q['p50']} ms, p90 {q['p90']} ms")


if __name__ == "__main__":
    main()
