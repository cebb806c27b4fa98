"""What every tier server shares: configuration, request checks, dynamic batching, metrics, logs, lifecycle.

The cloud server is the plain tier (check, batch, run, answer); the edge server is the same tier plus an
exit decision and a forwarder, so it imports everything from here. Torch-free: numpy, onnxruntime, grpc.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from cartosplit.cloud_server.replay import ReplyCache
from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos.codec import PROTOCOL_VERSION, TensorError, decode_tensor
from cartosplit.protos.security import ServerSecurity

LOG = logging.getLogger("cartosplit.server")
SERVER_FORMATS = ("onnx-int8", "onnx-fp32")
BACKENDS = ("local", "ray")
# Below this much time left there is no point starting work: the reply could not arrive in time.
MIN_TIME_LEFT_S = 0.001
# grpc reports "no deadline" as a huge number of seconds rather than None.
_NO_DEADLINE_S = 1e9
_FLOAT_ENCODINGS = (pb.FP32, pb.FP16, pb.INT8)
_INT_ENCODINGS = (pb.INT64, pb.INT32)


# ----------------------------------------------------------------------------------------------- configuration


@dataclass
class ServerConfig:
    """How one tier server runs. ``port=0`` picks a free port (read it back from ``TierServer.port``)."""

    bundle: str | Path
    host: str = "127.0.0.1"  # loopback unless told otherwise: never expose a model by default
    port: int = 0
    fmt: str = "onnx-int8"
    max_batch: int = 16
    max_wait_ms: float = 5.0
    max_message_bytes: int = 16 * 1024 * 1024
    threads: int | None = None  # onnxruntime intra-op threads per graph; None = onnxruntime's default
    workers: int = 16  # grpc handler threads (and stream helper threads)
    metrics_port: int | None = None  # None = no HTTP endpoint; 0 = a free port (TierServer.metrics_port)
    grace_s: float = 5.0
    security: ServerSecurity | None = None  # TLS / mutual TLS / bearer token; None = plaintext, no auth
    # where the graphs run: "local" (onnxruntime in this process) or "ray" (a Ray Serve deployment; the extra
    # cartosplit[ray]). With "ray": ray_address None starts a local Ray, ray_config is a YAML/JSON file of
    # replicas, autoscaling and batching, ray_app attaches to an application someone else deployed (RayService).
    backend: str = "local"
    ray_address: str | None = None
    ray_config: str | Path | None = None
    ray_app: str | None = None

    def __post_init__(self) -> None:
        if self.fmt not in SERVER_FORMATS:
            raise ValueError(f"format {self.fmt!r} cannot be served; use one of {SERVER_FORMATS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is unknown; use one of {BACKENDS}")
        ray_settings = (self.ray_address, self.ray_config, self.ray_app)
        if self.backend != "ray" and any(v is not None for v in ray_settings):
            raise ValueError("--ray-address, --ray-config and --ray-app need --backend ray")
        if self.max_batch < 1 or self.max_wait_ms < 0 or self.workers < 1 or self.max_message_bytes < 1:
            raise ValueError("max_batch, workers and max_message_bytes must be >= 1 and max_wait_ms >= 0")
        if self.security is not None:
            self.security.check_host(self.host)  # a token without TLS: loopback only


def grpc_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits both ways; grpc itself then refuses bigger messages with RESOURCE_EXHAUSTED."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


# ----------------------------------------------------------------------------------------------------- logging


class JsonFormatter(logging.Formatter):
    """One JSON object per line; the fields passed to :func:`log_event` become keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "info") -> None:
    """Send the servers' logs to stderr as JSON lines (the CLI calls this; a library user may not want it)."""
    logger = logging.getLogger("cartosplit")
    if not any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def log_event(level: int, event: str, exc_info: bool = False, **fields: object) -> None:
    LOG.log(level, event, extra={"fields": fields}, exc_info=exc_info)


