"""The device side: tokenize, run the device graphs and the router, answer or offload, never lose an input.

Per input, following the bundle's calibrated policy (see ``cartosplit.device_runtime.policy``):
- router says hard (P(hard) >= hard_margin): send the hidden state at depth r (or, for r = 0, the tokens)
  straight to the cloud;
- else finish the device slice; answer here if the device exit is confident (and the router did not
  flag the input medium), else send the hidden state at depth d to the edge, which answers or forwards.

Fallback: edge unreachable or too slow -> the cloud (from depth r, or from tokens); cloud unreachable too
-> the device's own exit, marked ``degraded``. A tier that failed is skipped for ``retry_after_s`` so
that a dead server costs one timeout, not one per input. Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cartosplit.device_runtime.bundle import ONNX_FP32, ONNX_INT8, TFLITE_FP32, TFLITE_INT8, Bundle, load_bundle
from cartosplit.device_runtime.costs import (
    TIER_CLOUD_DIRECT,
    TIER_CLOUD_VIA_EDGE,
    TIER_DEVICE,
    TIER_EDGE,
    TIER_NAMES,
)
from cartosplit.device_runtime.cpu_features import AUTO, choose_format, passed_formats, read_advice, read_cpu_features
from cartosplit.device_runtime.inputs import text_problem
from cartosplit.device_runtime.numerics import softmax
from cartosplit.device_runtime.policy import Policy, device_decision, leaves_for_cloud
from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch
from cartosplit.protos import tiers_pb2 as pb

if TYPE_CHECKING:  # grpc is only needed once a tier is configured
    from cartosplit.device_runtime.audit import AuditMonitor, AuditSettings
    from cartosplit.device_runtime.audit_worker import AuditJob
    from cartosplit.protos.security import ClientSecurity

# the proto's Tier enum, by number, as Prediction.tier names them: TIER_UNSPECIFIED -> "unspecified", EDGE -> "edge"
TIER_LABELS = {tier.number: tier.name.lower().removeprefix("tier_") for tier in pb.Tier.DESCRIPTOR.values}
# the model reads at most max_length tokens; a far longer text only costs tokenizer time and memory
MAX_CHARS = 100_000


@dataclass
class Prediction:
    label: str
    label_id: int
    score: float  # probability of the label, at the exit that answered
    probabilities: list[float]
    tier: str  # device / edge / cloud
    route: str  # costs.TIER_NAMES: device, edge, cloud_via_edge, cloud_direct
    exit_depth: int
    degraded: bool  # a tier the policy wanted was unreachable; an earlier exit answered
    latency_ms: float
    bytes_sent: int
    cost: float  # the bundle's cost profile for this route (what calibration optimised)
    tier_ms: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class DeviceGraphs:
    """device_head and device_tail on onnxruntime (exact length) or LiteRT (padded to a bucket).

    ``low_memory``: False (onnxruntime's settings), True (the low-memory ones), or a preset name of
    ``onnx_backend.MEMORY_PRESETS`` (``cartosplit bench device --memory`` measures them one by one).
    """

    def __init__(self, bundle: Bundle, fmt: str, threads: int | None, low_memory: bool | str = False) -> None:
        self.fmt = fmt
        if fmt.startswith("onnx"):
            from cartosplit.device_runtime.onnx_backend import OnnxSession, memory_preset

            self.memory = memory_preset(low_memory)
            self.head = OnnxSession(bundle.graph_file("device_head", fmt), threads, self.memory)
            self.tail = OnnxSession(bundle.graph_file("device_tail", fmt), threads, self.memory)
            self.buckets = None
        else:
            from cartosplit.device_runtime.litert_backend import LiteRTSession, memory_preset

            self.memory = memory_preset(low_memory)
            self.buckets = sorted(bundle.manifest.formats[fmt].buckets)
            self.sessions = {
                (name, b): LiteRTSession(bundle.graph_file(name, fmt, b), threads, self.memory)
                for name in ("device_head", "device_tail")
                for b in self.buckets
            }

    def run_head(self, tokens: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Router logits [3] and the hidden state at depth r, trimmed to the real tokens [S, H]."""
        length = tokens["input_ids"].shape[1]
        inputs = [tokens["input_ids"], tokens["attention_mask"], tokens["token_type_ids"]]
        if self.buckets is None:
            router_logits, hidden = self.head.run(inputs)
        else:
            from cartosplit.device_runtime.buckets import bucket_for, pad_to

            self._bucket = bucket_for(length, self.buckets)
            inputs = [pad_to(x, self._bucket) for x in inputs]
            router_logits, hidden = self.sessions[("device_head", self._bucket)].run(inputs)
        return router_logits[0], hidden[0, :length]

    def run_tail(self, hidden_r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hidden state at depth d [S, H] and the device exit's logits [K]."""
        length = hidden_r.shape[0]
        mask = np.ones((1, length), dtype=np.int64)
        if self.buckets is None:
            hidden, logits = self.tail.run([hidden_r[None], mask])
        else:
            from cartosplit.device_runtime.buckets import pad_to

            session = self.sessions[("device_tail", self._bucket)]
            hidden, logits = session.run([pad_to(hidden_r[None], self._bucket), pad_to(mask, self._bucket)])
        return hidden[0, :length], logits[0]


class _Tier:
    """A gRPC client for the edge or the cloud, with a short memory of failures."""

    def __init__(
        self,
        address: str,
        service: str,
        max_message_bytes: int,
        retry_after_s: float,
        security: ClientSecurity | None = None,
    ) -> None:
        import grpc

        from cartosplit.protos import tiers_pb2_grpc

        self.address = address
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if security is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:  # TLS / mutual TLS / bearer token; ValueError for an unreadable file or a plaintext token
            self.channel = security.channel(address, options=options)
        stub_class = tiers_pb2_grpc.EdgeTierStub if service == "edge" else tiers_pb2_grpc.CloudTierStub
        self.stub = stub_class(self.channel)
        self.retry_after_s = retry_after_s
        self.down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def infer(self, request, timeout_s: float):
        """One call within ``timeout_s``, retried at most once, and only when the connection failed
        (UNAVAILABLE: the server never saw it). The retry resends the same request id, which the
        servers answer from their reply cache, so it is idempotent. A deadline is not retried here:
        a slow or frozen tier is left for the next one."""
        import grpc

        deadline = time.monotonic() + timeout_s
        for attempt in range(2):
            try:
                return self.stub.Infer(request, timeout=max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as exc:
                again = attempt == 0 and exc.code() == grpc.StatusCode.UNAVAILABLE
                if not again or deadline - time.monotonic() < 0.1:
                    self.down_until = time.monotonic() + self.retry_after_s
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")  # the loop returns or raises

    def close(self) -> None:
        self.channel.close()


class DeviceRuntime:
    """Run a bundle on the device, offloading to an edge and a cloud server as the policy says.

    ``backend``: "onnxruntime" or "litert"; ``fmt`` picks the graph format (default: int8 of that backend
    when the bundle has it). ``fmt="auto"`` picks it from this CPU's features and the formats the bundle holds
    that passed validation (``cpu_features.choose_format``; the backend follows the format), or from
    ``advice``, a ``cartosplit bench device`` result measured on this machine; ``format_reason`` says why.
    ``low_memory``: onnxruntime without its memory arena and memory-pattern planner (see
    ``onnx_backend.MEMORY_PRESETS``; LiteRT: ``litert_backend``). ``edge``/``cloud``: "host:port" or None.
    ``security``: TLS (CA), client certificate and bearer token for both links, edge and cloud alike: one
    deployment, one CA and one token (the cloud accepts a single token, from the edge and the device both).
    ``audit``: audit sampling and threshold adaptation (``cartosplit.device_runtime.audit``; None or rate 0:
    off), its state kept atomically at ``audit_state`` (resumed from there at start). ``policy``: thresholds
    to use instead of the bundle's (e.g. recalibrated on in-domain traffic); audits adapt from them.
    """

    def __init__(
        self,
        bundle: str | Path | Bundle,
        edge: str | None = None,
        cloud: str | None = None,
        backend: str = "onnxruntime",
        fmt: str | None = None,
        threads: int | None = None,
        timeout_s: float = 2.0,
        encoding: str = "fp16",
        max_message_bytes: int = 16 << 20,
        retry_after_s: float = 5.0,
        security: ClientSecurity | None = None,
        low_memory: bool | str = False,
        advice: str | Path | None = None,
        audit: AuditSettings | None = None,
        audit_state: str | Path | None = None,
        policy: Policy | None = None,
    ) -> None:
        from cartosplit.protos.codec import ENCODINGS

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.bundle.require_tier("device")  # a full or a device tier bundle; an edge or cloud one is refused
        m = self.bundle.manifest
        if backend not in ("onnxruntime", "litert"):
            raise ValueError(f"backend must be 'onnxruntime' or 'litert', got {backend!r}")
        formats = m.formats
        self.format_reason = "given"
        if fmt == AUTO:
            choice = choose_format(
                passed_formats(m), read_cpu_features(), read_advice(advice) if advice is not None else None
            )
            fmt, self.format_reason = choice.format, choice.reason
        elif advice is not None:
            raise ValueError("advice is read only with fmt='auto'")
        if fmt is None:
            self.format_reason = f"default: int8 of {backend} when the bundle has it"
            preferred = (ONNX_INT8, ONNX_FP32) if backend == "onnxruntime" else (TFLITE_INT8, TFLITE_FP32)
            fmt = next((f for f in preferred if f in formats), None)
            if fmt is None:
                raise ValueError(f"bundle has no {backend} graphs (formats: {sorted(formats)})")
        elif fmt not in formats:
            raise ValueError(f"bundle has no {fmt} graphs (formats: {sorted(formats)})")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
        self.encoding = ENCODINGS[encoding]
        self.fmt = fmt
        self.graphs = DeviceGraphs(self.bundle, fmt, threads, low_memory)
        self.tokenizer = load_tokenizer(self.bundle.path(m.tokenizer), m.model.max_length)
        self.policy = m.policy if policy is None else policy
        self.split = m.split_points
        self.costs = m.cost_profile.tier_costs(self.split)
        self.all_cloud_cost = m.cost_profile.all_cloud_cost(self.split)
        self.labels = m.model.labels
        self.timeout_s = timeout_s
        self.edge = _Tier(edge, "edge", max_message_bytes, retry_after_s, security) if edge else None
        self.cloud = _Tier(cloud, "cloud", max_message_bytes, retry_after_s, security) if cloud else None
        self.monitor: AuditMonitor | None = None
        self._auditor = None
        if audit is not None and audit.enabled:
            self._start_audits(audit, audit_state, max_message_bytes, retry_after_s, security)

    def _start_audits(self, settings, state_path, max_message_bytes, retry_after_s, security) -> None:
        from cartosplit.device_runtime import audit_state
        from cartosplit.device_runtime.audit import AuditMonitor
        from cartosplit.device_runtime.audit_worker import AuditWorker

        self.audit_resume_note = None
        state = None
        if state_path is not None:
            loaded = audit_state.load(state_path)
            state, self.audit_resume_note = loaded.state, loaded.reason
            first_run = not Path(state_path).exists() and not audit_state.prev_path(state_path).exists()
            if first_run:  # nothing to resume is not news
                self.audit_resume_note = None
        # the saved state resumes only under the same bundle, shipped thresholds and promise
        thresholds = hashlib.sha256(json.dumps(self.policy.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
        promise = f"{settings.epsilon:g}:{settings.alpha:g}:{settings.delta:g}:{settings.path_steps}"
        anchor_id = f"{self.bundle.bundle_id}:{thresholds}:{promise}"
        if state is not None and state.anchor_id != anchor_id:
            self.audit_resume_note = f"starting fresh: the saved audit state is for {state.anchor_id}, not {anchor_id}"
            state = None
        self.monitor = AuditMonitor(self.policy, settings, self.costs, anchor_id, state)
        # a channel of its own: a failed audit never marks the user path's edge down
        self._audit_edge = (
            _Tier(self.edge.address, "edge", max_message_bytes, retry_after_s, security) if self.edge else None
        )
        self._auditor = AuditWorker(self.monitor, self._send_audit, state_path, settings.queue_size)

    def _send_audit(self, job: AuditJob):
        """The audit request: the hidden state at the device depth to the edge, marked, within the timeout."""
        tier = self._audit_edge
        if tier is None:
            raise ConnectionError("no edge to audit through")
        if not (tier.available and self.edge.available):
            raise ConnectionError("edge down")
        if self.cloud is not None and not self.cloud.available:  # the user path just found it down
            raise ConnectionError("cloud down")
        request = self._request(self.split.device, hidden=job.hidden)
        request.audit = True
        return tier.infer(request, self.timeout_s), request.ByteSize()

    @property
    def current_policy(self):
        """The policy in force: the bundle's, or where audits moved it (``audit.AuditMonitor``)."""
        return self.policy if self.monitor is None else self.monitor.policy

    def audit_summary(self) -> dict | None:
        """The live bound, the audits' counts and cost; None when audits are off."""
        if self.monitor is None:
            return None
        summary = self.monitor.summary()
        summary["pending"] = self._auditor.pending
        return summary

    # -- requests -------------------------------------------------------------------------------------------

    def _request(self, depth: int, hidden: np.ndarray | None = None, tokens: dict | None = None):
        from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor

        request = pb.InferRequest(
            request_id=uuid.uuid4().hex,
            bundle_id=self.bundle.bundle_id,
            protocol_version=PROTOCOL_VERSION,
            depth=depth,
        )
        if hidden is not None:
            request.hidden.CopyFrom(encode_tensor(hidden, self.encoding))
        else:
            request.input_ids.CopyFrom(encode_tensor(tokens["input_ids"][0], pb.INT32))
            request.token_type_ids.CopyFrom(encode_tensor(tokens["token_type_ids"][0], pb.INT32))
        return request

    def _send(self, tier: _Tier | None, request, result: dict) -> object | None:
        """One call; None (and the error noted) when the tier is absent, known down, or fails."""
        if tier is None:
            return None
        if not tier.available:
            result["errors"].append(f"{tier.address} skipped: failed less than {tier.retry_after_s:.0f} s ago")
            return None
        size = request.ByteSize()
        try:
            reply = tier.infer(request, self.timeout_s)
        except Exception as exc:  # grpc.RpcError mostly; any failure means: try the next tier
            code = getattr(exc, "code", lambda: None)()
            result["errors"].append(f"{tier.address}: {getattr(code, 'name', type(exc).__name__)}")
            result["bytes_sent"] += size  # it left the device all the same
            return None
        result["bytes_sent"] += size
        return reply

    def _cloud_direct(self, hidden_r: np.ndarray, tokens: dict, result: dict):
        r = self.split.router_depth
        request = self._request(r, hidden=hidden_r) if r > 0 else self._request(0, tokens=tokens)
        return self._send(self.cloud, request, result)

    # -- one input ------------------------------------------------------------------------------------------

    def _predict_one(self, encoded: tuple[list[int], list[int]]) -> Prediction:
        started = time.perf_counter()
        result = {"errors": [], "bytes_sent": 0}
        tokens = pad_batch([encoded])
        router_logits, hidden_r = self.graphs.run_head(tokens)
        router = softmax(router_logits)
        device_ms = 0.0
        reply, route, wanted = None, None, None
        probs_device = None
        policy = self.current_policy
        audited = self.monitor is not None and self.monitor.sample()
        hidden_d = None

        if leaves_for_cloud(policy, router):
            wanted = TIER_CLOUD_DIRECT
            device_ms = 1000 * (time.perf_counter() - started)
            reply = self._cloud_direct(hidden_r, tokens, result)
            if reply is not None:
                route = TIER_CLOUD_DIRECT
        if route is None:
            tail_started = time.perf_counter()
            hidden_d, device_logits = self.graphs.run_tail(hidden_r)
            device_ms += 1000 * (time.perf_counter() - (tail_started if wanted is not None else started))
            probs_device = softmax(device_logits)
            # TIER_DEVICE only where the router did not send the sample to the cloud (wanted is None then)
            if device_decision(policy, router, probs_device) == TIER_DEVICE:
                route = wanted = TIER_DEVICE
            else:
                wanted = wanted if wanted is not None else TIER_EDGE
                to_edge = self._request(self.split.device, hidden=hidden_d)
                to_edge.alpha_edge = policy.alpha_edge  # where audits moved it; the edge never goes below its own
                reply = self._send(self.edge, to_edge, result)
                if reply is not None:
                    route = TIER_EDGE if reply.tier == pb.EDGE else TIER_CLOUD_VIA_EDGE
                elif wanted != TIER_CLOUD_DIRECT:  # edge down: the cloud from depth r (or tokens)
                    reply = self._cloud_direct(hidden_r, tokens, result)
                    if reply is not None:
                        route = TIER_CLOUD_DIRECT
                if reply is None:
                    route = TIER_DEVICE

        if reply is not None:
            probabilities = np.asarray(reply.probabilities, dtype=np.float32)
            tier, exit_depth = TIER_LABELS[reply.tier], reply.exit_depth
            tier_ms = {TIER_LABELS[t.tier]: t.compute_ms + t.queue_ms for t in reply.timings}
            degraded = reply.degraded
        else:
            probabilities = probs_device
            tier, exit_depth, tier_ms = "device", self.split.device, {}
            degraded = wanted != TIER_DEVICE
        tier_ms["device"] = device_ms
        label_id = int(probabilities.argmax())
        if audited:
            self._queue_audit(route, wanted, degraded, label_id, router, probs_device, hidden_d, reply)
        return Prediction(
            label=self.labels[label_id],
            label_id=label_id,
            score=float(probabilities[label_id]),
            probabilities=probabilities.tolist(),
            tier=tier,
            route=TIER_NAMES[route],
            exit_depth=int(exit_depth),
            degraded=bool(degraded),
            latency_ms=1000 * (time.perf_counter() - started),
            bytes_sent=result["bytes_sent"],
            cost=float(self.costs[route]),
            tier_ms=tier_ms,
            errors=result["errors"],
        )

    def _queue_audit(self, route, wanted, degraded, label_id, router, probs_device, hidden_d, reply) -> None:
        """Hand a sampled answer to the audit worker (never blocks); fallback answers are not audited: their
        route was the network's choice, not the policy's."""
        from cartosplit.device_runtime.audit_worker import AuditJob

        if degraded or (route != wanted and not (route == TIER_CLOUD_VIA_EDGE and wanted == TIER_EDGE)):
            self.monitor.drop("fallback")
            return
        if route in (TIER_DEVICE, TIER_EDGE):
            edge = np.asarray(reply.probabilities) if route == TIER_EDGE else None
            job = AuditJob(route, label_id, router, probs_device, edge=edge, hidden=hidden_d)
        else:
            final = np.asarray(reply.probabilities, dtype=np.float64)
            edge = np.asarray(reply.edge_probabilities, dtype=np.float64) if route == TIER_CLOUD_VIA_EDGE else None
            if edge is not None and len(edge) != len(final):
                self.monitor.drop("no_edge_probabilities")  # an edge older than the audit protocol
                return
            job = AuditJob(route, label_id, router, probs_device, edge=edge, final=final)
        self._auditor.submit(job)

    def predict(
        self, texts: Sequence[str], text_pairs: Sequence[str] | None = None, max_chars: int = MAX_CHARS
    ) -> list[Prediction]:
        """One answer per input, in order. Empty or oversize texts are refused before any work starts."""
        for i, text in enumerate(texts if text_pairs is None else [*texts, *text_pairs]):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"input {i % len(texts)}: empty text (or not a string)")
            if len(text) > max_chars:
                raise ValueError(f"input {i % len(texts)}: {len(text)} characters is over the limit of {max_chars}")
            problem = text_problem(text)
            if problem:  # the tokenizer would raise a TypeError deep inside
                raise ValueError(f"input {i % len(texts)}: text {problem}")
        return [self._predict_one(e) for e in encode(self.tokenizer, texts, text_pairs)]

    def predict_all_cloud(self, texts: Sequence[str], text_pairs: Sequence[str] | None = None) -> list[Prediction]:
        """The baseline: every input's tokens to the cloud's full model, nothing computed on the device."""
        if self.cloud is None:
            raise ValueError("all-cloud mode needs a cloud address")
        out = []
        for encoded in encode(self.tokenizer, texts, text_pairs):
            started = time.perf_counter()
            result = {"errors": [], "bytes_sent": 0}
            reply = self._send(self.cloud, self._request(0, tokens=pad_batch([encoded])), result)
            if reply is None:
                raise ConnectionError(f"all-cloud: the cloud at {self.cloud.address} failed: {result['errors']}")
            probabilities = np.asarray(reply.probabilities, dtype=np.float32)
            label_id = int(probabilities.argmax())
            out.append(
                Prediction(
                    label=self.labels[label_id],
                    label_id=label_id,
                    score=float(probabilities[label_id]),
                    probabilities=probabilities.tolist(),
                    tier="cloud",
                    route="all_cloud",
                    exit_depth=int(reply.exit_depth),
                    degraded=False,
                    latency_ms=1000 * (time.perf_counter() - started),
                    bytes_sent=result["bytes_sent"],
                    cost=self.all_cloud_cost,
                    tier_ms={TIER_LABELS[t.tier]: t.compute_ms + t.queue_ms for t in reply.timings},
                )
            )
        return out

    def close(self) -> None:
        if self._auditor is not None:
            self._auditor.close(grace_s=self.timeout_s + 0.5)
        for tier in (self.edge, self.cloud, getattr(self, "_audit_edge", None)):
            if tier is not None:
                tier.close()

    def __enter__(self) -> DeviceRuntime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DeviceRuntime", "Prediction"]
