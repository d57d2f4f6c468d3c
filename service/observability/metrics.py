"""Prometheus metrics on their own HTTP port (`/metrics`).

Per RPC: requests by method and status code, end-to-end latency; per generation: time to first
token, time per output token after the first (the mean inter-token latency of the request),
queue time, prompt, output and reasoning tokens. Engine gauges (running and waiting requests,
KV-cache blocks and usage, prefix-cache lookups and hits, preemptions) are read from the engine
at scrape time, and `nemotron_engine_info` carries the model and engine as labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from service.observability.tracing import RequestRecord
from service.runtime.interface import EngineStats

# Seconds; dense where a healthy CPU or GPU deployment lands.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1)


class ServiceMetrics:
    """The service's metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nemotron_requests", "RPCs by method and status code", ["method", "code"], registry=r
        )
        self.duration = Histogram(
            "nemotron_request_duration_seconds",
            "End-to-end RPC latency",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "nemotron_time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "nemotron_inter_token_latency_seconds",
            "Mean time between output tokens after the first, one sample per request",
            ["method"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "nemotron_queue_time_seconds",
            "Time a request waited before its prefill began",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "nemotron_prompt_tokens", "Prompt tokens of finished requests", ["method"], registry=r
        )
        self.output_tokens = Counter(
            "nemotron_generation_tokens", "Generated tokens", ["method"], registry=r
        )
        self.reasoning_tokens = Counter(
            "nemotron_reasoning_tokens", "Generated tokens inside <think>", ["method"], registry=r
        )
        self._engine = _EngineCollector()
        r.register(self._engine)

    def attach_engine(self, stats: Callable[[], EngineStats], info: Mapping[str, str]) -> None:
        """Export the engine's gauges (read at scrape time) and its identity."""
        self._engine.stats, self._engine.info = stats, dict(info)

    def observe(self, record: RequestRecord, code: str, duration_s: float) -> None:
        """Count one finished RPC."""
        method = record.method
        self.requests.labels(method, code).inc()
        self.duration.labels(method).observe(duration_s)
        if not record.operation:
            return
        self.prompt_tokens.labels(method).inc(record.prompt_tokens)
        self.output_tokens.labels(method).inc(record.completion_tokens)
        self.reasoning_tokens.labels(method).inc(record.reasoning_tokens)
        if record.timings is not None and record.completion_tokens:
            self.ttft.labels(method).observe(record.timings.time_to_first_token_s)
            self.queue.labels(method).observe(record.timings.queue_s)
        per_token = record.time_per_output_token_s
        if per_token is not None:
            self.itl.labels(method).observe(per_token)

    def serve(self, host: str, port: int) -> int:
        """Serve `/metrics` on a background thread; the bound port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_address[1])


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.stats: Callable[[], EngineStats] | None = None
        self.info: dict[str, str] = {}

    def collect(self) -> Iterator[Any]:
        if self.stats is None:
            return
        s = self.stats()
        info = InfoMetricFamily("nemotron_engine", "The model and engine being served")
        info.add_metric([], self.info)
        yield info
        for name, doc, value in (
            ("nemotron_requests_running", "Requests in the running batch", s.running),
            ("nemotron_requests_waiting", "Requests waiting for a slot", s.waiting),
            ("nemotron_kv_cache_blocks_total", "KV-cache blocks", s.kv_blocks_total),
            ("nemotron_kv_cache_blocks_used", "KV-cache blocks in use", s.kv_blocks_used),
            (
                "nemotron_kv_cache_usage_ratio",
                "Share of KV-cache blocks in use",
                s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0,
            ),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
            (
                "nemotron_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                s.prefix_cache_queries,
            ),
            (
                "nemotron_prefix_cache_hits",
                "Prompt tokens served from the prefix cache",
                s.prefix_cache_hits,
            ),
            ("nemotron_preemptions", "Requests preempted for KV space", s.preemptions),
            ("nemotron_engine_steps", "Scheduler steps run", s.steps),
        ):
            yield CounterMetricFamily(name, doc, value=value)
