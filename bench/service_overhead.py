"""What the service costs over the in-process engine, through each API, on the same requests.

    python -m bench.service_overhead [--requests 32] [--concurrency 16] [--rounds 8]

The peer is our own engine called in process (`engine.generate`), with the options the server
uses. The service side is a real `nemotron-serve` process on loopback ports, serving the same
engine directory, with clients streaming from this process (a closed loop of `--concurrency`
streams): `GenerateStream` over grpc.aio; `POST /v1/completions` with `stream: true` over
aiohttp, the HTTP client of aiperf and `vllm bench serve` (HTTP/1.1 keep-alive connections,
one per concurrent stream, SSE lines read as they come); and KServe v2's `ModelStreamInfer`
over grpc.aio with the TensorRT-LLM tensors Triton clients send (the prompt as text: the
decoded prompt ids, so its token count may differ by a token; `end_id` -1 for the fixed output
length). Both processes freeze their startup heap the same way (`service.runtime.heap`).
Rounds alternate in-process and the three APIs; each engine is idle while another runs.
Client and server share this machine's cores, so the client's work is part of the service's
cost here. A shared machine's speed drifts by tens of
percent between rounds, more than the differences measured: the ratios are taken within each
round (the sides ran within a minute of each other) and their median is the result, and each
round also runs the in-process engine a second time ("in-process again"), whose ratio to the
first shows how far two runs of the same thing differ here. The hypervisor's steal time over
the rounds is printed too.
An SSE chunk is counted as one token for the inter-token gaps (the engine merges tokens only
when a client falls behind); totals come from the usage chunk.

Reported:
- output tokens/s of each side and their ratios, per round, with the median of each ratio;
- delivery delay of streamed tokens: when the client received a token minus when the engine
  produced it. The server runs with tracing on (to a receiver in this process), and its own
  spans say when each stream's first token (end of `prefill`) and last token (end of `decode`)
  were produced, on the same wall clock as the client. In process, the engine's timings give
  the same two instants. The service's added latency per streamed token is the difference of
  the two sides' p50;
- the request's way in (client call -> engine arrival, the start of the `queue` span): what
  the service adds to time to first token besides the token's way out;
- inter-token latency as each client saw it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nemotron.v1 import generation_pb2 as pb
from nemotron.v1 import generation_pb2_grpc as pb_grpc
from triton_proto import grpc_service_pb2 as kpb
from triton_proto import grpc_service_pb2_grpc as kpb_grpc

from bench.compare_hf import machine
from bench.loadgen import RequestSpec, Workload, make_requests, percentiles
from bench.otlp_sink import OtlpReceiver, start_receiver
from engine_build.embedded import default_cache_dir
from service.runtime.compute import reserve_cores_for_compute_threads, run_in_compute_thread
from service.runtime.factory import open_runtime
from service.runtime.heap import freeze_startup_heap
from service.runtime.interface import Engine, GenerationRequest
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.sizing import RuntimeOptions
from service.server.kserve.tensors import encode_bytes
from service.startup.selection import ensure_cpu_engine

CONTROL = "in-process again"  # the peer run twice per round: how far two equal runs differ
SERVED = ("gRPC", "HTTP", "KServe")  # the server's paths: nemotron.v1, OpenAI HTTP, KServe v2


@dataclass
class StreamResult:
    """One stream as its client saw it; delays filled in once the engine's instants are known."""

    request_id: str
    tokens: int
    itl_s: list[float]
    sent_ns: int  # wall clock: call started
    first_ns: int  # wall clock: first token received
    last_ns: int  # wall clock: message with the finish reason received
    out_first_s: float = 0.0  # first token: received - produced
    out_last_s: float = 0.0  # last token: received - produced
    way_in_s: float = 0.0  # engine arrival - call started


@dataclass(frozen=True)
class Round:
    """One closed-loop round of all requests."""

    output_tokens_per_s: float
    wall_s: float
    results: list[StreamResult]


async def _in_process(engine: Engine, spec: RequestSpec, name: str) -> StreamResult:
    request = GenerationRequest(
        name,
        spec.prompt_ids,
        RequestOptions(SamplingParams(), max_new_tokens=spec.output_tokens, ignore_eos=True),
    )
    sent = time.time_ns()
    stamps: list[int] = []
    last, end = None, sent
    async for event in engine.generate(request):  # arrival: this call, microseconds after `sent`
        end = time.time_ns()
        stamps.extend([end] * len(event.token_ids))
        last = event
    assert last is not None and last.timings is not None
    result = _result(name, sent, stamps, end)
    result.out_first_s = (stamps[0] - sent) / 1e9 - last.timings.time_to_first_token_s
    result.out_last_s = (end - sent) / 1e9 - last.timings.total_s
    return result


