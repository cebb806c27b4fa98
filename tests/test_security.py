"""TLS, mutual TLS and the bearer token, on in-process servers over real loopback channels.

Certificates come from scripts/make_test_certs.sh (a second run makes an unrelated CA). What a refused
client sees, as these tests pin it down:
- plaintext client -> TLS server: UNAVAILABLE ("failed to connect to all addresses ... Socket closed"):
  the server drops a connection that does not start a TLS handshake, so no call ever reaches it;
- client that does not trust the server's CA: UNAVAILABLE (its handshake fails: CERTIFICATE_VERIFY_FAILED);
- no or a foreign client certificate on a mutual-TLS server: UNAVAILABLE (the server ends the handshake);
- no, a wrong or a malformed token: UNAUTHENTICATED, details "missing or invalid bearer token".
"""

from __future__ import annotations

import io
import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cartosplit.cli import build_parser
from cartosplit.cloud_server.server import build_cloud_server
from cartosplit.device_runtime.bundle import Bundle
from cartosplit.device_runtime.numerics import softmax
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.device_runtime.policy import Policy
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.device_runtime.text import encode, pad_batch
from cartosplit.edge_server.server import build_edge_server, cloud_security_from_args
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor
from cartosplit.protos.security import (
    UNAUTHENTICATED_DETAILS,
    BearerTokenInterceptor,
    ClientSecurity,
    ServerSecurity,
    is_loopback,
    read_token,
)
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.flags import config_from_args
from cartosplit.serving.lifecycle import TierServer
from cartosplit.serving.logs import JsonFormatter

ROOT = Path(__file__).resolve().parents[1]
FP32 = "onnx-fp32"
TOKEN = "tok-3f9c2e7a51d84b06a9e1c5d2b7f40a18"  # distinctive, so a leak anywhere is found by a substring search
TEXTS = ["the film was good", "a bad plot", "it is quite dull", "superb actors", "the movie", "nice but boring"]
Code = grpc.StatusCode


# --------------------------------------------------------------------------------------------------- fixtures


def make_certs(folder: Path) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: scripts/make_test_certs.sh needs it to make the test certificates")
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "make_test_certs.sh"), str(folder)],
        check=True,
        capture_output=True,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "DAYS": "1"},
    )
    return folder


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def other_certs(tmp_path_factory) -> Path:
    """A second, unrelated CA with its own server and client certificates."""
    return make_certs(tmp_path_factory.mktemp("other-certs"))


