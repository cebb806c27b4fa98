"""Audit requests on the servers: the edge always forwards them, replies carry both exits, and every tier
counts them apart from user traffic (in process, over real loopback channels; TLS and token as usual)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cartosplit.cloud_server.server import build_cloud_server
from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.numerics import softmax
from cartosplit.edge_server.server import build_edge_server
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.security import ClientSecurity
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.lifecycle import TierServer
from tests.test_security import logs, make_certs, tls  # noqa: F401  (logs: a fixture)
from tests.test_servers import FP32, Reference, closed_port, edge_stub, metric, request

TOL = 1e-5
OK = {"code": "OK"}


@pytest.fixture(scope="module")
def ref(loaded: Bundle) -> Reference:
    return Reference(loaded)


@pytest.fixture(scope="module")
def hidden_states(ref: Reference) -> list[np.ndarray]:
    """Hidden states at the device split d: what the device sends the edge, for a user request or an audit."""
    rng = np.random.default_rng(7)
    return [ref.hidden(ref.tokens(rng, length), ref.d) for length in (3, 6, 9, 14, 20)]


@pytest.fixture()
def cloud(loaded: Bundle):
    """A fresh cloud per test, so its counters start at zero."""
    server = build_cloud_server(ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=1), bundle=loaded).start()
    yield server
    server.stop(0)


@pytest.fixture()
def start_edge(loaded: Bundle):
    """``start_edge(cloud_address, alpha)``: edges that are stopped when the test ends."""
    edges: list[TierServer] = []

    def start(cloud_address: str, alpha: float) -> TierServer:
        config = ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=1)
        edges.append(build_edge_server(config, cloud_address, alpha, bundle=loaded).start())
        return edges[-1]

    yield start
    for edge in edges:
        edge.stop(0)


def audit(loaded: Bundle, hidden: np.ndarray, rid: str) -> pb.InferRequest:
    return request(loaded.bundle_id, loaded.split_points.device, hidden, rid=rid, audit=True)


def user(loaded: Bundle, hidden: np.ndarray, rid: str) -> pb.InferRequest:
    return request(loaded.bundle_id, loaded.split_points.device, hidden, rid=rid)


def assert_both_exits(reply: pb.InferReply, ref: Reference, hidden_d: np.ndarray) -> None:
    """A CLOUD reply carrying the cloud's softmax and the edge exit's own, each matching its graph."""
    hidden_e, logits = ref.run("edge", hidden_d)
    assert (reply.tier, reply.exit_depth, reply.degraded) == (pb.CLOUD, ref.total, False)
    assert len(reply.edge_probabilities) == len(ref.bundle.manifest.model.labels)
    np.testing.assert_allclose(reply.edge_probabilities, softmax(logits), atol=TOL)
    assert sum(reply.probabilities) == pytest.approx(1.0, abs=1e-5)
    rounded = hidden_e.astype(np.float16).astype(np.float32)  # the edge forwards fp16
    np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(ref.e, rounded), atol=TOL)


def test_an_audit_is_forwarded_even_when_the_edge_is_sure(loaded, cloud, start_edge, ref, hidden_states):
    stub = edge_stub(start_edge(cloud.address, alpha=0.0))  # alpha 0: every user request answered at the edge
    for i, hidden_d in enumerate(hidden_states):
        assert_both_exits(stub.Infer(audit(loaded, hidden_d, f"a{i}"), timeout=10), ref, hidden_d)


def test_a_cached_user_reply_never_answers_an_audit(loaded, cloud, start_edge, ref, hidden_states):
    stub = edge_stub(start_edge(cloud.address, alpha=0.0))
    hidden_d = hidden_states[0]
    first = stub.Infer(user(loaded, hidden_d, "same"), timeout=10)
    assert first.tier == pb.EDGE
    assert_both_exits(stub.Infer(audit(loaded, hidden_d, "same"), timeout=10), ref, hidden_d)


def test_edge_probabilities_only_when_the_edge_forwarded(loaded, cloud, start_edge, ref, hidden_states):
    hidden_d = hidden_states[1]
    answered = edge_stub(start_edge(cloud.address, alpha=0.0)).Infer(user(loaded, hidden_d, "u"), timeout=10)
    assert (answered.tier, answered.degraded) == (pb.EDGE, False)
    assert list(answered.edge_probabilities) == []
    forwarded = edge_stub(start_edge(cloud.address, alpha=math.inf)).Infer(user(loaded, hidden_d, "u"), timeout=10)
    assert_both_exits(forwarded, ref, hidden_d)


def test_a_device_can_make_the_edge_stricter_never_looser(loaded, cloud, start_edge, ref, hidden_states):
    hidden_d = hidden_states[1]
    lenient = edge_stub(start_edge(cloud.address, alpha=0.0))
    stricter = user(loaded, hidden_d, "strict")
    stricter.alpha_edge = math.inf  # the device's policy after an alarm: never answer at the edge
    assert_both_exits(lenient.Infer(stricter, timeout=10), ref, hidden_d)
    strict = edge_stub(start_edge(cloud.address, alpha=math.inf))
    looser = user(loaded, hidden_d, "loose")
    looser.alpha_edge = 0.01  # asks for less than the edge's own threshold: the edge's own holds
    assert strict.Infer(looser, timeout=10).tier == pb.CLOUD


def test_audits_are_counted_apart_on_both_tiers(loaded, cloud, start_edge, hidden_states, logs):  # noqa: F811
    edge = start_edge(cloud.address, alpha=math.inf)  # user requests forwarded too: the cloud sees all five
    stub = edge_stub(edge)
    for i in range(3):
        assert stub.Infer(user(loaded, hidden_states[i], f"u{i}"), timeout=10).tier == pb.CLOUD
    for i in range(2):
        assert stub.Infer(audit(loaded, hidden_states[i], f"a{i}"), timeout=10).tier == pb.CLOUD
    for server, tier in ((edge, "edge"), (cloud, "cloud")):
        assert metric(server, "cartosplit_requests_total", tier=tier, **OK) == 3, tier
        assert metric(server, "cartosplit_audit_requests_total", tier=tier, **OK) == 2, tier  # the flag went on
        assert metric(server, "cartosplit_request_seconds_count", tier=tier) == 5, tier  # latency: all traffic
    assert metric(edge, "cartosplit_forwarded_total", tier="edge") == 3
    assert metric(edge, "cartosplit_audit_forwarded_total", tier="edge") == 2
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    audited = {(line["tier"], line["request_id"]) for line in lines if line["event"] == "request" and line.get("audit")}
    assert audited == {(tier, f"a{i}") for tier in ("edge", "cloud") for i in range(2)}


def test_an_audit_the_cloud_cannot_answer_comes_back_degraded(loaded, start_edge, ref, hidden_states):
    edge = start_edge(f"127.0.0.1:{closed_port()}", alpha=0.0)
    reply = edge_stub(edge).Infer(audit(loaded, hidden_states[2], "lost"), timeout=10)
    _, logits = ref.run("edge", hidden_states[2])
    assert (reply.tier, reply.degraded) == (pb.EDGE, True)  # not CLOUD: the device drops it
    np.testing.assert_allclose(reply.probabilities, softmax(logits), atol=TOL)
    assert metric(edge, "cartosplit_audit_degraded_total", tier="edge") == 1
    assert metric(edge, "cartosplit_degraded_total", tier="edge") == 0
    assert metric(edge, "cartosplit_audit_requests_total", tier="edge", **OK) == 1


def test_an_audit_goes_through_tls_and_the_token(loaded, ref, hidden_states, tmp_path):
    certs = make_certs(tmp_path / "certs")
    token = tmp_path / "token"
    token.write_text("audit-token-6b1f0c9e2d7a4c58\n")
    token.chmod(0o600)
    secured = tls(certs, token=token)
    client = ClientSecurity(ca_file=certs / "ca.pem", token_file=token)
    config = ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=1, security=secured)
    cloud = build_cloud_server(config, bundle=loaded).start()
    edge = build_edge_server(config, cloud.address, 0.0, bundle=loaded, cloud_security=client).start()
    try:
        with client.channel(edge.address) as channel:
            reply = pb_grpc.EdgeTierStub(channel).Infer(audit(loaded, hidden_states[3], "tls"), timeout=10)
        assert_both_exits(reply, ref, hidden_states[3])
        assert metric(cloud, "cartosplit_audit_requests_total", tier="cloud", **OK) == 1
    finally:
        edge.stop(0)
        cloud.stop(0)