async def _through_grpc(
    stub: pb_grpc.GenerationServiceStub, spec: RequestSpec, name: str
) -> StreamResult:
    request = pb.GenerateStreamRequest(
        request_id=name,
        prompt=pb.Prompt(token_ids=pb.TokenIds(ids=spec.prompt_ids)),
        limits=pb.GenerationLimits(max_new_tokens=spec.output_tokens, ignore_eos=True),
    )
    sent = time.time_ns()
    stamps: list[int] = []
    end = sent
    async for message in stub.GenerateStream(request, timeout=600):
        end = time.time_ns()  # the message carrying the finish reason, not the trailers
        stamps.extend([end] * len(message.token_ids))
    return _result(name, sent, stamps, end)  # delays: from the server's spans, later


async def _through_http(
    client: aiohttp.ClientSession, model: str, spec: RequestSpec, name: str
) -> StreamResult:
    body = {
        "model": model,
        "prompt": list(spec.prompt_ids),
        "max_tokens": spec.output_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.time_ns()
    stamps: list[int] = []
    end, total = sent, 0
    async with client.post("/v1/completions", json=body, headers={"x-request-id": name}) as r:
        r.raise_for_status()
        async for line in r.content:  # one SSE line at a time
            if not line.startswith(b"data: {"):  # blank separators and [DONE]
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                total = chunk["usage"]["completion_tokens"]
                continue
            end = time.time_ns()
            if chunk["choices"][0]["text"]:
                stamps.append(end)
    result = _result(name, sent, stamps, end)
    result.tokens = total
    return result


async def _through_kserve(stub: Any, prompt: str, spec: RequestSpec, name: str) -> StreamResult:
    """One request on its own ModelStreamInfer call, as Triton's TensorRT-LLM clients send it
    (`end_id` -1: no end token, exactly `max_tokens`, as the other paths' `ignore_eos`)."""
    request = kpb.ModelInferRequest(model_name="ensemble", id=name)
    for tensor, datatype, raw in (
        ("text_input", "BYTES", encode_bytes([prompt.encode()])),
        ("max_tokens", "INT32", struct.pack("<i", spec.output_tokens)),
        ("end_id", "INT32", struct.pack("<i", -1)),
        ("stream", "BOOL", b"\x01"),
        ("exclude_input_in_output", "BOOL", b"\x01"),
        ("return_num_output_tokens", "BOOL", b"\x01"),
    ):
        request.inputs.add(name=tensor, datatype=datatype, shape=[1, 1])
        request.raw_input_contents.append(raw)

    async def one_request() -> AsyncIterator[Any]:
        yield request

    sent = time.time_ns()
    stamps: list[int] = []
    end, total = sent, 0
    async for message in stub.ModelStreamInfer(one_request(), timeout=600):
        if message.error_message:
            raise RuntimeError(message.error_message)
        end = time.time_ns()
        response = message.infer_response
        outputs = {o.name: i for i, o in enumerate(response.outputs)}
        if len(response.raw_output_contents[outputs["text_output"]]) > 4:  # a non-empty delta
            stamps.append(end)
        if response.parameters["triton_final_response"].bool_param:
            count = response.raw_output_contents[outputs["num_output_tokens"]]
            total = struct.unpack("<i", count)[0]
    result = _result(name, sent, stamps, end)
    result.tokens = total
    return result


def _result(name: str, sent: int, stamps: list[int], end: int) -> StreamResult:
    gaps = [(b - a) / 1e9 for a, b in itertools.pairwise(stamps)]
    return StreamResult(name, len(stamps), gaps, sent, stamps[0], end)


def place_on_spans(results: list[StreamResult], receiver: OtlpReceiver) -> None:
    """Fill the delays of gRPC streams from the server's `queue`, `prefill` and `decode` spans."""
    wanted = {r.request_id for r in results}
    rpc = {
        s.attributes["nemotron.request_id"]: s.span_id
        for s in receiver.wait_for(
            lambda s: s.attributes.get("nemotron.request_id") in wanted, timeout_s=60
        )
    }
    missing = wanted - rpc.keys()
    if missing:
        raise SystemExit(f"no server span for {len(missing)} of {len(wanted)} streams")
    phases = {(s.parent_span_id, s.name): s for s in receiver.spans}
    for r in results:
        span = rpc[r.request_id]
        found = {n: phases.get((span, n)) for n in ("queue", "prefill", "decode")}
        if None in found.values():
            lacking = [n for n, s in found.items() if s is None]
            raise SystemExit(f"the server span of {r.request_id} has no {', '.join(lacking)} span")
        queue, prefill, decode = found["queue"], found["prefill"], found["decode"]
        r.way_in_s = (queue.start_ns - r.sent_ns) / 1e9
        r.out_first_s = (r.first_ns - prefill.end_ns) / 1e9
        r.out_last_s = (r.last_ns - decode.end_ns) / 1e9


async def closed_loop(
    one: Callable[[RequestSpec, str], Awaitable[StreamResult]],
    specs: list[RequestSpec],
    concurrency: int,
    tag: str,
) -> Round:
    """All `specs` through `one`, `concurrency` at a time."""
    queue = list(enumerate(specs))
    results: list[StreamResult] = []

    async def client() -> None:
        while queue:
            index, spec = queue.pop(0)
            results.append(await one(spec, f"{tag}-{index}"))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    tokens = sum(r.tokens for r in results)
    return Round(round(tokens / wall, 2), round(wall, 3), results)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    cache_dir: str, threads: int | None, otlp_port: int, http_port: int
) -> tuple[subprocess.Popen, str]:
    """A `nemotron-serve` process on loopback, tracing to `otlp_port`, ready."""
    port = _free_port()
    exe = shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"
    command = [
        exe,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        "0",
        "--http-port",
        str(http_port),
    ]
    command += ["--cache-dir", cache_dir, "--log-level", "warning"]
    # Greedy, as the in-process peer: the requests set no sampling field, and the model's
    # defaults (SmolLM2's temperature 0.2, top-p 0.9) would make the server sample.
    command += ["--sampling-defaults", "none"]
    command += ["--compute-threads", str(threads)] if threads else []
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
        "OTEL_BSP_SCHEDULE_DELAY": "1000",
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
    }
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
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
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--compute-threads", type=int, default=None, help="both engines")
    args = parser.parse_args()
    reserve_cores_for_compute_threads()
    cache = default_cache_dir(os.environ)
    engine_dir = run_in_compute_thread(lambda: ensure_cpu_engine(cache, precision="bf16"))
    receiver, sink, otlp_port = start_receiver()
    http_port = _free_port()
    server, address = start_server(str(cache), args.compute_threads, otlp_port, http_port)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        options = RuntimeOptions(threads=args.compute_threads)  # the server's options
        runtime = open_runtime(engine_dir, options)
        loop.run_until_complete(runtime.start())
        freeze_startup_heap()  # as the server does once its engine is started
        workload = Workload(args.requests, (16, 128), (32, 64), seed=0)
        specs = make_requests(workload, runtime.tokenizer.encode, runtime.graph.vocab_size)
        channel = grpc.aio.insecure_channel(address)
        stub = pb_grpc.GenerationServiceStub(channel)

        def peer_one(spec: RequestSpec, name: str) -> Awaitable[StreamResult]:
            return _in_process(runtime, spec, name)

        def ours_one(spec: RequestSpec, name: str) -> Awaitable[StreamResult]:
            return _through_grpc(stub, spec, name)

        async def session() -> aiohttp.ClientSession:  # made on the loop that will use it
            return aiohttp.ClientSession(
                base_url=f"http://127.0.0.1:{http_port}",
                connector=aiohttp.TCPConnector(limit=args.concurrency),
                timeout=aiohttp.ClientTimeout(total=600),
            )

        async def served_name() -> str:
            async with http.get("/v1/models") as response:
                return str((await response.json())["data"][0]["id"])

        http = loop.run_until_complete(session())
        model = loop.run_until_complete(served_name())

        def http_one(spec: RequestSpec, name: str) -> Awaitable[StreamResult]:
            return _through_http(http, model, spec, name)

        kserve = kpb_grpc.GRPCInferenceServiceStub(channel)
        texts = {s.prompt_ids: runtime.tokenizer.decode(list(s.prompt_ids)) for s in specs}

        def kserve_one(spec: RequestSpec, name: str) -> Awaitable[StreamResult]:
            return _through_kserve(kserve, texts[spec.prompt_ids], spec, name)

        for one in (peer_one, ours_one, http_one, kserve_one):  # warm every path, prefix cache
            loop.run_until_complete(closed_loop(one, specs, args.concurrency, "warm"))
        ones = {
            CONTROL: peer_one,
            "gRPC": ours_one,
            "HTTP": http_one,
            "KServe": kserve_one,
            "in-process": peer_one,
        }
        sides: dict[str, list[Round]] = {label: [] for label in ones}
        labels = list(ones)
        stolen = Steal()
        for number in range(args.rounds):  # each side first in turn
            for label in labels[number % len(labels) :] + labels[: number % len(labels)]:
                tag = f"{label}-round{number}"
                sides[label].append(
                    loop.run_until_complete(closed_loop(ones[label], specs, args.concurrency, tag))
                )
        steal = stolen.fraction()
        loop.run_until_complete(http.close())
        loop.run_until_complete(channel.close())
        loop.run_until_complete(runtime.shutdown())
    finally:
        server.send_signal(signal.SIGTERM)  # flushes its last spans
        server.wait(timeout=120)
    for label in SERVED:
        place_on_spans([r for x in sides[label] for r in x.results], receiver)
    sink.stop(None)
    report(engine_id=engine_dir.name, args=args, sides=sides, steal=steal)


