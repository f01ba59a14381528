"""Prometheus metrics of one server (its own registry: several servers in one process, as in
the tests, never share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Time to first token is the figure a serving target is set in: finer buckets where it falls
# (tens of milliseconds), as vLLM's histogram has them, so that a p50 read from them is close.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("lalm_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("lalm_request_seconds", "Request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("lalm_queue_depth", "Requests admitted and not finished (waiting or running)", registry=self.registry)
        self.batch_size = Histogram("lalm_batch_size", "Clips per encoder batch", ["model"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.decode_batch_size = Histogram(
            "lalm_decode_batch_size", "Generations sharing one decode step", ["model"], buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.ttft = Histogram("lalm_time_to_first_token_seconds", "Time to first token", ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.tokens = Counter("lalm_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.tokens_per_s = Histogram(
            "lalm_tokens_per_second", "Decode rate of each generation", ["model"], buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000), registry=self.registry
        )
        self.rejected = Counter("lalm_rejected", "Requests refused with 503 (queue full or shutting down)", ["reason"], registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
