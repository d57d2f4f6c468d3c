"""Prometheus metrics on their own HTTP port (`/metrics`).

Per RPC: requests by method and status code, end-to-end latency; per generation: time to first
token, time per output token after the first (the mean inter-token latency of the request),
queue time, prompt, output and reasoning tokens. Engine gauges (running and waiting requests,
KV-cache blocks and usage, prefix-cache lookups and hits, preemptions) are read from the engine
at scrape time, and `nemotron_engine_info` carries the model and engine as labels.

The same engine figures are also exported under vLLM's names (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:kv_cache_usage_perc` and its older alias
`vllm:gpu_cache_usage_perc`, `vllm:cache_config_info`, `vllm:prefix_cache_queries` and
`vllm:prefix_cache_hits`), labelled `model_name`: the names the Gateway API Inference
Extension's endpoint picker and the vLLM production-stack router scrape by default. They are a
compatibility surface: their names and meanings follow vLLM, not us.
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

    def attach_engine(
        self, stats: Callable[[], EngineStats], info: Mapping[str, str], model_name: str = ""
    ) -> None:
        """Export the engine's gauges (read at scrape time), its identity and served name."""
        self._engine.stats, self._engine.info = stats, dict(info)
        self._engine.model_name = model_name

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
        self.model_name = ""

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
        yield from self._vllm_named(s)

    def _vllm_named(self, s: EngineStats) -> Iterator[Any]:
        """The same figures under the names routers built for vLLM read."""
        labels, model = ["model_name"], [self.model_name]
        usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
        for name, doc, value in (
            ("vllm:num_requests_running", "Requests in the running batch (vLLM's name)", s.running),
            ("vllm:num_requests_waiting", "Requests waiting for a slot (vLLM's name)", s.waiting),
            ("vllm:kv_cache_usage_perc", "KV-cache usage, 0 to 1 (vLLM's name)", usage),
            ("vllm:gpu_cache_usage_perc", "KV-cache usage, 0 to 1 (vLLM's older name)", usage),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(model, value)
            yield gauge
        config = GaugeMetricFamily(
            "vllm:cache_config_info",
            "KV-cache configuration (vLLM's name; the value is 1)",
            labels=["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching"],
        )
        config.add_metric(
            [self.model_name, str(s.kv_block_size), str(s.kv_blocks_total), "True"], 1
        )
        yield config
        for name, doc, value in (
            (
                "vllm:prefix_cache_queries",
                "Prompt tokens looked up (vLLM's name)",
                s.prefix_cache_queries,
            ),
            (
                "vllm:prefix_cache_hits",
                "Prompt tokens found cached (vLLM's name)",
                s.prefix_cache_hits,
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=labels)
            counter.add_metric(model, value)
            yield counter
