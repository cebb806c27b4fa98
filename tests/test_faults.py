"""Faults on a live three-process deployment: frozen and killed tiers, restarts, deadlines, retries.

Every input must get exactly one answer; fallback answers are marked degraded; the device goes back
to a tier once it is up again.
"""

import math
import os
import signal
import time

import numpy as np
import pytest

from cartosplit.cloud_server.server import build_cloud_server
from cartosplit.device_runtime.policy import Policy
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc
from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.process import ServerProcess, start_servers

CLIMB = Policy(alpha_device=math.inf, alpha_edge=math.inf)  # every input leaves the device


def _servers(bundle):
    """Cloud and edge; the edge never answers (--alpha-edge inf), so every input reaches the cloud."""
    servers = start_servers(bundle, edge_args=["--alpha-edge", "inf"])
    return servers["edge"], servers["cloud"]


def _resume_and_stop(*servers):
    for server in servers:
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
        server.stop()


def test_frozen_edge_then_thawed_every_input_answered_once(bundle):
    edge, cloud = _servers(bundle)
    try:
        with DeviceRuntime(bundle, edge=edge.address, cloud=cloud.address, timeout_s=0.5, retry_after_s=0.5) as rt:
            rt.policy = CLIMB
            before = rt.predict(["the film was good", "a dull plot"])
            os.kill(edge.process.pid, signal.SIGSTOP)  # frozen: accepts connections, never answers
            frozen = rt.predict(["nice actors", "quite boring", "superb"])
            os.kill(edge.process.pid, signal.SIGCONT)
            time.sleep(0.6)  # past retry_after_s: the device tries the edge again
            after = rt.predict(["the movie is fine", "sad film"])
    finally:
        _resume_and_stop(edge, cloud)
    assert [p.route for p in before] == ["cloud_via_edge"] * 2
    # the first input waits out the timeout, then the cloud; the others skip the edge at once
    assert [p.route for p in frozen] == ["cloud_direct"] * 3 and not any(p.degraded for p in frozen)
    assert "DEADLINE_EXCEEDED" in frozen[0].errors[0] and "skipped" in frozen[1].errors[0]
    assert frozen[1].latency_ms < 400
    assert [p.route for p in after] == ["cloud_via_edge"] * 2


def test_cloud_killed_and_restarted_on_its_port_is_used_again(bundle):
    edge, cloud = _servers(bundle)
    port = cloud.address.rsplit(":", 1)[1]
    try:
        with DeviceRuntime(bundle, edge=edge.address, cloud=cloud.address, timeout_s=1.0, retry_after_s=0.3) as rt:
            rt.policy = CLIMB
            cloud.process.kill()
            cloud.process.wait()
            down = rt.predict(["good film", "bad film"])
            cloud = ServerProcess(
                ["serve-cloud", "--bundle", str(bundle), "--format", "onnx-fp32", "--port", port], "cloud"
            )
            deadline = time.monotonic() + 15
            back = None
            while time.monotonic() < deadline:  # channels reconnect with back-off: poll, bounded
                time.sleep(0.4)
                back = rt.predict(["nice plot"])[0]
                if back.route == "cloud_via_edge":
                    break
    finally:
        _resume_and_stop(edge, cloud)
    # the edge cannot reach the cloud: it answers itself, degraded; the device never loses the input
    assert all(p.route == "edge" and p.degraded for p in down)
    assert back is not None and back.route == "cloud_via_edge" and not back.degraded


def test_deadlines_hold_on_each_hop_when_the_cloud_freezes(bundle):
    edge, cloud = _servers(bundle)
    try:
        with DeviceRuntime(bundle, edge=edge.address, cloud=cloud.address, timeout_s=1.0) as rt:
            rt.policy = CLIMB
            os.kill(cloud.process.pid, signal.SIGSTOP)
            started = time.monotonic()
            answer = rt.predict(["a sad plot"])[0]
            took = time.monotonic() - started
    finally:
        _resume_and_stop(edge, cloud)
    # the edge gave the cloud what was left of the device's deadline, kept a reserve, and answered itself
    assert answer.route == "edge" and answer.degraded and took < 1.0


@pytest.fixture()
def cloud_stub(bundle):
    import grpc

    server = build_cloud_server(ServerConfig(bundle=bundle, port=0, fmt="onnx-fp32")).start()
    channel = grpc.insecure_channel(server.address)
    yield server, tiers_pb2_grpc.CloudTierStub(channel)
    channel.close()
    server.stop(0)


def _request(bundle_id, request_id, hidden):
    return pb.InferRequest(
        request_id=request_id,
        bundle_id=bundle_id,
        protocol_version=PROTOCOL_VERSION,
        depth=2,
        hidden=encode_tensor(hidden, pb.FP32),
    )


def test_a_retried_request_is_answered_from_the_reply_cache(bundle, cloud_stub):
    from cartosplit.device_runtime.bundle import load_bundle

    server, stub = cloud_stub
    bundle_id = load_bundle(bundle).bundle_id
    hidden = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    first = stub.Infer(_request(bundle_id, "req-1", hidden), timeout=5)
    again = stub.Infer(_request(bundle_id, "req-1", hidden), timeout=5)
    assert again == first and len(server.servicer.replies) == 1
    # the same id with other activations is another request: computed, not served from the cache
    other = stub.Infer(_request(bundle_id, "req-1", hidden[:3]), timeout=5)
    assert len(server.servicer.replies) == 2 and other.request_id == "req-1"


@pytest.mark.parametrize("value", [1e30, 3.4e38])
def test_extreme_but_finite_activations_are_refused_not_answered_with_nan(bundle, cloud_stub, value):
    import grpc

    from cartosplit.device_runtime.bundle import load_bundle

    _, stub = cloud_stub
    hidden = np.full((4, 32), value, dtype=np.float32)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Infer(_request(load_bundle(bundle).bundle_id, "big", hidden), timeout=5)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not activations of this model" in refused.value.details()
    good = stub.Infer(_request(load_bundle(bundle).bundle_id, "ok", hidden / value), timeout=5)
    assert np.isfinite(good.probabilities).all()