def short_id(request_id: str) -> str:
    """Request ids are client-chosen: cap what reaches the logs."""
    return request_id[:64]


# ------------------------------------------------------------------------------------------- request checking


class RequestError(Exception):
    """A request this tier refuses (or could not serve), with the grpc status code the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_envelope(request: pb.InferRequest, bundle_id: str, depths: Collection[int], tier: str) -> None:
    """Protocol version, bundle and depth: cheap checks before any tensor is decoded."""
    if request.protocol_version != PROTOCOL_VERSION:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {request.protocol_version} is not spoken here (this server speaks {PROTOCOL_VERSION})",
        )
    if request.bundle_id != bundle_id:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"bundle mismatch: the request was made for bundle {request.bundle_id[:12]!r}, "
            f"this server serves {bundle_id[:12]!r}",
        )
    if request.depth not in depths:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"depth {request.depth} is not served by the {tier} tier; it serves depths {sorted(depths)}",
        )
    # replies echo the id and the timings, and recent replies are cached: bound what a client can make us keep
    if len(request.request_id) > MAX_REQUEST_ID:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id is over {MAX_REQUEST_ID} characters")
    if len(request.timings) > MAX_TIMINGS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.timings)} timings: at most {MAX_TIMINGS} tiers"
        )


MAX_REQUEST_ID = 128
MAX_TIMINGS = 8


MAX_ACTIVATION = 1e4


def _check_dims(values: np.ndarray, name: str, limits: Sequence[tuple[int, int]]) -> None:
    """Each dimension within its bounds (the codec has checked rank, encoding, bytes and finiteness)."""
    for axis, (size, (low, high)) in enumerate(zip(values.shape, limits, strict=True)):
        if not low <= size <= high:
            bound = f"{low}" if low == high else f"in [{low}, {high}]"
            raise TensorError(f"{name}: dimension {axis} is {size}, must be {bound} (shape {list(values.shape)})")


def decode_hidden(tensor: pb.Tensor, hidden_size: int, max_length: int) -> np.ndarray:
    """An [S, H] hidden state as float32, 1 <= S <= max_length; FP32, FP16 or INT8 on the wire."""
    values = decode_tensor(tensor, "hidden", 2, _FLOAT_ENCODINGS, max_length * hidden_size)
    _check_dims(values, "hidden", [(1, max_length), (hidden_size, hidden_size)])
    # a layer's output is LayerNorm-scaled (|x| in the tens at most); far larger values only overflow later
    if np.abs(values).max() > MAX_ACTIVATION:
        raise TensorError(f"hidden: values beyond +-{MAX_ACTIVATION:g} are not activations of this model")
    return values


def decode_tokens(request: pb.InferRequest, vocab_size: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [S] in [0, vocab_size) and token_type_ids [S] in {0, 1} (zeros when absent), as int64."""
    ids = decode_tensor(request.input_ids, "input_ids", 1, _INT_ENCODINGS, max_length)
    outside = int(((ids < 0) | (ids >= vocab_size)).sum())
    if outside:  # the count, not the ids: error messages end up in logs, and ids are the user's text
        raise TensorError(f"input_ids: {outside} ids outside [0, {vocab_size})")
    if not request.HasField("token_type_ids"):
        return ids, np.zeros_like(ids)
    types = decode_tensor(request.token_type_ids, "token_type_ids", 1, _INT_ENCODINGS, max_length)
    _check_dims(types, "token_type_ids", [(len(ids), len(ids))])
    if not np.isin(types, (0, 1)).all():
        raise TensorError("token_type_ids: values must be 0 or 1")
    return ids, types


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits.astype(np.float64) - logits.max())
    return (shifted / shifted.sum()).astype(np.float32)


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else max(remaining, 0.0)


# --------------------------------------------------------------------------------------------------- batching


class BatcherClosed(RuntimeError):
    """Work submitted to a batcher that has stopped (the server is shutting down)."""


