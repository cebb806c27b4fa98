"""``--backend ray``: the same answers as the plain servers, the same refusals from the front, a clean exit.

The tests that start Ray are marked ``ray``: the default ``pytest`` run leaves them out (pyproject's addopts)
and ``scripts/test.sh`` runs them in a second call, ``pytest -m ray``, so CI keeps them. They start one local
Ray with 1 CPU (replicas take 0.5 CPU each so the cloud and the edge deployments fit). The settings and
padding helpers below need no Ray and run in the default suite.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

from cartosplit.cloud_server.server import build_cloud_server
from cartosplit.device_runtime.buckets import bucket_for, pad_to, seq_buckets
from cartosplit.device_runtime.bundle import Bundle
from cartosplit.edge_server.server import build_edge_server
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.codec import decode_tensor
from cartosplit.serving import ray_backend
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.lifecycle import TierServer
from cartosplit.serving.ray_settings import RaySettings
from tests.test_servers import FP32, ROOT, Reference, cloud_stub, code_of, edge_stub, request

TOL = 1e-5


# ------------------------------------------------------------------------------------- no Ray needed


def test_settings_read_yaml_and_json_and_refuse_unknown_keys(tmp_path):
    yaml_file = tmp_path / "ray.yaml"
    yaml_file.write_text("num_replicas: 2\nmax_batch_size: 8\nray_actor_options: {num_cpus: 0.5}\n")
    settings = RaySettings.from_file(yaml_file)
    assert (settings.num_replicas, settings.max_batch_size, settings.upper_replicas()) == (2, 8, 2)
    assert settings.deployment_options()["ray_actor_options"] == {"num_cpus": 0.5}

    json_file = tmp_path / "ray.json"
    json_file.write_text(json.dumps({"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}))
    auto = RaySettings.from_file(json_file)
    assert auto.upper_replicas() == 3
    assert auto.deployment_options()["num_replicas"] == "auto"

    (tmp_path / "typo.yaml").write_text("num_replica: 2\n")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['num_replica'\]"):
        RaySettings.from_file(tmp_path / "typo.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a mapping"):
        RaySettings.from_file(tmp_path / "list.json")
    for bad in (
        {"num_replicas": 0},
        {"max_batch_size": -1},
        {"seq_buckets": []},
        {"num_replicas": 2, "autoscaling_config": {}},
    ):
        with pytest.raises(ValueError):
            RaySettings.from_mapping(bad)
    with pytest.raises(ValueError, match="cannot read"):
        RaySettings.from_file(tmp_path / "missing.yaml")


def test_buckets_and_padding():
    assert seq_buckets(128) == [16, 32, 48, 64, 80, 96, 112, 128]
    assert seq_buckets(32) == [16, 32]
    assert seq_buckets(40) == [16, 32, 40]
    assert seq_buckets(100, [48, 16, 200]) == [16, 48, 100]
    assert [bucket_for(n, [8, 16, 32]) for n in (1, 8, 9, 32)] == [8, 8, 16, 32]
    with pytest.raises(ValueError):
        bucket_for(33, [8, 16, 32])
    hidden = np.ones((2, 5, 3), dtype=np.float32)
    padded = pad_to(hidden, 8)
    assert padded.shape == (2, 8, 3) and padded[:, 5:].sum() == 0 and padded[:, :5].sum() == 30
    assert pad_to(np.ones((2, 5), dtype=np.int64), 8)[:, 5:].sum() == 0


def test_a_front_batch_larger_than_the_replicas_batch_is_refused(tmp_path):
    pytest.importorskip("ray")
    from cartosplit.serving.ray_backend import RayBackend

    config = tmp_path / "ray.yaml"
    config.write_text("max_batch_size: 8\n")
    with pytest.raises(ValueError, match="--max-batch 16 is larger than the replicas' batch"):
        RayBackend(config_file=config, front_max_batch=16)
    RayBackend(config_file=config, front_max_batch=8)  # equal is fine; nothing starts until open_graphs


def test_ray_flags_need_the_ray_backend(bundle):
    with pytest.raises(ValueError, match="need --backend ray"):
        ServerConfig(bundle, ray_address="auto")
    with pytest.raises(ValueError, match="backend 'spark' is unknown"):
        ServerConfig(bundle, backend="spark")


def test_a_missing_ray_install_is_explained(bundle, monkeypatch):
    """Without the extra, --backend ray stops with the pip command, before anything starts."""
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ValueError, match=re.escape("pip install 'cartosplit[ray]'")):
        build_cloud_server(ServerConfig(bundle, backend="ray"))


class _FlakyRay:
    """A stand-in for the ``ray`` module whose local start times out ``failures`` times, then works."""

    def __init__(self, failures: int) -> None:
        self.failures, self.inits, self.shutdowns = failures, 0, 0

    def init(self, **kwargs) -> None:
        self.inits += 1
        if self.inits <= self.failures:
            raise Exception("The current node timed out during startup.")

    def shutdown(self) -> None:
        self.shutdowns += 1


def _bare_backend() -> ray_backend.RayBackend:
    backend = object.__new__(ray_backend.RayBackend)  # no ray import: only _connect's local start is tested
    backend.address, backend.settings = None, RaySettings()
    backend._started_ray = backend._connected = False
    return backend


def test_a_local_ray_that_misses_its_start_window_is_retried():
    flaky, backend = _FlakyRay(failures=ray_backend.LOCAL_START_ATTEMPTS - 1), _bare_backend()
    flaky.is_initialized = lambda: False
    backend._connect(flaky)
    assert backend._started_ray
    assert (flaky.inits, flaky.shutdowns) == (ray_backend.LOCAL_START_ATTEMPTS, ray_backend.LOCAL_START_ATTEMPTS - 1)


def test_a_local_ray_that_never_starts_says_each_attempt_and_the_raylet_log(tmp_path, monkeypatch):
    (tmp_path / "raylet.err").write_text("a line\nplasma store: not enough shared memory\n")
    monkeypatch.setattr(ray_backend, "RAY_SESSION_LOGS", tmp_path)
    flaky, backend = _FlakyRay(failures=99), _bare_backend()
    flaky.is_initialized = lambda: False
    with pytest.raises(OSError, match="cannot start a local Ray") as caught:
        backend._connect(flaky)
    message = str(caught.value)
    assert message.count("timed out during startup") == ray_backend.LOCAL_START_ATTEMPTS
    assert "not enough shared memory" in message
    assert not backend._started_ray and flaky.shutdowns == ray_backend.LOCAL_START_ATTEMPTS


# ------------------------------------------------------------------------------------- with a local Ray

ray_marked = pytest.mark.ray


@pytest.fixture(scope="module")
def ref(loaded: Bundle) -> Reference:
    return Reference(loaded)


@pytest.fixture(scope="module")
def ray_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ray") / "ray.yaml"
    # 1 CPU for the whole local Ray; two deployments of one replica each fit in it
    path.write_text("local_num_cpus: 1\nnum_cpus: 0.5\nmax_batch_size: 16\nobject_store_mib: 80\n")
    return path


@pytest.fixture(scope="module")
def servers(loaded, ray_config):
    """A plain cloud, a Ray cloud (it starts the local Ray) and a plain edge in front of the plain cloud."""
    pytest.importorskip("ray")
    plain = build_cloud_server(ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=2), bundle=loaded).start()
    config = ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=2, backend="ray", ray_config=ray_config)
    on_ray = build_cloud_server(config, bundle=loaded).start()
    yield plain, on_ray
    on_ray.stop(0)
    plain.stop(0)


@pytest.fixture(scope="module")
def samples(ref: Reference) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, hidden at d) over lengths that land in both buckets (16, 32) and on their edges."""
    rng = np.random.default_rng(0)
    lengths = [2, 3, 5, 8, 9, 13, 16, 17, 21, 30, ref.max_length, 7, 4]
    return [(ids, ref.hidden(ids, ref.d)) for ids in (ref.tokens(rng, n) for n in lengths)]


