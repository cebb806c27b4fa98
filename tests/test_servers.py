"""The gRPC tiers, in process on loopback with real channels: answers, batching, streams, errors, lifecycle.

Servers run the fp32 graphs so their answers can be compared with the graphs run directly at 1e-5.
"""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cartosplit.cloud_server.server import SERVICE_NAME as CLOUD_SERVICE
from cartosplit.cloud_server.server import build_cloud_server
from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.manifest import cloud_graph
from cartosplit.device_runtime.numerics import softmax
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.edge_server.server import SERVICE_NAME as EDGE_SERVICE
from cartosplit.edge_server.server import build_edge_server
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.lifecycle import TierServer

FP32 = "onnx-fp32"
TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
Code = grpc.StatusCode


# ---------------------------------------------------------------------------------------------------- helpers


class Reference:
    """The bundle's fp32 graphs run directly, one sample at a time (no padding, no server)."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.sessions = {g: OnnxSession(bundle.graph_file(g, FP32)) for g in bundle.manifest.graphs}
        split = bundle.split_points
        self.r, self.d, self.e, self.total = split.router_depth, split.device, split.edge, split.total
        model = bundle.manifest.model
        self.hidden_size, self.vocab_size, self.max_length = (
            model.hidden_size,
            model.vocab_size,
            model.max_length,
        )

    def run(self, graph: str, *arrays: np.ndarray) -> list[np.ndarray]:
        mask = np.ones((1, len(arrays[0])), dtype=np.int64)
        if graph in ("full", "device_head"):
            ids, types = arrays
            return [o[0] for o in self.sessions[graph].run([ids[None], mask, types[None]])]
        return [o[0] for o in self.sessions[graph].run([arrays[0][None], mask])]

    def tokens(self, rng: np.random.Generator, length: int) -> np.ndarray:
        inner = rng.integers(5, self.vocab_size, size=length - 2)
        return np.concatenate([[2], inner, [3]]).astype(np.int64)  # [CLS] ... [SEP]

    def hidden(self, ids: np.ndarray, depth: int) -> np.ndarray:
        """The real hidden state after ``depth`` layers (depth r, d or e)."""
        _, state = self.run("device_head", ids, np.zeros_like(ids))
        if depth == self.r:
            return state
        state, _ = self.run("device_tail", state)
        if depth == self.d:
            return state
        state, _ = self.run("edge", state)
        assert depth == self.e
        return state

    def cloud_probs(self, depth: int, sample: np.ndarray) -> np.ndarray:
        if depth == 0:
            (logits,) = self.run("full", sample, np.zeros_like(sample))
        else:
            (logits,) = self.run(cloud_graph(depth), sample)
        return softmax(logits)


def request(
    bundle_id: str, depth: int, sample: np.ndarray, rid: str = "r", encoding: int = pb.FP32, **fields
) -> pb.InferRequest:
    """A request carrying ``sample`` as tokens (depth 0) or as a hidden state."""
    msg = pb.InferRequest(request_id=rid, bundle_id=bundle_id, protocol_version=PROTOCOL_VERSION, depth=depth)
    if depth == 0:
        msg.input_ids.CopyFrom(encode_tensor(sample, pb.INT64))
    else:
        msg.hidden.CopyFrom(encode_tensor(sample, encoding))
    for key, value in fields.items():
        if key == "timings":  # a repeated field cannot be assigned
            msg.timings.extend(value)
        else:
            setattr(msg, key, value)
    return msg


def cloud_stub(server: TierServer) -> pb_grpc.CloudTierStub:
    return pb_grpc.CloudTierStub(grpc.insecure_channel(server.address))


def edge_stub(server: TierServer) -> pb_grpc.EdgeTierStub:
    return pb_grpc.EdgeTierStub(grpc.insecure_channel(server.address))


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def metric(server: TierServer, name: str, **labels: str) -> float:
    return server.metrics.registry.get_sample_value(name, labels) or 0.0


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref(loaded: Bundle) -> Reference:
    return Reference(loaded)


@pytest.fixture(scope="module")
def cloud(loaded: Bundle):
    server = build_cloud_server(ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=2), bundle=loaded).start()
    yield server
    server.stop(0)


@pytest.fixture(scope="module")
def samples(ref: Reference) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(tokens, hidden at d, hidden at e) for a spread of lengths up to max_length."""
    rng = np.random.default_rng(0)
    lengths = [2, 3, 5, 8, 13, 21, ref.max_length, 7, 4, 30, 16, 9]
    out = []
    for length in lengths:
        ids = ref.tokens(rng, length)
        out.append((ids, ref.hidden(ids, ref.d), ref.hidden(ids, ref.e)))
    return out