@dataclass
class BatchResult:
    outputs: list[np.ndarray]  # this sample's outputs, padding removed
    queue_ms: float  # from submit until its batch started
    compute_ms: float  # its share of the batch's model time
    batch_size: int


@dataclass
class _Item:
    arrays: tuple[np.ndarray, ...]
    future: concurrent.futures.Future
    enqueued: float = field(default_factory=time.perf_counter)


_STOP = object()


class GraphSession(Protocol):
    """What a batcher runs a padded batch on: onnxruntime here (OnnxSession) or a remote backend.

    ``run`` takes the inputs in ``input_names`` order and returns the graph's outputs in its order.
    A session may set ``max_in_flight`` > 1 (default 1) when it can usefully run several batches at once,
    e.g. a Ray deployment with several replicas.
    """

    input_names: list[str]

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]: ...


class GraphBackend(Protocol):
    """Where a tier's graphs run. ``open_graphs`` gets ``{graph: kind}`` and returns a session per graph."""

    name: str

    def open_graphs(
        self, bundle: Bundle, graphs: dict[str, str], fmt: str, threads: int | None, tier: str
    ) -> dict[str, GraphSession]: ...

    def close(self) -> None: ...


class LocalBackend:
    """The default backend: each graph in an onnxruntime session inside this process."""

    name = "local"

    def open_graphs(
        self, bundle: Bundle, graphs: dict[str, str], fmt: str, threads: int | None, tier: str
    ) -> dict[str, GraphSession]:
        return {graph: OnnxSession(bundle.graph_file(graph, fmt), threads) for graph in graphs}

    def close(self) -> None:
        pass


def open_backend(config: ServerConfig) -> GraphBackend:
    """The backend ``config.backend`` names; the Ray one is imported only when asked for (optional extra)."""
    if config.backend == "ray":
        from cartosplit.cloud_server.ray_backend import RayBackend

        return RayBackend(config.ray_address, config.ray_config, config.ray_app, config.max_batch)
    return LocalBackend()


