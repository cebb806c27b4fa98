"""Prometheus metrics of one tier server: requests by code, latency, batch sizes, bytes, forwards.

``cartosplit_requests_total{tier, code}`` counts the requests the servicer answered and also the calls
refused before it ran (see :class:`RefusalCounter` and ``BearerTokenInterceptor(on_refusal=...)``):
``UNAUTHENTICATED`` (no or a wrong bearer token), ``INTERNAL`` (bytes that do not parse as the request
message; grpcio answers "Exception deserializing request!") and ``RESOURCE_EXHAUSTED`` (a unary request
over the message limit).

Audits (``InferRequest.audit``: samples already answered early, re-sent so the cloud's answer can be compared
with the early one) are not user traffic: ``cartosplit_audit_requests_total`` counts them instead of
``cartosplit_requests_total``, and on the edge ``cartosplit_audit_forwarded_total`` /
``cartosplit_audit_degraded_total`` instead of ``cartosplit_forwarded_total`` / ``cartosplit_degraded_total``.
A call refused before its message is read cannot be told apart and counts as user traffic. The latency
histogram and the received bytes count all traffic, audits included: they size the server's load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram


class TierMetrics:
    """Prometheus metrics in a registry of their own, so several servers can live in one process."""

    def __init__(self, tier: str, forwarding: bool = False) -> None:
        self.tier = tier
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "cartosplit_requests_total", "User requests (audits apart) by status code", ["tier", "code"], registry=reg
        )
        self.audits = Counter(
            "cartosplit_audit_requests_total",
            "Audit requests (re-sent samples, not user traffic) by status code",
            ["tier", "code"],
            registry=reg,
        )
        self.request_seconds = Histogram(
            "cartosplit_request_seconds",
            "Time from receiving a request to its answer (all traffic, audits included)",
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
            "cartosplit_received_bytes_total",
            "Serialized request bytes received (all traffic, audits included)",
            ["tier"],
            registry=reg,
        )
        if forwarding:
            self.forwarded = Counter(
                "cartosplit_forwarded_total", "User requests the edge sent on to the cloud", ["tier"], registry=reg
            )
            self.degraded = Counter(
                "cartosplit_degraded_total",
                "User requests' forwards that failed and were answered by the edge exit instead",
                ["tier"],
                registry=reg,
            )
            self.audit_forwarded = Counter(
                "cartosplit_audit_forwarded_total", "Audits the edge sent on to the cloud", ["tier"], registry=reg
            )
            self.audit_degraded = Counter(
                "cartosplit_audit_degraded_total",
                "Audits' forwards that failed (answered by the edge exit, so useless as audits)",
                ["tier"],
                registry=reg,
            )

    def observe(self, code: grpc.StatusCode, seconds: float, received: int, audit: bool = False) -> None:
        """One request the servicer answered or refused; an audit is counted apart from user requests."""
        (self.audits if audit else self.requests).labels(self.tier, code.name).inc()
        self.request_seconds.labels(self.tier).observe(seconds)
        self.received_bytes.labels(self.tier).inc(received)

    def batch_observer(self, graph: str) -> Callable[[int], None]:
        return self.batch_size.labels(self.tier, graph).observe

    def refused(self, code: grpc.StatusCode, received: int = 0) -> None:
        """A call refused before the servicer saw it: counted by code; no latency (nothing was served)."""
        self.requests.labels(self.tier, code.name).inc()
        if received:
            self.received_bytes.labels(self.tier).inc(received)


class RefusalCounter(grpc.ServerInterceptor):
    """Counts the tier service's calls that grpcio refuses before the servicer runs.

    - bytes that do not parse: the request deserializer is wrapped; its failure is counted as ``INTERNAL``
      (what grpcio answers) and re-raised, so the client sees what it always saw.
    - a unary request over ``grpc.max_receive_message_length``: grpc core answers RESOURCE_EXHAUSTED and drops
      the message, so neither the deserializer nor a unary handler ever runs and no end-of-call event reaches
      Python (measured on grpcio 1.85). A unary method is therefore served here as stream-unary: a unary
      client always sends exactly one message, so a stream that ends without one is a message core refused,
      counted as ``RESOURCE_EXHAUSTED``. For methods registered with ``add_registered_method_handlers`` (the
      generated stubs do) grpcio instead reports the call as cancelled before its message arrived, which a
      client cancelling that early would also look like (rare: a unary client sends its message with its
      headers); it is counted as ``RESOURCE_EXHAUSTED``, or ``DEADLINE_EXCEEDED`` once the deadline has passed.
      An oversize message inside ``InferStream`` ends the request iterator
      like a normal end of stream, so Python cannot tell it apart: not counted.

    Only methods under ``/<service_name>/`` are counted (not health checks or reflection). Bad-token calls are
    counted by the token interceptor's ``on_refusal`` (it sits before this one, so they never get here).
    """

    def __init__(self, metrics: TierMetrics, service_name: str) -> None:
        self.metrics = metrics
        self.prefix = f"/{service_name}/"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        undecodable: list[int] = []  # this call's (intercept_service runs once per call)
        deserializer = self._counting_deserializer(handler.request_deserializer, undecodable)
        if handler.request_streaming:
            return handler._replace(request_deserializer=deserializer)
        behavior = handler.unary_unary or handler.unary_stream
        one = self._first_message(behavior, undecodable)
        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(one, deserializer, handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(one, deserializer, handler.response_serializer)

    def _counting_deserializer(
        self, deserialize: Callable[[bytes], object] | None, undecodable: list[int]
    ) -> Callable[[bytes], object]:
        def counted(data: bytes) -> object:
            if deserialize is None:
                return data
            try:
                return deserialize(data)
            except Exception:
                undecodable.append(len(data))
                self.metrics.refused(grpc.StatusCode.INTERNAL, len(data))
                raise

        return counted

    def _first_message(
        self, behavior: Callable[[object, grpc.ServicerContext], object], undecodable: list[int]
    ) -> Callable:
        def serve(requests: Iterator[object], context: grpc.ServicerContext) -> object:
            try:
                request = next(requests)
            except StopIteration:  # core refused the one message (oversize); the client already has its status
                self.metrics.refused(grpc.StatusCode.RESOURCE_EXHAUSTED)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "the request message was refused by grpc")
            except grpc.RpcError:  # the call ended before its message arrived (registered methods: oversize)
                if not undecodable:  # (bytes that did not parse end it the same way: counted already)
                    remaining = context.time_remaining()
                    late = remaining is not None and remaining <= 0
                    self.metrics.refused(
                        grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.RESOURCE_EXHAUSTED
                    )
                raise
            return behavior(request, context)

        return serve
