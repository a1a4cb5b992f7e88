"""Prometheus metrics of one server (its own registry, so several servers can run in one
process, as the tests do)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pltkit.runtime.engine import Result

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pltkit_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("pltkit_prompt_tokens", "prompt tokens evaluated (prefilled)", registry=r)
        self.cached_tokens = Counter("pltkit_prompt_tokens_cached", "prompt tokens reused from a cached prefix",
                                     registry=r)
        self.predicted_tokens = Counter("pltkit_predicted_tokens", "tokens generated", registry=r)
        self.cache_hits = Counter("pltkit_cache_hits", "completions that reused a cached prefix", registry=r)
        self.completions = Counter("pltkit_completions", "completions by stop type", ["stop_type"], registry=r)
        self.superseded = Counter("pltkit_superseded", "jobs cancelled by a newer request on their slot",
                                  registry=r)
        self.request_seconds = Histogram("pltkit_request_seconds", "time from request to response end",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_seconds = Histogram("pltkit_prompt_seconds", "prompt processing time of a completion",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.job_seconds = Histogram("pltkit_job_seconds", "decode worker time per job", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.cancel_seconds = Histogram("pltkit_cancel_seconds", "from a job's cancellation (disconnect, "
                                        "superseding request) to the worker being free",
                                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.state_bytes = Gauge("pltkit_state_bytes", "memory of the slots' and recent prompts' states",
                                 registry=r)
        self.queue = Gauge("pltkit_queue_depth", "jobs waiting for the decode worker", registry=r)
        self.busy = Gauge("pltkit_worker_busy", "1 while the decode worker runs a job", registry=r)

    def completion(self, r: Result) -> None:
        self.prompt_tokens.inc(r.tokens_evaluated)
        self.cached_tokens.inc(r.tokens_cached)
        self.predicted_tokens.inc(len(r.tokens))
        self.completions.labels(r.stop_type).inc()
        if r.tokens_cached:
            self.cache_hits.inc()
        if "prompt_ms" in r.timings:
            self.prompt_seconds.observe(r.timings["prompt_ms"] / 1e3)

    def text(self) -> bytes:
        return generate_latest(self.registry)