class Batcher:
    """Dynamic batching for one graph: one worker thread pads queued samples and runs them together.

    ``kind`` is ``"hidden"`` (samples are ([S, H] float32,)) or ``"tokens"`` (([S] ids, [S] type ids)).
    A batch closes when it holds ``max_batch`` samples or ``max_wait_ms`` after its first sample arrived.
    When the session allows several batches at once (``max_in_flight`` > 1), closed batches run on helper
    threads so the worker can close the next one meanwhile; otherwise the worker runs each batch itself.
    """

    def __init__(
        self,
        session: GraphSession,
        max_batch: int,
        max_wait_ms: float,
        kind: str,
        name: str = "",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if kind not in ("hidden", "tokens"):
            raise ValueError(f"batcher kind must be 'hidden' or 'tokens', got {kind!r}")
        self.session, self.kind, self.name = session, kind, name
        self.max_batch, self.max_wait_s = max_batch, max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self.max_in_flight = max(1, int(getattr(session, "max_in_flight", 1)))
        self._in_flight = threading.BoundedSemaphore(self.max_in_flight)
        self._runners = (
            concurrent.futures.ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"batch-{name or kind}")
            if self.max_in_flight > 1
            else None
        )
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name or kind}", daemon=True)
        self._thread.start()

    def submit(self, *arrays: np.ndarray) -> concurrent.futures.Future:
        """Queue one sample; the future resolves to a :class:`BatchResult` or the batch's exception."""
        item = _Item(arrays, concurrent.futures.Future())
        with self._lock:  # so nothing slips in behind the stop marker
            if self._closed:
                raise BatcherClosed(f"batcher {self.name!r} is stopped")
            self._queue.put(item)
        return item.future

    def stop(self, timeout: float | None = None) -> None:
        """Finish the batches already queued, then end the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._runners is not None:  # the batches handed to helper threads finish too
            self._runners.shutdown(wait=True)

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._collect(first)
            if self._runners is None:
                self._run(batch)
            else:
                self._in_flight.acquire()  # at most max_in_flight batches out at once: back-pressure
                self._runners.submit(self._run_and_release, batch)

    def _run_and_release(self, batch: list[_Item]) -> None:
        try:
            self._run(batch)
        finally:
            self._in_flight.release()

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        batch = [first]
        close_at = first.enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            wait = close_at - time.perf_counter()
            try:
                # past the window, still take whatever is already waiting: it costs no latency
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _run(self, batch: list[_Item]) -> None:
        # a caller that gave up (deadline) cancelled its future: skip it rather than compute for nobody
        live = [item for item in batch if item.future.set_running_or_notify_cancel()]
        if not live:
            return
        started = time.perf_counter()
        try:
            outputs = self.session.run(self._pad(live))
        except Exception as exc:  # the worker must survive a failing batch
            for item in live:
                item.future.set_exception(exc)
            return
        compute_ms = (time.perf_counter() - started) * 1000.0 / len(live)
        if self._on_batch is not None:
            self._on_batch(len(live))
        for row, item in enumerate(live):
            length = len(item.arrays[0])
            mine = [np.array(out[row, :length] if out.ndim == 3 else out[row]) for out in outputs]
            queue_ms = (started - item.enqueued) * 1000.0
            item.future.set_result(BatchResult(mine, queue_ms, compute_ms, len(live)))

    def _pad(self, batch: list[_Item]) -> list[np.ndarray]:
        """Pad to the longest sample; the mask marks padding with zeros so the model ignores it."""
        lengths = [len(item.arrays[0]) for item in batch]
        longest = max(lengths)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, length in enumerate(lengths):
            mask[row, :length] = 1
        if self.kind == "hidden":
            hidden = np.zeros((len(batch), longest, batch[0].arrays[0].shape[1]), dtype=np.float32)
            for row, item in enumerate(batch):
                hidden[row, : lengths[row]] = item.arrays[0]
            feed = {"hidden_in": hidden, "attention_mask": mask}
        else:
            ids = np.zeros((len(batch), longest), dtype=np.int64)
            types = np.zeros_like(ids)
            for row, item in enumerate(batch):
                ids[row, : lengths[row]], types[row, : lengths[row]] = item.arrays
            feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return [feed[name] for name in self.session.input_names]


# ---------------------------------------------------------------------------------------------------- metrics


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


# -------------------------------------------------------------------------------------------------- servicers


class TierServicer:
    """The request path shared by every tier: deadline, checks, errors, metrics and logs around ``infer``.

    Subclasses implement :meth:`infer` (and mix in the generated ``...TierServicer`` for the service).
    """

    tier: int = pb.TIER_UNSPECIFIED
    tier_name: str = "tier"

    def __init__(self, bundle: Bundle, config: ServerConfig, metrics: TierMetrics) -> None:
        self.bundle, self.config, self.metrics = bundle, config, metrics
        model = bundle.manifest["model"]
        self.hidden_size = int(model["hidden_size"])
        if "vocab_size" not in model:  # bundles exported before the servers validated token ids
            raise ValueError("the bundle's manifest has no model.vocab_size: re-export it with `cartosplit export`")
        self.vocab_size = int(model["vocab_size"])
        self.max_length = int(model["max_length"])
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
        for graph, kind in kinds.items():
            self.batchers[graph] = Batcher(
                sessions[graph],
                self.config.max_batch,
                self.config.max_wait_ms,
                kind,
                name=graph,
                on_batch=self.metrics.batch_observer(graph),
            )

    def add_graph(self, graph: str, kind: str) -> None:
        self.add_graphs({graph: kind})

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
        self.metrics.observe(code, seconds, request.ByteSize())
        fields: dict[str, object] = {
            "tier": self.tier_name,
            "request_id": short_id(request.request_id),
            "depth": request.depth,
            "code": code.name,
            "ms": round(seconds * 1000.0, 3),
        }
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
            while (item := window.get()) is not _STOP:
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
            _put_unless(window, _STOP, done)


def _put_unless(target: queue.Queue, item: object, done: threading.Event) -> bool:
    """Put into a bounded queue, giving up once ``done`` is set (the reply side has finished)."""
    while not done.is_set():
        try:
            target.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def check_time(remaining: float | None) -> None:
    if remaining is not None and remaining < MIN_TIME_LEFT_S:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline too short or already passed")


def reply_from_logits(
    request: pb.InferRequest,
    logits: np.ndarray,
    tier: int,
    exit_depth: int,
    timing: pb.TierTiming,
    degraded: bool = False,
) -> pb.InferReply:
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


# ----------------------------------------------------------------------------------------------------- server


class TierServer:
    """A grpc server for one tier with health, reflection and (optionally) a Prometheus endpoint.

    The port is bound on construction, so ``.port`` is known before :meth:`start`.
    """

    def __init__(
        self,
        config: ServerConfig,
        servicer: TierServicer,
        add_to_server: Callable[[object, grpc.Server], None],
        service_name: str,
    ) -> None:
        self.config, self.servicer, self.service_name = config, servicer, service_name
        self.metrics = servicer.metrics
        self.health = health.HealthServicer()
        # so_reuseport off: a second server on a taken port must fail, not silently share it
        options = [*grpc_options(config.max_message_bytes), ("grpc.so_reuseport", 0)]
        self.security = config.security or ServerSecurity()
        try:  # the files are read now: a missing or wrong one stops the server before it listens
            credentials = self.security.server_credentials()
            interceptors = self.security.interceptors()
        except ValueError:
            servicer.close()
            raise
        self._server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix=f"{servicer.tier_name}-grpc"),
            options=options,
            interceptors=interceptors,
        )
        add_to_server(servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        address = format_address(config.host, config.port)
        try:
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
        except RuntimeError as exc:
            servicer.close()
            hint = " (or the TLS certificate and key do not match)" if credentials is not None else ""
            raise OSError(f"cannot listen on {address}{hint}: {exc}") from None
        self.host = config.host
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def start(self) -> TierServer:
        self._server.start()
        if self.config.metrics_port is not None:
            httpd, _ = start_http_server(self.config.metrics_port, addr=self.host, registry=self.metrics.registry)
            self._metrics_http, self.metrics_port = httpd, httpd.server_port
        for name in ("", self.service_name):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log_event(
            logging.INFO,
            "started",
            tier=self.servicer.tier_name,
            address=self.address,
            bundle_id=self.servicer.bundle.bundle_id[:12],
            format=self.config.fmt,
            backend=self.config.backend,
            metrics_port=self.metrics_port,
            security=self.security.mode,  # the mode only, never a secret
        )
        if self.security.token_file is not None and not self.security.tls:
            log_event(
                logging.WARNING,
                "token_without_tls",
                tier=self.servicer.tier_name,
                address=self.address,
                detail="the bearer token travels in plaintext; allowed on loopback only, use --tls-cert/--tls-key",
            )
        return self

    def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight requests finish (up to ``grace`` s), then stop the models."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        grace = self.config.grace_s if grace is None else grace
        log_event(logging.INFO, "stopping", tier=self.servicer.tier_name, grace_s=grace)
        self.health.enter_graceful_shutdown()
        self._server.stop(grace).wait()
        self.servicer.close()  # after the grpc server: in-flight requests still need their batchers
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log_event(logging.INFO, "stopped", tier=self.servicer.tier_name)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped (True) or ``timeout`` passed (False)."""
        return self._server.wait_for_termination(timeout)

    def __enter__(self) -> TierServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -------------------------------------------------------------------------------------------------------- CLI