def start_edge(loaded: Bundle, cloud_address: str, alpha: float, **config) -> TierServer:
    config = {"fmt": FP32, "max_wait_ms": 2, **config}
    return build_edge_server(ServerConfig(loaded.folder, **config), cloud_address, alpha, bundle=loaded).start()


# ------------------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("entry", ["edge", "router", "tokens"])
def test_cloud_matches_the_graphs_run_directly(cloud, ref, samples, entry):
    depth = {"edge": ref.e, "router": ref.r, "tokens": 0}[entry]
    stub = cloud_stub(cloud)
    for i, (ids, _, _) in enumerate(samples):
        sample = ids if depth == 0 else ref.hidden(ids, depth)
        reply = stub.Infer(request(cloud.servicer.bundle.bundle_id, depth, sample, rid=f"c{i}"), timeout=10)
        expected = ref.cloud_probs(depth, sample)
        assert reply.request_id == f"c{i}"
        np.testing.assert_allclose(reply.probabilities, expected, atol=TOL)
        assert reply.label == int(np.argmax(expected))
        assert (reply.tier, reply.exit_depth, reply.degraded) == (pb.CLOUD, ref.total, False)
        assert [t.tier for t in reply.timings] == [pb.CLOUD]


def test_cloud_keeps_earlier_timings(cloud, ref, samples):
    _, _, hidden_e = samples[0]
    device = pb.TierTiming(tier=pb.DEVICE, compute_ms=1.5)
    reply = cloud_stub(cloud).Infer(request(cloud.servicer.bundle.bundle_id, ref.e, hidden_e, timings=[device]))
    assert [t.tier for t in reply.timings] == [pb.DEVICE, pb.CLOUD]
    assert reply.timings[0].compute_ms == 1.5 and reply.timings[1].compute_ms > 0


def test_edge_answers_confident_samples_itself(loaded, cloud, ref, samples):
    edge = start_edge(loaded, cloud.address, alpha=0.0)
    try:
        stub = edge_stub(edge)
        for _, hidden_d, _ in samples:
            reply = stub.Infer(request(loaded.bundle_id, ref.d, hidden_d), timeout=10)
            _, logits = ref.run("edge", hidden_d)
            np.testing.assert_allclose(reply.probabilities, softmax(logits), atol=TOL)
            assert (reply.tier, reply.exit_depth, reply.degraded) == (pb.EDGE, ref.e, False)
            assert [t.tier for t in reply.timings] == [pb.EDGE]
        assert metric(edge, "cartosplit_forwarded_total", tier="edge") == 0
    finally:
        edge.stop(0)


def test_edge_forwards_unconfident_samples_to_the_cloud(loaded, cloud, ref, samples):
    edge = start_edge(loaded, cloud.address, alpha=math.inf)
    try:
        stub = edge_stub(edge)
        for i, (_, hidden_d, _) in enumerate(samples):
            reply = stub.Infer(request(loaded.bundle_id, ref.d, hidden_d, rid=f"f{i}"), timeout=10)
            hidden_e, _ = ref.run("edge", hidden_d)
            # the hidden state travels as fp16: the cloud sees exactly the rounded values
            rounded = hidden_e.astype(np.float16).astype(np.float32)
            np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(ref.e, rounded), atol=TOL)
            np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(ref.e, hidden_e), atol=2e-3)
            assert (reply.request_id, reply.tier, reply.exit_depth, reply.degraded) == (
                f"f{i}",
                pb.CLOUD,
                ref.total,
                False,
            )
            assert [t.tier for t in reply.timings] == [pb.EDGE, pb.CLOUD]
        assert metric(edge, "cartosplit_forwarded_total", tier="edge") == len(samples)
    finally:
        edge.stop(0)


