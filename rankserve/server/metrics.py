"""Prometheus metrics for one server app, on its own registry (never the process-global one)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

# Seconds; CPU serving spans sub-millisecond tiny models to multi-second prompts of real ones.
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServerMetrics:
    """Request counts by status, token counts, TTFT and inter-token latency, queue depth and batch size."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rankserve_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("rankserve_prompt_tokens", "prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("rankserve_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter(
            "rankserve_request_finish", "finished generations by reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "rankserve_time_to_first_token_seconds",
            "arrival to first generated token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "rankserve_inter_token_latency_seconds",
            "time between consecutive tokens of one request",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("rankserve_queue_depth", "requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("rankserve_batch_size", "requests in the running batch", registry=r)
        self.compactions = Counter(
            "rankserve_kv_compactions", "KV cache shifts to make room for a request", registry=r
        )
        # process_resident_memory_bytes etc. (Linux), so a load test can read RSS without the pid.
        ProcessCollector(registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