def _cloud_requests(loaded: Bundle, ref: Reference, samples) -> list[pb.InferRequest]:
    out = []
    for i, (ids, _) in enumerate(samples):
        out.append(request(loaded.bundle_id, 0, ids, rid=f"t{i}"))
        out.append(request(loaded.bundle_id, ref.e, ref.hidden(ids, ref.e), rid=f"e{i}"))
        out.append(request(loaded.bundle_id, ref.r, ref.hidden(ids, ref.r), rid=f"r{i}"))
    return out


def _same_answers(a: list[pb.InferReply], b: list[pb.InferReply]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.request_id, x.label, x.tier, x.exit_depth, x.degraded) == (
            y.request_id,
            y.label,
            y.tier,
            y.exit_depth,
            y.degraded,
        )
        np.testing.assert_allclose(x.probabilities, y.probabilities, atol=TOL)


@ray_marked
def test_ray_cloud_gives_the_plain_cloud_answers(servers, loaded, ref, samples):
    plain, on_ray = servers
    requests = _cloud_requests(loaded, ref, samples)
    expected = [cloud_stub(plain).Infer(r, timeout=30) for r in requests]
    one_by_one = [cloud_stub(on_ray).Infer(r, timeout=30) for r in requests]
    _same_answers(one_by_one, expected)
    for reply, req in zip(one_by_one, requests, strict=True):  # and they are right, not just equal
        sample = req.input_ids if req.depth == 0 else req.hidden
        values = decode_tensor(sample, "x", 1 if req.depth == 0 else 2, (pb.INT64, pb.FP32), 10**6)
        np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(req.depth, values), atol=TOL)
    # concurrent: the front batches mixed lengths and depths, the replica regroups them by graph and bucket
    stub = cloud_stub(on_ray)
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda r: stub.Infer(r, timeout=30), requests * 2))
    _same_answers(concurrent, expected * 2)
    streamed = list(stub.InferStream(iter(requests), timeout=60))
    _same_answers(streamed, expected)
    assert on_ray.metrics.registry.get_sample_value("cartosplit_requests_total", {"tier": "cloud", "code": "OK"}) == (
        len(requests) * 4
    )