def add_common_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--bundle", required=True, help="the bundle folder (cartosplit export)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port (default {default_port}; 0 = any)")
    parser.add_argument("--format", dest="fmt", choices=SERVER_FORMATS, default="onnx-int8", help="graph format")
    parser.add_argument("--max-batch", type=int, default=16, help="most samples per model run (default 16)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long the first request of a batch waits for others (default 5 ms)",
    )
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per graph")
    parser.add_argument("--workers", type=int, default=16, help="grpc handler threads (default 16)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    parser.add_argument("--max-message-mb", type=float, default=16.0, help="largest message accepted (default 16)")
    parser.add_argument("--grace-s", type=float, default=5.0, help="time in-flight requests get on shutdown")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain); needs --tls-key")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="mutual TLS: require client certificates signed by this CA (needs --tls-cert/--tls-key)",
    )
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="require 'authorization: Bearer <token>' on every call but health checks; the file holds the "
        "token (a file, not the token itself, so it never shows in ps). Needs TLS unless --host is loopback",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    scale = parser.add_argument_group("scale-out on Ray Serve (needs: pip install 'cartosplit[ray]')")
    scale.add_argument(
        "--backend",
        choices=BACKENDS,
        default="local",
        help="where the graphs run: local = onnxruntime in this process (default); ray = a Ray Serve "
        "deployment (replicas, autoscaling) behind this server, which keeps checks, TLS, auth and health",
    )
    scale.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster ('auto', HOST:PORT or ray://HOST:10001); default: start a local Ray "
        "and shut it down on exit",
    )
    scale.add_argument(
        "--ray-config",
        metavar="FILE",
        help="YAML or JSON: num_replicas, autoscaling_config, max_batch_size, batch_wait_timeout_s, num_cpus, "
        "ray_actor_options, ... (docs/scaling.md)",
    )
    scale.add_argument(
        "--ray-app",
        metavar="NAME",
        help="use this already-deployed Serve application (e.g. from a KubeRay RayService) instead of "
        "deploying one; it must serve the same bundle",
    )


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        bundle=args.bundle,
        host=args.host,
        port=args.port,
        fmt=args.fmt,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_message_bytes=int(args.max_message_mb * 1024 * 1024),
        threads=args.threads,
        workers=args.workers,
        metrics_port=args.metrics_port,
        grace_s=args.grace_s,
        security=security_from_args(args),
        backend=args.backend,
        ray_address=args.ray_address,
        ray_config=args.ray_config,
        ray_app=args.ray_app,
    )


