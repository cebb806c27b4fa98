"""The request path every tier shares: deadline, checks, reply cache, errors, metrics and logs around ``infer``.

A tier subclasses :class:`TierServicer`, opens its graphs with ``add_graphs`` and implements ``infer``; this
base turns every outcome into a reply or a grpc status, for unary calls and streams alike.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import numpy as np

from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.manifest import ONNX_INT8
from cartosplit.device_runtime.numerics import softmax
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos.codec import TensorError
from cartosplit.serving.backends import open_backend
from cartosplit.serving.batching import Batcher, BatcherClosed, BatchResult
from cartosplit.serving.checks import RequestError, check_time, time_left
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.logs import log_event, short_id
from cartosplit.serving.metrics import TierMetrics
from cartosplit.serving.replay import ReplyCache

_END_OF_STREAM = object()


class TierServicer:
    """The request path shared by every tier: deadline, checks, errors, metrics and logs around ``infer``.

    Subclasses implement :meth:`infer` (and mix in the generated ``...TierServicer`` for the service).
    """

    tier: int = pb.TIER_UNSPECIFIED
    tier_name: str = "tier"

    def __init__(self, bundle: Bundle, config: ServerConfig, metrics: TierMetrics) -> None:
        bundle.require_tier(self.tier_name)  # a full bundle, or a tier bundle cut for this tier
        self.bundle, self.config, self.metrics = bundle, config, metrics
        model = bundle.manifest.model
        self.hidden_size = model.hidden_size
        if model.vocab_size is None:  # bundles exported before the servers validated token ids
            raise ValueError("the bundle's manifest has no model.vocab_size: re-export it with `cartosplit export`")
        self.vocab_size = model.vocab_size
        self.max_length = model.max_length
        self.split = bundle.split_points
        self.batchers: dict[str, Batcher] = {}
        self.backend = open_backend(config)  # where the graphs run (a Ray backend connects in add_graphs)
        self.replies = ReplyCache()  # a retried request (same id and payload) is answered, not recomputed
        # streams hand each request to this pool so that one stream can fill a batch
        self._stream_pool = concurrent.futures.ThreadPoolExecutor(
            config.workers, thread_name_prefix=f"{self.tier_name}-stream"
        )

    # ----- graphs
    def add_graphs(self, kinds: dict[str, str]) -> None:
        """Open ``{graph: kind}`` on the backend (all at once: a Ray backend deploys them as one application)."""
        sessions = self.backend.open_graphs(self.bundle, kinds, self.config.fmt, self.config.threads, self.tier_name)
        max_batch = self.batch_limit()
        for graph, kind in kinds.items():
            self.batchers[graph] = Batcher(
                sessions[graph],
                max_batch,
                self.config.max_wait_ms,
                kind,
                name=graph,
                on_batch=self.metrics.batch_observer(graph),
            )

    def batch_limit(self) -> int:
        """``max_batch``, except 1 for dynamic int8 (bundles exported before static int8): its activation scale
        is taken per batch, so batching would make an answer depend on the other requests in its batch."""
        info = self.bundle.manifest.formats.get(self.config.fmt)
        if self.config.fmt == ONNX_INT8 and not getattr(info, "batch_independent", True) and self.config.max_batch > 1:
            log_event(
                logging.WARNING,
                "batching_off",
                tier=self.tier_name,
                reason="dynamic int8: answers would depend on the batch; re-export for static int8",
            )
            return 1
        return self.config.max_batch

    def run_graph(self, graph: str, arrays: tuple[np.ndarray, ...], context: grpc.ServicerContext) -> BatchResult:
        """One sample through ``graph`` via its batcher, waiting no longer than the client's deadline."""
        remaining = time_left(context)
        check_time(remaining)
        try:
            future = self.batchers[graph].submit(*arrays)
        except BatcherClosed:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"the {self.tier_name} tier is shutting down") from None
        try:
            return future.result(timeout=remaining)
        except concurrent.futures.TimeoutError:
            future.cancel()  # if still queued, the batcher skips it
            raise RequestError(
                grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while waiting for the model"
            ) from None

    def timing(self, result: BatchResult) -> pb.TierTiming:
        return pb.TierTiming(tier=self.tier, compute_ms=result.compute_ms, queue_ms=result.queue_ms)

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.stop()
        self._stream_pool.shutdown(wait=False, cancel_futures=True)
        self.backend.close()  # after the batchers: their last batches still need it

    # ----- the request path
    def infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:
        raise NotImplementedError

    def serve_one(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply | RequestError:
        """Answer one request or say why not; never raises, so one bad request cannot hurt the server."""
        started = time.perf_counter()
        outcome: pb.InferReply | RequestError
        key = self.replies.key(request)
        try:
            check_time(time_left(context))
            outcome = self.replies.get(key) or self.infer(request, context)
            self.replies.put(key, outcome)
        except RequestError as exc:
            outcome = exc
        except TensorError as exc:
            outcome = RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            log_event(
                logging.ERROR,
                "internal_error",
                exc_info=True,
                tier=self.tier_name,
                request_id=short_id(request.request_id),
            )
            outcome = RequestError(
                grpc.StatusCode.INTERNAL, f"internal error in the {self.tier_name} tier: {type(exc).__name__}"
            )
        self._record(request, outcome, time.perf_counter() - started)
        return outcome

    def _record(self, request: pb.InferRequest, outcome: pb.InferReply | RequestError, seconds: float) -> None:
        code = outcome.code if isinstance(outcome, RequestError) else grpc.StatusCode.OK
        self.metrics.observe(code, seconds, request.ByteSize(), audit=request.audit)
        fields: dict[str, object] = {
            "tier": self.tier_name,
            "request_id": short_id(request.request_id),
            "depth": request.depth,
            "code": code.name,
            "ms": round(seconds * 1000.0, 3),
        }
        if request.audit:  # only then, so user traffic's lines stay as they were
            fields["audit"] = True
        if isinstance(outcome, RequestError):
            log_event(logging.WARNING, "request_refused", message=outcome.message[:300], **fields)
        else:
            fields.update(answered_by=pb.Tier.Name(outcome.tier), degraded=outcome.degraded)
            log_event(logging.INFO, "request", **fields)

    # ----- the two RPCs
    def Infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:
        outcome = self.serve_one(request, context)
        if isinstance(outcome, RequestError):
            context.abort(outcome.code, outcome.message)
        return outcome

    def InferStream(
        self, request_iterator: Iterator[pb.InferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.InferReply]:
        """Replies in request order; requests are served concurrently so a stream fills batches.

        The reply message has no status of its own, so the first refused request ends the stream with its
        code (its request id in the message); the replies before it have been sent.
        """
        window: queue.Queue = queue.Queue(maxsize=2 * self.config.max_batch)  # back-pressure on a fast client
        done = threading.Event()
        reader = threading.Thread(target=self._read_stream, args=(request_iterator, context, window, done), daemon=True)
        reader.start()
        try:
            while (item := window.get()) is not _END_OF_STREAM:
                request, future = item
                try:
                    outcome = future.result()
                except concurrent.futures.CancelledError:  # the server closed while this request waited
                    outcome = RequestError(grpc.StatusCode.UNAVAILABLE, f"the {self.tier_name} tier is shutting down")
                if isinstance(outcome, RequestError):
                    context.abort(outcome.code, f"request {short_id(request.request_id)!r}: {outcome.message}")
                yield outcome
        finally:
            done.set()

    def _read_stream(
        self,
        request_iterator: Iterator[pb.InferRequest],
        context: grpc.ServicerContext,
        window: queue.Queue,
        done: threading.Event,
    ) -> None:
        try:
            for request in request_iterator:
                future = self._stream_pool.submit(self.serve_one, request, context)
                if not _put_unless(window, (request, future), done):
                    return
        except Exception:  # the client went away or the stream was cancelled: nothing left to answer
            pass
        finally:
            _put_unless(window, _END_OF_STREAM, done)


def _put_unless(target: queue.Queue, item: object, done: threading.Event) -> bool:
    """Put into a bounded queue, giving up once ``done`` is set (the reply side has finished)."""
    while not done.is_set():
        try:
            target.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def reply_from_logits(
    request: pb.InferRequest,
    logits: np.ndarray,
    tier: int,
    exit_depth: int,
    timing: pb.TierTiming,
    degraded: bool = False,
) -> pb.InferReply:
    """The reply for one exit's logits [K]: label, probabilities and this tier's timing after the earlier ones."""
    probs = softmax(logits)
    if not np.isfinite(probs).all():  # never answer OK with NaN: the caller sent activations the model cannot use
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, "hidden: the model produced non-finite outputs for these activations"
        )
    return pb.InferReply(
        request_id=request.request_id,
        label=int(np.argmax(probs)),
        probabilities=probs.tolist(),
        tier=tier,
        exit_depth=exit_depth,
        timings=[*request.timings, timing],
        degraded=degraded,
    )