def test_edge_degrades_to_its_own_exit_when_the_cloud_is_down(loaded, ref, samples):
    edge = start_edge(loaded, f"127.0.0.1:{closed_port()}", alpha=math.inf)
    try:
        _, hidden_d, _ = samples[3]
        reply = edge_stub(edge).Infer(request(loaded.bundle_id, ref.d, hidden_d), timeout=10)
        _, logits = ref.run("edge", hidden_d)
        np.testing.assert_allclose(reply.probabilities, softmax(logits), atol=TOL)
        assert (reply.tier, reply.exit_depth, reply.degraded) == (pb.EDGE, ref.e, True)
        assert metric(edge, "cartosplit_degraded_total", tier="edge") == 1
    finally:
        edge.stop(0)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(loaded, ref):
    server = build_cloud_server(ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=20), bundle=loaded).start()
    try:
        rng = np.random.default_rng(1)
        inputs = [ref.hidden(ref.tokens(rng, 2 + (7 * i) % (ref.max_length - 1)), ref.e) for i in range(24)]
        stub, start = cloud_stub(server), threading.Barrier(24)

        def call(i: int) -> pb.InferReply:
            start.wait()
            return stub.Infer(request(loaded.bundle_id, ref.e, inputs[i], rid=f"b{i}"), timeout=10)

        with ThreadPoolExecutor(24) as pool:
            replies = list(pool.map(call, range(24)))
        for i, reply in enumerate(replies):
            assert reply.request_id == f"b{i}"
            np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(ref.e, inputs[i]), atol=TOL)
        graph = cloud_graph(ref.e)
        runs = metric(server, "cartosplit_batch_size_count", tier="cloud", graph=graph)
        assert metric(server, "cartosplit_batch_size_sum", tier="cloud", graph=graph) == 24
        assert runs < 24  # some model run served more than one request
        assert metric(server, "cartosplit_requests_total", tier="cloud", code="OK") == 24
    finally:
        server.stop(0)


def test_stream_replies_in_request_order(cloud, ref, samples):
    depths = [ref.e, ref.r, 0]
    inputs = []
    for i in range(24):
        ids, _, hidden_e = samples[i % len(samples)]
        depth = depths[i % 3]
        inputs.append((depth, ids if depth == 0 else (hidden_e if depth == ref.e else ref.hidden(ids, depth))))
    bundle_id = cloud.servicer.bundle.bundle_id
    requests = (request(bundle_id, depth, sample, rid=f"s{i}") for i, (depth, sample) in enumerate(inputs))
    replies = list(cloud_stub(cloud).InferStream(requests, timeout=20))
    assert [r.request_id for r in replies] == [f"s{i}" for i in range(24)]
    for reply, (depth, sample) in zip(replies, inputs, strict=True):
        np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(depth, sample), atol=TOL)


def test_edge_stream_and_a_bad_request_ending_a_stream(loaded, cloud, ref, samples):
    edge = start_edge(loaded, cloud.address, alpha=0.0)
    try:
        good = [request(loaded.bundle_id, ref.d, hidden_d, rid=f"e{i}") for i, (_, hidden_d, _) in enumerate(samples)]
        replies = list(edge_stub(edge).InferStream(iter(good), timeout=20))
        assert [r.request_id for r in replies] == [g.request_id for g in good]
        # the reply has no status field: the first refused request ends the stream with its code
        bad = request(loaded.bundle_id, ref.d, samples[0][1], rid="bad", protocol_version=99)
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in edge_stub(edge).InferStream(iter([*good[:2], bad, *good[2:]]), timeout=20):
                received.append(reply.request_id)
        assert received == ["e0", "e1"]
        assert info.value.code() == Code.FAILED_PRECONDITION and "'bad'" in info.value.details()
    finally:
        edge.stop(0)


