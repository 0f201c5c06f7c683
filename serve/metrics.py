"""Prometheus metrics of an aggregator replica (``GET /metrics``): requests, tokens and latency, overall and per
deployment, plus the model replicas' memory as last reported.

Each aggregator replica exports its own counters (scrape every replica, or sum them in Prometheus); the
per-deployment series are measured where the calls are made, so they include Serve's routing and
transfer time.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pluristeer_requests", "HTTP requests", ["endpoint", "code"], registry=r)
        self.request_seconds = Histogram(
            "pluristeer_request_seconds", "HTTP request latency (to the first byte)", ["endpoint"],
            buckets=SECONDS, registry=r,
        )  # fmt: skip
        self.generation_seconds = Histogram(
            "pluristeer_generation_seconds", "whole generations, streamed or not", ["backend"], buckets=SECONDS,
            registry=r,
        )  # fmt: skip
        self.tokens = Counter("pluristeer_tokens", "prompt and completion tokens", ["kind", "backend"], registry=r)
        self.calls = Counter(
            "pluristeer_deployment_calls", "calls to a deployment by outcome", ["deployment", "outcome"], registry=r
        )
        self.call_seconds = Histogram(
            "pluristeer_deployment_call_seconds", "latency of one successful call to a deployment", ["deployment"],
            buckets=SECONDS, registry=r,
        )  # fmt: skip
        self.deployment_tokens = Counter(
            "pluristeer_deployment_tokens", "tokens a deployment's replicas ran (replays included)", ["deployment"],
            registry=r,
        )  # fmt: skip
        self.replays = Counter(
            "pluristeer_replays", "decoding steps that found no KV cache and replayed the prefix", ["deployment"],
            registry=r,
        )  # fmt: skip
        self.replica_rss = Gauge(
            "pluristeer_replica_rss_bytes", "resident memory of a model replica", ["deployment", "replica"], registry=r
        )
        self.replica_sessions = Gauge(
            "pluristeer_replica_sessions",
            "KV-cached sessions in a model replica",
            ["deployment", "replica"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["Metrics"]