@ray_marked
def test_ray_front_still_refuses_bad_input(servers, loaded, ref, samples):
    _, on_ray = servers
    stub = cloud_stub(on_ray)
    ids, _ = samples[4]
    bad_ids = ids.copy()
    bad_ids[1] = ref.vocab_size + 5
    assert (
        code_of(lambda: stub.Infer(request(loaded.bundle_id, 0, bad_ids), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    narrow = np.zeros((4, ref.hidden_size - 1), dtype=np.float32)
    assert (
        code_of(lambda: stub.Infer(request(loaded.bundle_id, ref.e, narrow), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    too_long = np.zeros((ref.max_length + 1, ref.hidden_size), dtype=np.float32)
    assert (
        code_of(lambda: stub.Infer(request(loaded.bundle_id, ref.e, too_long), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    nan = np.full((4, ref.hidden_size), np.nan, dtype=np.float32)
    assert (
        code_of(lambda: stub.Infer(request(loaded.bundle_id, ref.e, nan), timeout=10))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: stub.Infer(request("other", 0, ids), timeout=10)) == grpc.StatusCode.FAILED_PRECONDITION
    # and it keeps serving
    reply = stub.Infer(request(loaded.bundle_id, 0, ids), timeout=30)
    np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(0, ids), atol=TOL)


@ray_marked
def test_ray_edge_gives_the_plain_edge_answers(servers, loaded, ref, samples, ray_config):
    plain_cloud, _ = servers

    def edge(alpha: float, **extra) -> TierServer:
        config = ServerConfig(loaded.folder, fmt=FP32, max_wait_ms=2, **extra)
        return build_edge_server(config, plain_cloud.address, alpha, bundle=loaded).start()

    # the Ray cloud started Ray in this process: this edge joins it (and deploys an application of its own)
    on_ray, plain = edge(math.inf, backend="ray", ray_config=ray_config), edge(math.inf)
    try:
        requests = [request(loaded.bundle_id, ref.d, hidden, rid=f"d{i}") for i, (_, hidden) in enumerate(samples)]
        # alpha inf: every sample goes on to the cloud with the edge's hidden_out, trimmed of the bucket padding
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(lambda r: edge_stub(on_ray).Infer(r, timeout=30), requests))
        _same_answers(got, [edge_stub(plain).Infer(r, timeout=30) for r in requests])
        assert {r.tier for r in got} == {pb.CLOUD}
        on_ray.servicer.alpha_edge = plain.servicer.alpha_edge = 0.0  # now the edge exit answers
        requests = [request(loaded.bundle_id, ref.d, hidden, rid=f"x{i}") for i, (_, hidden) in enumerate(samples)]
        got = [edge_stub(on_ray).Infer(r, timeout=30) for r in requests]  # new ids: not from the reply cache
        _same_answers(got, [edge_stub(plain).Infer(r, timeout=30) for r in requests])
        assert {r.tier for r in got} == {pb.EDGE}
        bad = request(loaded.bundle_id, ref.d, np.zeros((3, ref.hidden_size + 1), dtype=np.float32))
        assert code_of(lambda: edge_stub(on_ray).Infer(bad, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        on_ray.stop(0)
        plain.stop(0)


@ray_marked
def test_a_front_attaches_to_a_deployed_application(servers, loaded, ref, samples):
    _, on_ray = servers
    app = on_ray.servicer.backend.app_name
    config = ServerConfig(loaded.folder, fmt=FP32, backend="ray", ray_app=app)
    second = build_cloud_server(config, bundle=loaded).start()
    try:
        ids, _ = samples[5]
        reply = cloud_stub(second).Infer(request(loaded.bundle_id, 0, ids), timeout=30)
        np.testing.assert_allclose(reply.probabilities, ref.cloud_probs(0, ids), atol=TOL)
    finally:
        second.stop(0)
    # the attached front did not take the application with it
    reply = cloud_stub(on_ray).Infer(request(loaded.bundle_id, 0, ids), timeout=30)
    assert reply.label == int(np.argmax(ref.cloud_probs(0, ids)))
    with pytest.raises(ValueError, match="cannot use the Serve application 'no-such-app'"):
        build_cloud_server(ServerConfig(loaded.folder, fmt=FP32, backend="ray", ray_app="no-such-app"), bundle=loaded)
    wrong_format = ServerConfig(loaded.folder, fmt="onnx-int8", backend="ray", ray_app=app)
    with pytest.raises(ValueError, match="this front needs"):
        build_cloud_server(wrong_format, bundle=loaded)


def _children(pid: int) -> set[int]:
    """Every process descending from ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@ray_marked
def test_serve_cloud_on_ray_stops_on_sigterm_and_takes_ray_with_it(loaded, ray_config, servers):
    """The CLI path: starts its own local Ray, answers, and on SIGTERM leaves no Ray process behind.

    ``servers`` makes sure this test runs after the in-process ones (so the two Rays do not overlap long).
    """
    servers[1].stop(0)  # free the in-process Ray's CPU first; stop() is idempotent for the fixture
    import ray

    assert not ray.is_initialized()
    command = [sys.executable, "-m", "cartosplit", "serve-cloud", "--bundle", str(loaded.folder)]
    command += ["--port", "0", "--format", FP32, "--backend", "ray", "--ray-config", str(ray_config)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().strip()
        match = re.fullmatch(r"cloud serving .* on 127\.0\.0\.1:(\d+)", line)
        assert match, line or proc.stderr.read()
        assert _children(proc.pid), "a local Ray runs as children of the server"
        channel = grpc.insecure_channel(f"127.0.0.1:{match.group(1)}")
        ids = Reference(loaded).tokens(np.random.default_rng(3), 9)
        reply = pb_grpc.CloudTierStub(channel).Infer(request(loaded.bundle_id, 0, ids), timeout=30)
        assert reply.tier == pb.CLOUD and len(reply.probabilities) == 2
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        events = {m.group(1) for m in re.finditer(r'"event": "(\w+)"', proc.stderr.read())}
        assert {"ray_connected", "ray_deployed", "started", "signal", "ray_closed", "stopped"} <= events
        assert _all_gone(children), f"Ray processes left behind: {[p for p in children if _is_running(p)]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _all_gone(pids: set[int], patience_s: float = 30.0) -> bool:
    """Ray's workers notice their raylet went away within seconds; wait that long, no more."""
    deadline = time.monotonic() + patience_s
    while any(_is_running(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