def _bad_requests(ref: Reference, bundle_id: str, hidden: np.ndarray, ids: np.ndarray) -> dict:
    """name -> (request, expected code): every way a request can be wrong that the checks know about."""

    def hidden_req(**fields) -> pb.InferRequest:
        return request(bundle_id, ref.e, hidden, **fields)

    truncated = hidden_req()
    truncated.hidden.data = truncated.hidden.data[:-4]
    nan = hidden.copy()
    nan[0, 0] = np.nan
    unknown = hidden_req()
    unknown.hidden.encoding = 99
    types = request(bundle_id, 0, ids)
    types.token_type_ids.CopyFrom(encode_tensor(np.full_like(ids, 2), pb.INT64))
    no_hidden = hidden_req()
    no_hidden.ClearField("hidden")
    too_long = np.zeros((ref.max_length + 1, ref.hidden_size), np.float32)
    return {
        "protocol version": (hidden_req(protocol_version=PROTOCOL_VERSION + 1), Code.FAILED_PRECONDITION),
        "bundle id": (request("f" * 64, ref.e, hidden), Code.FAILED_PRECONDITION),
        "depth": (request(bundle_id, ref.total, hidden), Code.INVALID_ARGUMENT),
        "hidden size": (request(bundle_id, ref.e, hidden[:, :-1]), Code.INVALID_ARGUMENT),
        "rank 3": (request(bundle_id, ref.e, hidden[None]), Code.INVALID_ARGUMENT),
        "byte count": (truncated, Code.INVALID_ARGUMENT),
        "NaN": (request(bundle_id, ref.e, nan), Code.INVALID_ARGUMENT),
        "NaN as fp16": (request(bundle_id, ref.e, nan, encoding=pb.FP16), Code.INVALID_ARGUMENT),
        "INT8 overflowing float32": (
            _int8_with_scale(hidden_req(encoding=pb.INT8), 3e38),
            Code.INVALID_ARGUMENT,
        ),
        "too long": (request(bundle_id, ref.e, too_long), Code.INVALID_ARGUMENT),
        "token id": (request(bundle_id, 0, np.array([2, ref.vocab_size, 3])), Code.INVALID_ARGUMENT),
        "negative token id": (request(bundle_id, 0, np.array([2, -1, 3])), Code.INVALID_ARGUMENT),
        "token type": (types, Code.INVALID_ARGUMENT),
        "unknown encoding": (unknown, Code.INVALID_ARGUMENT),
        "missing hidden": (no_hidden, Code.INVALID_ARGUMENT),
    }


def _int8_with_scale(msg: pb.InferRequest, scale: float) -> pb.InferRequest:
    msg.hidden.scale = scale
    return msg


def test_bad_requests_get_the_right_code_and_the_server_keeps_serving(cloud, ref, samples):
    ids, _, hidden_e = samples[4]
    bundle_id = cloud.servicer.bundle.bundle_id
    stub = cloud_stub(cloud)
    good = request(bundle_id, ref.e, hidden_e)
    before = metric(cloud, "cartosplit_requests_total", tier="cloud", code="INVALID_ARGUMENT")
    cases = _bad_requests(ref, bundle_id, hidden_e, ids)
    for name, (bad, expected) in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            stub.Infer(bad, timeout=10)
        assert info.value.code() == expected, f"{name}: {info.value.details()}"
        assert stub.Infer(good, timeout=10).label in (0, 1)
    invalid = sum(code == Code.INVALID_ARGUMENT for _, code in cases.values())
    assert metric(cloud, "cartosplit_requests_total", tier="cloud", code="INVALID_ARGUMENT") - before == invalid
    details = code_of_details(stub, cases["bundle id"][0])
    assert "f" * 12 in details and bundle_id[:12] in details
    assert "[0, 1, 2]" in code_of_details(stub, cases["depth"][0])