class Steal:
    """The share of this machine's CPU time its hypervisor gave to others since creation."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int]:
        try:
            with open("/proc/stat") as stat:
                fields = [int(x) for x in stat.readline().split()[1:]]
        except OSError:
            return 0, 0
        # user nice system idle iowait irq softirq steal (guest time is within user and nice)
        return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])

    def fraction(self) -> float:
        """Stolen / all CPU time since creation (0 where the kernel does not say)."""
        steal, total = self._read()
        return (steal - self.start[0]) / max(1, total - self.start[1])


def report(
    engine_id: str, args: argparse.Namespace, sides: dict[str, list[Round]], steal: float
) -> None:
    """Print the markdown report."""
    print(f"machine: {machine()}")
    print(f"engine: {engine_id}; {args.requests} requests, prompts 16-128 tokens, outputs 32-64")
    threads = args.compute_threads or "all cores"
    print(f"closed loop of {args.concurrency} concurrent streams, {args.rounds} rounds, "
          f"engine compute threads: {threads}\n")  # fmt: skip
    print(f"CPU time stolen by the hypervisor during the rounds: {steal:.1%}\n")
    ratios = (
        (CONTROL, "in-process"),  # the noise floor: the same engine twice
        ("gRPC", "in-process"),
        ("HTTP", "in-process"),
        ("HTTP", "gRPC"),
        ("KServe", "in-process"),
        ("KServe", "gRPC"),
    )
    rates = ("in-process", CONTROL, *SERVED)
    print(
        "| round | "
        + " | ".join(f"{label} tokens/s" for label in rates)
        + " | "
        + " | ".join(f"{a} / {b}" for a, b in ratios)
        + " |\n|"
        + "---|" * (1 + len(rates) + len(ratios))
    )

    def row(label: str, rate: dict[str, float]) -> None:
        cells = [f"{rate[x]:.1f}" for x in rates] + [f"{rate[a] / rate[b]:.3f}" for a, b in ratios]
        print(f"| {label} | " + " | ".join(cells) + " |")

    for number in range(args.rounds):
        row(str(number + 1), {x: sides[x][number].output_tokens_per_s for x in rates})
    row(
        "all",
        {
            x: sum(r.tokens for rnd in sides[x] for r in rnd.results)
            / sum(rnd.wall_s for rnd in sides[x])
            for x in rates
        },
    )
    medians = [
        statistics.median(
            top.output_tokens_per_s / bottom.output_tokens_per_s
            for top, bottom in zip(sides[a], sides[b], strict=True)
        )
        for a, b in ratios
    ]
    cells = " | ".join(f"{m:.3f}" for m in medians)
    print(f"| median of the rounds' ratios |{' |' * len(rates)} {cells} |")
    print(
        "\ntoken delivery delay (received by the client - produced by the engine), ms:\n\n"
        "| path | tokens | p50 | p90 | p99 |\n|---|---|---|---|---|"
    )
    p50 = {}
    for label in ("in-process", *SERVED):
        results = [r for x in sides[label] for r in x.results]
        for which, values in (
            ("first and last", [d for r in results for d in (r.out_first_s, r.out_last_s)]),
            ("first", [r.out_first_s for r in results]),
            ("last", [r.out_last_s for r in results]),
        ):
            q = percentiles(values)
            p50.setdefault(label, q["p50"])
            print(f"| {label} | {which} | {q['p50']} | {q['p90']} | {q['p99']} |")
    print()
    for label in SERVED:
        added = p50[label] - p50["in-process"]
        print(f"added by {label} per streamed token, p50: {added:.2f} ms")
        way_in = percentiles([r.way_in_s for x in sides[label] for r in x.results])
        print(
            f"request way in through {label} (call -> engine arrival): p50 {way_in['p50']} ms, "
            f"p90 {way_in['p90']} ms"
        )
    for label in ("in-process", *SERVED):
        q = percentiles([g for x in sides[label] for r in x.results for g in r.itl_s])
        print(
            f"inter-token latency seen by the client, {label}: p50 {q['p50']} ms, p90 {q['p90']} ms"
        )


if __name__ == "__main__":
    main()
