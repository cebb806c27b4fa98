"""Prometheus metrics of one tier server: requests by code, latency, batch sizes, bytes, forwards."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram


class TierMetrics:
    """Prometheus metrics in a registry of their own, so several servers can live in one process."""

    def __init__(self, tier: str, forwarding: bool = False) -> None:
        self.tier = tier
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter("cartosplit_requests_total", "Requests by status code", ["tier", "code"], registry=reg)
        self.request_seconds = Histogram(
            "cartosplit_request_seconds",
            "Time from receiving a request to its answer",
            ["tier"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=reg,
        )
        self.batch_size = Histogram(
            "cartosplit_batch_size",
            "Samples per model run",
            ["tier", "graph"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=reg,
        )
        self.received_bytes = Counter(
            "cartosplit_received_bytes_total", "Serialized request bytes received", ["tier"], registry=reg
        )
        if forwarding:
            self.forwarded = Counter(
                "cartosplit_forwarded_total", "Requests the edge sent on to the cloud", ["tier"], registry=reg
            )
            self.degraded = Counter(
                "cartosplit_degraded_total",
                "Forwards that failed and were answered by the edge exit instead",
                ["tier"],
                registry=reg,
            )

    def observe(self, code: grpc.StatusCode, seconds: float, received: int) -> None:
        self.requests.labels(self.tier, code.name).inc()
        self.request_seconds.labels(self.tier).observe(seconds)
        self.received_bytes.labels(self.tier).inc(received)

    def batch_observer(self, graph: str) -> Callable[[int], None]:
        return self.batch_size.labels(self.tier, graph).observe