def code_of_details(stub, msg: pb.InferRequest) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.Infer(msg, timeout=10)
    return info.value.details()


def test_the_edge_refuses_depths_it_does_not_serve(loaded, cloud, ref, samples):
    edge = start_edge(loaded, cloud.address, alpha=0.0)
    try:
        _, hidden_d, hidden_e = samples[0]
        stub = edge_stub(edge)
        assert (
            code_of(lambda: stub.Infer(request(loaded.bundle_id, ref.e, hidden_e), timeout=10)) == Code.INVALID_ARGUMENT
        )
        assert stub.Infer(request(loaded.bundle_id, ref.d, hidden_d), timeout=10).tier == pb.EDGE
    finally:
        edge.stop(0)


def test_oversized_messages_are_refused_by_grpc(loaded, ref):
    # 2 KiB: a 4-token fp32 hidden state (512 B) fits, a 32-token one (4 KiB) does not
    config = ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=1, max_message_bytes=2048)
    server = build_cloud_server(config, bundle=loaded).start()
    try:
        stub = cloud_stub(server)
        big = np.zeros((ref.max_length, ref.hidden_size), np.float32)
        small = np.zeros((4, ref.hidden_size), np.float32)
        assert code_of(lambda: stub.Infer(request(loaded.bundle_id, ref.e, big), timeout=10)) == Code.RESOURCE_EXHAUSTED
        assert stub.Infer(request(loaded.bundle_id, ref.e, small), timeout=10).tier == pb.CLOUD
        # grpc core refuses it before the servicer runs; it is counted all the same, by its code (by the
        # server's thread, which may learn of it after the client has its answer)
        deadline = time.monotonic() + 10
        while metric(server, "cartosplit_requests_total", tier="cloud", code="RESOURCE_EXHAUSTED") < 1:
            assert time.monotonic() < deadline, "the refused oversize request was never counted"
            time.sleep(0.02)
        assert metric(server, "cartosplit_requests_total", tier="cloud", code="RESOURCE_EXHAUSTED") == 1
        assert metric(server, "cartosplit_requests_total", tier="cloud", code="OK") == 1
    finally:
        server.stop(0)


def test_undecodable_bytes_are_counted_with_the_code_grpc_answers(cloud, loaded, ref):
    before = metric(cloud, "cartosplit_requests_total", tier="cloud", code="INTERNAL")
    with grpc.insecure_channel(cloud.address) as channel:
        raw = channel.unary_unary(f"/{CLOUD_SERVICE}/Infer", request_serializer=None, response_deserializer=None)
        garbage = b"\xff" * 12  # a field tag that never ends: not an InferRequest
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, timeout=10)
        assert info.value.code() == Code.INTERNAL  # what grpcio answers; the servicer never ran
        assert info.value.details() == "Exception deserializing request!"
        # a well-formed message still goes through the same (wrapped) handler
        stub = pb_grpc.CloudTierStub(channel)
        small = np.zeros((4, ref.hidden_size), np.float32)
        assert stub.Infer(request(loaded.bundle_id, ref.e, small), timeout=10).tier == pb.CLOUD
    assert metric(cloud, "cartosplit_requests_total", tier="cloud", code="INTERNAL") - before == 1


def test_health_and_reflection(loaded, cloud):
    edge = start_edge(loaded, cloud.address, alpha=0.0)
    channel = grpc.insecure_channel(edge.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", EDGE_SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    for server, service in ((edge, EDGE_SERVICE), (cloud, CLOUD_SERVICE)):
        stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(server.address))
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for s in next(answers).list_services_response.service}
        assert {service, "grpc.health.v1.Health"} <= names
    edge.stop(0)
    try:
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    except grpc.RpcError as exc:
        assert exc.code() == Code.UNAVAILABLE
    # the servicer itself now reports NOT_SERVING (what a load balancer sees during the grace period)
    status = edge.health.Check(health_pb2.HealthCheckRequest(service=EDGE_SERVICE), None).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING


def test_metrics_endpoint(loaded, ref, samples):
    config = ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=1, metrics_port=0)
    server = build_cloud_server(config, bundle=loaded).start()
    try:
        assert server.metrics_port
        cloud_stub(server).Infer(request(loaded.bundle_id, ref.e, samples[0][2]), timeout=10)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as page:
            text = page.read().decode()
        assert 'cartosplit_requests_total{code="OK",tier="cloud"} 1.0' in text
        assert "cartosplit_batch_size_bucket" in text and "cartosplit_received_bytes_total" in text
    finally:
        server.stop(0)


def test_graceful_stop_lets_the_in_flight_request_finish(loaded, ref, samples):
    # a 300 ms batch window keeps the request waiting inside the server while stop() begins
    server = build_cloud_server(ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=300), bundle=loaded).start()
    stub = cloud_stub(server)
    in_flight = stub.Infer.future(request(loaded.bundle_id, ref.e, samples[1][2], rid="late"), timeout=10)
    time.sleep(0.1)
    started = time.perf_counter()
    server.stop(grace=5.0)
    took = time.perf_counter() - started
    reply = in_flight.result(timeout=5)
    assert reply.request_id == "late" and reply.tier == pb.CLOUD
    assert reply.timings[-1].queue_ms > 250
    assert took < 4.0  # stop returned once the request was done, not at the end of the grace period
    assert code_of(lambda: stub.Infer(request(loaded.bundle_id, ref.e, samples[1][2]), timeout=2)) == Code.UNAVAILABLE


def test_deadlines(loaded, ref, samples):
    # default (int8) format: also checks that the quantized graphs serve
    server = build_cloud_server(ServerConfig(loaded.folder, max_wait_ms=300), bundle=loaded).start()
    try:
        stub = cloud_stub(server)
        msg = request(loaded.bundle_id, ref.e, samples[2][2])
        assert code_of(lambda: stub.Infer(msg, timeout=1e-6)) == Code.DEADLINE_EXCEEDED
        # waits in the batcher longer than the client allows: the server gives up at the deadline
        assert code_of(lambda: stub.Infer(msg, timeout=0.05)) == Code.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 2
        while metric(server, "cartosplit_requests_total", tier="cloud", code="DEADLINE_EXCEEDED") < 1:
            assert time.monotonic() < deadline, "the server never recorded the deadline"
            time.sleep(0.01)
        reply = stub.Infer(msg, timeout=10)
        expected = ref.cloud_probs(ref.e, samples[2][2])
        assert reply.label == int(np.argmax(expected))
        np.testing.assert_allclose(reply.probabilities, expected, atol=0.1)  # int8 vs fp32
    finally:
        server.stop(0)


def test_a_port_in_use_is_an_error(loaded, cloud):
    config = ServerConfig(loaded.folder, fmt=FP32, port=cloud.port)
    with pytest.raises(OSError, match="cannot listen"):
        build_cloud_server(config, bundle=loaded)


def test_serve_cloud_prints_its_address_and_stops_on_sigterm(loaded):
    command = [sys.executable, "-m", "cartosplit", "serve-cloud", "--bundle", str(loaded.folder), "--port", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        match = re.fullmatch(rf"cloud serving {re.escape(str(loaded.folder))} on 127\.0\.0\.1:(\d+)", line)
        assert match, line or proc.stderr.read()
        channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        events = [re.search(r'"event": "(\w+)"', line) for line in proc.stderr.read().splitlines()]
        assert {"started", "signal", "stopped"} <= {m.group(1) for m in events if m}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------------- fuzz

_RAW_ENCODINGS = st.sampled_from([0, pb.FP32, pb.FP16, pb.INT8, pb.INT64, pb.INT32, 6, 99, -1])
_DIMS = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]))
_MUTATIONS = ["none", "none", "none", "data", "shape", "encoding", "scale", "zero_point", "random"]


