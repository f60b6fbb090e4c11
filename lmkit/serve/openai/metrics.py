"""Prometheus metrics of one api_server, in its own registry (several servers may share a process in tests).

Engine-side gauges (running/waiting requests, KV blocks) are read from `AsyncEngine.stats()` at scrape
time; token counters and latency histograms are fed by `RequestTimer` as chunks stream out.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.num_requests_running = gauge("lmkit:num_requests_running", "Requests the engine is running.")
        self.num_requests_waiting = gauge("lmkit:num_requests_waiting", "Requests waiting in the engine queue.")
        self.num_requests_in_flight = gauge("lmkit:num_requests_in_flight", "HTTP generation requests being served.")
        self.num_blocks_total = gauge("lmkit:num_blocks_total", "KV cache blocks in the pool.")
        self.num_blocks_used = gauge("lmkit:num_blocks_used", "KV cache blocks held by live sequences.")
        self.kv_cache_usage = gauge("lmkit:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1).")
        self.prompt_tokens = Counter("lmkit:prompt_tokens", "Prompt tokens processed.", labels, registry=r)
        self.generation_tokens = Counter("lmkit:generation_tokens", "Tokens generated.", labels, registry=r)
        self.request_success = Counter(
            "lmkit:request_success", "Finished requests by finish reason.", [*labels, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "lmkit:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "lmkit:inter_token_latency_seconds", "Time between tokens.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "lmkit:e2e_request_latency_seconds", "Request latency.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.model_name = model_name

    def render(self, stats, in_flight: int) -> bytes:
        m = self.model_name
        if stats is not None:
            self.num_requests_running.labels(m).set(stats.num_running)
            self.num_requests_waiting.labels(m).set(stats.num_waiting)
            self.num_blocks_total.labels(m).set(stats.num_blocks_total)
            used = stats.num_blocks_total - stats.num_blocks_free
            self.num_blocks_used.labels(m).set(used)
            self.kv_cache_usage.labels(m).set(used / stats.num_blocks_total if stats.num_blocks_total else 0.0)
        self.num_requests_in_flight.labels(m).set(in_flight)
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Records one request's TTFT, inter-token latencies, token counts and finish reasons."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.start = time.monotonic()
        self.last: float | None = None

    def on_tokens(self, num_tokens: int) -> None:
        if num_tokens <= 0:
            return
        now = time.monotonic()
        m = self.metrics
        if self.last is None:
            m.ttft.labels(m.model_name).observe(now - self.start)
            num_tokens -= 1  # the first token's latency is the TTFT
        elif num_tokens > 0:
            per_token = (now - self.last) / num_tokens
            for _ in range(num_tokens):
                m.itl.labels(m.model_name).observe(per_token)
        m.generation_tokens.labels(m.model_name).inc(num_tokens + (1 if self.last is None else 0))
        self.last = now

    def on_finish(self, finish_reason: str | None, prompt_tokens: int = 0) -> None:
        m = self.metrics
        if prompt_tokens:
            m.prompt_tokens.labels(m.model_name).inc(prompt_tokens)
        m.request_success.labels(m.model_name, finish_reason or "abort").inc()

    def done(self) -> None:
        m = self.metrics
        m.e2e.labels(m.model_name).observe(time.monotonic() - self.start)