def security_from_args(args: argparse.Namespace) -> ServerSecurity | None:
    """--tls-cert/--tls-key/--tls-client-ca/--token-file as a ServerSecurity; None when none is given."""
    files = {
        "cert_file": args.tls_cert,
        "key_file": args.tls_key,
        "client_ca_file": args.tls_client_ca,
        "token_file": args.token_file,
    }
    return None if all(f is None for f in files.values()) else ServerSecurity(**files)


def release_large_buffers_to_the_os() -> None:
    """Serve multi-MiB allocations (near-limit messages) with mmap, so freeing them returns the memory.

    glibc otherwise keeps freed 16 MiB request buffers in its per-thread heaps: measured under fuzzing,
    +184 MiB (cloud) and +113 MiB (edge) of RSS that never went back (benchmarks/results/README.md).
    Not glibc: nothing to tune.
    """
    try:
        import ctypes

        m_mmap_threshold = -3  # from malloc.h
        ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 1 << 20)
    except (OSError, AttributeError):
        pass


def run_until_signal(server: TierServer, banner: str) -> int:
    """Start, print ``banner`` once ready, serve until SIGTERM/SIGINT, then stop gracefully."""
    release_large_buffers_to_the_os()
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log_event(logging.INFO, "signal", signal=signal.Signals(signum).name)
        stop_requested.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():  # signal handlers only work there
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        print(banner, flush=True)
        while not stop_requested.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def parse_alpha(text: str) -> float:
    """A confidence threshold: a number in [0, 1], or 'inf' (never exit here)."""
    value = float(text)
    if not (0.0 <= value <= 1.0 or math.isinf(value)):
        raise argparse.ArgumentTypeError(f"threshold must be in [0, 1] or inf, got {text}")
    return value