@st.composite
def tensors(draw, kind: str) -> pb.Tensor:
    """A well-formed tensor of ``kind`` (hidden, ids or types), then often one field broken.

    Starting from valid tensors lets the fuzz get past the cheap checks into decoding and the model.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    length = draw(st.integers(1, 40))  # max_length is 32
    if kind == "hidden":
        width = draw(st.sampled_from([32, 32, 32, 31, 33]))
        magnitude = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e5]))  # 1e5 overflows fp16
        values = (rng.standard_normal((length, width)) * magnitude).astype(np.float32)
        with np.errstate(over="ignore"):  # overflowing fp16 to inf is one of the cases
            tensor = encode_tensor(values, draw(st.sampled_from([pb.FP32, pb.FP16, pb.INT8])))
    else:
        high = 2 if kind == "types" else 29
        values = rng.integers(-1 if draw(st.booleans()) else 0, high + draw(st.sampled_from([0, 0, 1])), size=length)
        tensor = encode_tensor(values, draw(st.sampled_from([pb.INT64, pb.INT32])))
    mutation = draw(st.sampled_from(_MUTATIONS))
    if mutation == "data":
        tensor.data = draw(st.one_of(st.binary(max_size=300), st.just(tensor.data[:-1]), st.just(tensor.data + b"x")))
    elif mutation == "shape":
        tensor.ClearField("shape")
        tensor.shape.extend(draw(st.lists(_DIMS, max_size=4)))
    elif mutation == "encoding":
        tensor.encoding = draw(_RAW_ENCODINGS)
    elif mutation == "scale":
        tensor.scale = draw(st.floats(width=32))
    elif mutation == "zero_point":
        tensor.zero_point = draw(st.integers(-(2**31), 2**31 - 1))
    elif mutation == "random":
        shape = draw(st.lists(_DIMS, max_size=4))
        tensor = pb.Tensor(data=draw(st.binary(max_size=300)), encoding=draw(_RAW_ENCODINGS), shape=shape)
    return tensor


@st.composite
def fuzzed_requests(draw, bundle_id: str) -> pb.InferRequest:
    """Mostly right envelopes (so the tensors get checked), the field the depth asks for, sometimes others."""
    msg = pb.InferRequest(
        request_id=draw(st.text(max_size=20)),
        bundle_id=draw(st.sampled_from([bundle_id] * 8 + ["", "x" * 64])),
        protocol_version=draw(st.sampled_from([PROTOCOL_VERSION] * 8 + [0, 7])),
        depth=draw(st.sampled_from([0, 0, 1, 2, 2, 3])),
    )
    if msg.depth == 0:
        msg.input_ids.CopyFrom(draw(tensors("ids")))
        if draw(st.booleans()):
            msg.token_type_ids.CopyFrom(draw(tensors("types")))
    else:
        msg.hidden.CopyFrom(draw(tensors("hidden")))
    if draw(st.integers(0, 9)) == 0:  # the other kind of payload as well
        other = "hidden" if msg.depth == 0 else "input_ids"
        getattr(msg, other).CopyFrom(draw(tensors("hidden" if other == "hidden" else "ids")))
    return msg


@pytest.fixture(scope="module")
def fuzz_stub(cloud):
    return cloud_stub(cloud)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_tensors_never_break_the_cloud(fuzz_stub, cloud, ref, samples, data):
    msg = data.draw(fuzzed_requests(cloud.servicer.bundle.bundle_id))
    try:
        fuzz_stub.Infer(msg, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in (Code.INVALID_ARGUMENT, Code.FAILED_PRECONDITION), exc.details()
    good = request(cloud.servicer.bundle.bundle_id, ref.e, samples[0][2])
    assert fuzz_stub.Infer(good, timeout=10).tier == pb.CLOUD