@pytest.fixture(scope="session")
def tokens(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tokens")
    files = {"right": f"  {TOKEN}\n", "wrong": TOKEN[:-1] + "x\n", "empty": " \n\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    return {name: folder / name for name in files}


@pytest.fixture()
def logs():
    """Everything the servers log (the JSON lines they would print), while the test runs."""
    logger = logging.getLogger("cartosplit")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def tls(certs: Path, client_ca: bool = False, token: Path | None = None) -> ServerSecurity:
    return ServerSecurity(
        cert_file=certs / "server.pem",
        key_file=certs / "server.key",
        client_ca_file=certs / "ca.pem" if client_ca else None,
        token_file=token,
    )


def start_cloud(loaded: Bundle, security: ServerSecurity | None, host: str = "127.0.0.1") -> TierServer:
    config = ServerConfig(bundle=loaded.folder, host=host, port=0, fmt=FP32, max_wait_ms=1, security=security)
    return build_cloud_server(config, bundle=loaded).start()


def tokens_request(loaded: Bundle, rid: str = "r") -> pb.InferRequest:
    """A depth-0 (all-cloud) request: [CLS] good movie [SEP]."""
    msg = pb.InferRequest(request_id=rid, bundle_id=loaded.bundle_id, protocol_version=PROTOCOL_VERSION, depth=0)
    msg.input_ids.CopyFrom(encode_tensor(np.array([2, 6, 19, 3], dtype=np.int64), pb.INT64))
    return msg


def expected_probs(loaded: Bundle) -> np.ndarray:
    ids = np.array([[2, 6, 19, 3]], dtype=np.int64)
    (logits,) = OnnxSession(loaded.graph_file("full", FP32)).run([ids, np.ones_like(ids), np.zeros_like(ids)])
    return softmax(logits[0])


def infer(channel: grpc.Channel, loaded: Bundle, **kwargs) -> pb.InferReply:
    return pb_grpc.CloudTierStub(channel).Infer(tokens_request(loaded), timeout=10, **kwargs)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def reflect(channel: grpc.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return {s.name for s in next(answers).list_services_response.service}


def health_status(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


# ------------------------------------------------------------------------------------------------ TLS, mTLS


def test_tls_cloud_answers_trusting_clients_only(loaded, certs, other_certs):
    server = start_cloud(loaded, tls(certs))
    try:
        for address in (server.address, f"localhost:{server.port}"):  # the certificate names both
            reply = infer(ClientSecurity(ca_file=certs / "ca.pem").channel(address), loaded)
            np.testing.assert_allclose(reply.probabilities, expected_probs(loaded), atol=1e-5)
            assert reply.tier == pb.CLOUD
        # plaintext: the server drops a connection that does not start a TLS handshake -> UNAVAILABLE
        assert refused(lambda: infer(grpc.insecure_channel(server.address), loaded)).code() == Code.UNAVAILABLE
        # a CA that did not sign the server's certificate: the client's handshake fails -> UNAVAILABLE
        stranger = ClientSecurity(ca_file=other_certs / "ca.pem").channel(server.address)
        assert refused(lambda: infer(stranger, loaded)).code() == Code.UNAVAILABLE
        # the name the certificate must carry can be overridden (dialling an address it does not name)
        wrong_name = ClientSecurity(ca_file=certs / "ca.pem", server_name="cloud.example").channel(server.address)
        assert refused(lambda: infer(wrong_name, loaded)).code() == Code.UNAVAILABLE
        right_name = ClientSecurity(ca_file=certs / "ca.pem", server_name="localhost").channel(server.address)
        assert infer(right_name, loaded).tier == pb.CLOUD
    finally:
        server.stop(0)


def test_mutual_tls_lets_in_only_certificates_its_ca_signed(loaded, certs, other_certs):
    server = start_cloud(loaded, tls(certs, client_ca=True))
    ca = certs / "ca.pem"
    try:
        # no client certificate: the server ends the handshake -> UNAVAILABLE
        without = ClientSecurity(ca_file=ca).channel(server.address)
        assert refused(lambda: infer(without, loaded)).code() == Code.UNAVAILABLE
        foreign = ClientSecurity(ca, other_certs / "client.pem", other_certs / "client.key").channel(server.address)
        assert refused(lambda: infer(foreign, loaded)).code() == Code.UNAVAILABLE
        assert refused(lambda: infer(grpc.insecure_channel(server.address), loaded)).code() == Code.UNAVAILABLE
        with_cert = ClientSecurity(ca, certs / "client.pem", certs / "client.key").channel(server.address)
        assert infer(with_cert, loaded).tier == pb.CLOUD
        assert health_status(with_cert) == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)


# ------------------------------------------------------------------------------------------------------ token


def test_bearer_token_guards_every_rpc_but_health(loaded, certs, tokens, logs, capfd):
    server = start_cloud(loaded, tls(certs, token=tokens["right"]))
    ca = certs / "ca.pem"
    try:
        no_token = ClientSecurity(ca_file=ca).channel(server.address)
        wrong = ClientSecurity(ca_file=ca, token_file=tokens["wrong"]).channel(server.address)
        right = ClientSecurity(ca_file=ca, token_file=tokens["right"]).channel(server.address)
        for channel, metadata in [
            (no_token, None),
            (wrong, None),
            (no_token, [("authorization", TOKEN)]),  # no scheme
            (no_token, [("authorization", f"Basic {TOKEN}")]),
            (no_token, [("authorization", f"Bearer {TOKEN}x")]),
            (no_token, [("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other")]),
        ]:
            error = refused(lambda channel=channel, metadata=metadata: infer(channel, loaded, metadata=metadata))
            assert (error.code(), error.details()) == (Code.UNAUTHENTICATED, UNAUTHENTICATED_DETAILS)
            assert TOKEN not in str(error) and TOKEN not in (error.debug_error_string() or "")

        assert infer(right, loaded).tier == pb.CLOUD
        # the header by hand, scheme in any case: what a non-Python client would send
        assert infer(no_token, loaded, metadata=[("authorization", f"bearer {TOKEN}")]).tier == pb.CLOUD

        # streaming RPCs too: the stream is refused before any request is read
        stream = pb_grpc.CloudTierStub(no_token).InferStream(iter([tokens_request(loaded)] * 3), timeout=10)
        assert refused(lambda: list(stream)).code() == Code.UNAUTHENTICATED
        replies = list(pb_grpc.CloudTierStub(right).InferStream(iter([tokens_request(loaded)] * 3), timeout=10))
        assert [r.tier for r in replies] == [pb.CLOUD] * 3

        # health checks are exempt (load balancers probe them); reflection is not
        assert health_status(no_token) == health_pb2.HealthCheckResponse.SERVING
        assert refused(lambda: reflect(no_token)).code() == Code.UNAUTHENTICATED
        assert "cartosplit.v1.CloudTier" in reflect(right)

        # the refused calls never reached the servicer, yet they are counted: 6 Infer calls and 1 stream
        # (the tier's methods only: the refused reflection call is not a request)
        def requests(code: str) -> float:
            return server.metrics.registry.get_sample_value(
                "cartosplit_requests_total", {"tier": "cloud", "code": code}
            )

        assert requests("UNAUTHENTICATED") == 7
        assert requests("OK") == 5
    finally:
        server.stop(0)

    # the token shows up nowhere: not in the server's logs, not in what grpc wrote to stdout/stderr
    lines = [json.loads(line) for line in logs.getvalue().splitlines()]
    events = [line["event"] for line in lines]
    assert events.count("unauthenticated") >= 8 and "request" in events
    assert next(line for line in lines if line["event"] == "started")["security"] == "tls+token"
    refusal = next(line for line in lines if line["event"] == "unauthenticated")
    assert refusal["method"] == "/cartosplit.v1.CloudTier/Infer" and refusal["peer"]
    captured = capfd.readouterr()
    for text in (logs.getvalue(), captured.out, captured.err):
        assert TOKEN not in text


def test_token_without_tls_only_on_loopback(loaded, tokens, logs):
    token_only = ServerSecurity(token_file=tokens["right"])
    # a non-loopback host: refused before anything listens (the token would cross the network in plaintext)
    for host in ("0.0.0.0", "192.0.2.7", "::", "example.com"):
        with pytest.raises(ValueError, match="plaintext"):
            ServerConfig(bundle=loaded.folder, host=host, fmt=FP32, security=token_only)
    # loopback: allowed, with a warning in the log
    server = start_cloud(loaded, token_only)
    try:
        assert any(json.loads(line)["event"] == "token_without_tls" for line in logs.getvalue().splitlines()), (
            logs.getvalue()
        )
        # a client refuses to send a token in plaintext unless told so; then only to a loopback address
        with pytest.raises(ValueError, match="without TLS"):
            ClientSecurity(token_file=tokens["right"]).channel(server.address)
        local = ClientSecurity(token_file=tokens["right"], loopback_plaintext=True).channel(server.address)
        assert infer(local, loaded).tier == pb.CLOUD
        error = refused(lambda: infer(grpc.insecure_channel(server.address), loaded))
        assert error.code() == Code.UNAUTHENTICATED
    finally:
        server.stop(0)
    assert TOKEN not in logs.getvalue()


# --------------------------------------------------------------------------------------- device -> edge -> cloud


def test_device_edge_cloud_over_tls_and_token(loaded, certs, tokens, logs):
    ca = certs / "ca.pem"
    cloud = start_cloud(loaded, tls(certs, token=tokens["right"]))
    edges = []

    def start_edge(cloud_security: ClientSecurity) -> TierServer:
        config = ServerConfig(
            loaded.folder, port=0, fmt=FP32, max_wait_ms=1, security=tls(certs, token=tokens["right"])
        )
        edge = build_edge_server(config, cloud.address, math.inf, bundle=loaded, cloud_security=cloud_security)
        edges.append(edge)
        return edge.start()

    try:
        # the equivalent of serve-edge --cloud-ca ca.pem --cloud-token-file token
        edge = start_edge(ClientSecurity(ca_file=ca, token_file=tokens["right"]))
        security = ClientSecurity(ca_file=ca, token_file=tokens["right"])
        with DeviceRuntime(loaded, edge=edge.address, cloud=cloud.address, fmt=FP32, security=security) as rt:
            rt.policy = Policy(alpha_device=math.inf, alpha_edge=math.inf)  # every input climbs to the edge
            via_edge = rt.predict(TEXTS)
            rt.policy = Policy(alpha_device=math.inf, alpha_edge=math.inf, hard_margin=0.0)  # straight to the cloud
            direct = rt.predict(TEXTS)
        assert all(p.route == "cloud_via_edge" and not p.degraded and not p.errors for p in via_edge), via_edge
        assert all(p.route == "cloud_direct" and not p.degraded and not p.errors for p in direct), direct

        # a device without the token: both tiers refuse it, its own exit answers (degraded)
        untrusted = ClientSecurity(ca_file=ca)
        with DeviceRuntime(loaded, edge=edge.address, cloud=cloud.address, fmt=FP32, security=untrusted) as rt:
            rt.policy = Policy(alpha_device=math.inf, alpha_edge=math.inf)
            (lonely,) = rt.predict(TEXTS[:1])
        assert lonely.tier == "device" and lonely.degraded
        assert len(lonely.errors) == 2 and all("UNAUTHENTICATED" in e for e in lonely.errors), lonely.errors

        # an edge without the cloud's token: it answers from its own exit, marked degraded
        no_token_edge = start_edge(ClientSecurity(ca_file=ca))
        stub = pb_grpc.EdgeTierStub(security.channel(no_token_edge.address))
        with DeviceRuntime(loaded, fmt=FP32) as rt:  # only for the hidden state at depth d
            (encoded,) = encode(rt.tokenizer, TEXTS[:1])
            hidden_d, _ = rt.graphs.run_tail(rt.graphs.run_head(pad_batch([encoded]))[1])
        request = pb.InferRequest(
            request_id="e1",
            bundle_id=loaded.bundle_id,
            protocol_version=PROTOCOL_VERSION,
            depth=loaded.split_points.device,
        )
        request.hidden.CopyFrom(encode_tensor(hidden_d, pb.FP32))
        reply = stub.Infer(request, timeout=10)
        assert (reply.tier, reply.degraded) == (pb.EDGE, True)
        assert any(
            line["event"] == "forward_failed" and line["reason"].startswith("UNAUTHENTICATED")
            for line in map(json.loads, logs.getvalue().splitlines())
        )
    finally:
        for edge in edges:
            edge.stop(0)
        cloud.stop(0)
    assert TOKEN not in logs.getvalue()


# ------------------------------------------------------------------------------------------- files, CLI, repr


def test_bad_files_are_refused_with_their_path_never_their_contents(certs, tokens, tmp_path):
    with pytest.raises(ValueError, match="is empty") as info:
        read_token(tokens["empty"])
    assert str(tokens["empty"]) in str(info.value)
    assert read_token(tokens["right"]) == TOKEN  # whitespace around it stripped
    (tmp_path / "two").write_text(f"{TOKEN} second\n")
    with pytest.raises(ValueError, match="one token") as info:
        read_token(tmp_path / "two")
    assert TOKEN not in str(info.value)
    with pytest.raises(ValueError, match=r"cannot read the token file .*missing"):
        read_token(tmp_path / "missing")

    with pytest.raises(ValueError, match=r"cannot read the TLS key file .*nope\.key"):
        ServerSecurity(cert_file=certs / "server.pem", key_file=tmp_path / "nope.key").server_credentials()
    # a key where the certificate should be: refused, and the key's contents never in the message
    with pytest.raises(ValueError, match="not PEM") as info:
        ServerSecurity(cert_file=certs / "server.key", key_file=certs / "server.key").server_credentials()
    assert "BEGIN PRIVATE KEY" not in str(info.value)
    with pytest.raises(ValueError, match="not PEM"):
        ClientSecurity(ca_file=tokens["right"]).channel("localhost:1")
    with pytest.raises(ValueError, match="client CA file"):
        ServerSecurity(certs / "server.pem", certs / "server.key", tmp_path / "ca-gone.pem").server_credentials()

    # half-configured settings are refused up front
    for make in (
        lambda: ServerSecurity(cert_file=certs / "server.pem"),
        lambda: ServerSecurity(client_ca_file=certs / "ca.pem"),
        lambda: ClientSecurity(ca_file=certs / "ca.pem", cert_file=certs / "client.pem"),
        lambda: ClientSecurity(cert_file=certs / "client.pem", key_file=certs / "client.key"),
        lambda: ClientSecurity(server_name="cloud"),
        lambda: BearerTokenInterceptor(""),
    ):
        with pytest.raises(ValueError):
            make()

    # reprs name paths and the mode, never what the files hold
    server = tls(certs, client_ca=True, token=tokens["right"])
    client = ClientSecurity(certs / "ca.pem", certs / "client.pem", certs / "client.key", tokens["right"])
    assert "mode='mtls+token'" in repr(server) and "mode='mtls+token'" in repr(client)
    for text in (repr(server), repr(client), str(server), repr(BearerTokenInterceptor(TOKEN))):
        assert TOKEN not in text and "PRIVATE KEY" not in text
    assert ServerSecurity().mode == ClientSecurity().mode == "none"
    assert [is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "[::1]", "localhost", "0.0.0.0", "::")] == [
        *[True] * 5,
        False,
        False,
    ]


def test_command_line_flags_reach_the_settings(certs, tokens):
    parser = build_parser("serve-cloud", "serve-edge", "run")
    args = parser.parse_args(
        [
            "serve-cloud",
            "--bundle",
            "b",
            "--tls-cert",
            str(certs / "server.pem"),
            "--tls-key",
            str(certs / "server.key"),
            "--tls-client-ca",
            str(certs / "ca.pem"),
            "--token-file",
            str(tokens["right"]),
        ]
    )
    expected = tls(certs, client_ca=True, token=tokens["right"])
    security = config_from_args(args).security
    assert security.mode == "mtls+token"
    assert [str(getattr(security, f)) for f in ("cert_file", "key_file", "client_ca_file", "token_file")] == [
        str(getattr(expected, f)) for f in ("cert_file", "key_file", "client_ca_file", "token_file")
    ]
    assert config_from_args(parser.parse_args(["serve-cloud", "--bundle", "b"])).security is None

    args = parser.parse_args(
        ["serve-edge", "--bundle", "b", "--cloud", "c:1", "--cloud-ca", "ca.pem", "--cloud-token-file", "t"]
    )
    assert cloud_security_from_args(args) == ClientSecurity(ca_file="ca.pem", token_file="t")
    assert cloud_security_from_args(parser.parse_args(["serve-edge", "--bundle", "b", "--cloud", "c:1"])) is None

    args = parser.parse_args(["run", "--bundle", "b", "--ca", "a", "--cert", "c", "--key", "k", "--token-file", "t"])
    assert (args.ca, args.cert, args.key, args.token_file) == ("a", "c", "k", "t")


def test_servers_refuse_a_plaintext_token_at_start(certs, tokens, bundle):
    """Through the real command lines: a clear error and exit code 2, before any port is bound."""
    cli = [sys.executable, "-m", "cartosplit"]
    common = ["--bundle", str(bundle), "--port", "0", "--format", FP32]
    cloud = subprocess.run(
        [*cli, "serve-cloud", *common, "--host", "0.0.0.0", "--token-file", str(tokens["right"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cloud.returncode == 2 and "plaintext" in cloud.stderr and "--tls-cert" in cloud.stderr
    edge = subprocess.run(
        [*cli, "serve-edge", *common, "--cloud", "127.0.0.1:1", "--cloud-token-file", str(tokens["right"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert edge.returncode == 2 and "without TLS" in edge.stderr
    for result in (cloud, edge):
        assert TOKEN not in result.stdout + result.stderr


def test_the_command_lines_end_to_end(bundle, certs, tokens, tmp_path, monkeypatch):
    """serve-cloud and serve-edge with TLS + token as processes, and `cartosplit run` reaching them."""
    from cartosplit.cli import main
    from cartosplit.serving.process import ServerProcess

    # the device never confident, the edge never either (--alpha-edge inf): every input crosses both links
    monkeypatch.setattr(Policy, "from_dict", staticmethod(lambda _: Policy(alpha_device=math.inf)))

    common = ["--bundle", str(bundle), "--port", "0", "--format", FP32]
    tls_flags = ["--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key")]
    token = ["--token-file", str(tokens["right"])]
    cloud = ServerProcess(["serve-cloud", *common, *tls_flags, *token], "cloud")
    edge = None
    try:
        forward = ["--cloud", cloud.address, "--alpha-edge", "inf", "--cloud-ca", str(certs / "ca.pem")]
        forward += ["--cloud-token-file", str(tokens["right"])]
        edge = ServerProcess(["serve-edge", *common, *tls_flags, *token, *forward], "edge")
        (tmp_path / "in.txt").write_text("\n".join(TEXTS) + "\n")
        run = ["run", "--bundle", str(bundle), "--edge", edge.address, "--cloud", cloud.address, "--format", FP32]
        run += ["--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "out.jsonl")]
        assert main([*run, "--ca", str(certs / "ca.pem"), "--token-file", str(tokens["right"])]) == 0
        answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert [(a["route"], a["degraded"], a["errors"]) for a in answers] == [("cloud_via_edge", False, [])] * 6
        # without the token: both tiers refuse, the device answers alone (degraded) and says why
        assert main([*run, "--ca", str(certs / "ca.pem")]) == 0
        answers = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert all(a["tier"] == "device" and a["degraded"] for a in answers)
        assert "UNAUTHENTICATED" in answers[0]["errors"][0]
    finally:
        for server in (edge, cloud):
            if server is not None:
                server.stop()
    for server in (edge, cloud):
        assert TOKEN not in "\n".join(server.stderr_tail)
