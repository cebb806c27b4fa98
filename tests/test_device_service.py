"""``cartosplit serve-device``: its TOML config, and a live service on a loopback port.

The live tests run the real DeviceRuntime on the tiny ``bundle`` fixture with no edge or cloud, so the
device answers everything (marked degraded where the policy wanted another tier). Runtimes that block or
fail on purpose check the busy (503) and internal-error (500) paths without any timing assumption.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cartosplit.device_runtime.service import (
    ConfigError,
    DeviceService,
    load_config,
    notify_systemd,
    parse_classify_request,
    parse_config,
    serve,
)

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["the movie was very good", "boring plot", "this film is quite awful but the actors were superb"]


# --- configuration ----------------------------------------------------------------------------------------


def test_shipped_pi_config_parses_with_the_service_loader():
    config = load_config(REPO / "deploy" / "pi" / "device.toml")
    assert config.bundle == Path("/opt/cartosplit/bundle")
    assert (config.backend, config.format, config.encoding, config.threads) == ("onnxruntime", "onnx-int8", "fp16", 4)
    assert (config.edge, config.cloud, config.timeout_s) == ("edge.example.lan:50051", "cloud.example.com:50052", 2.0)
    assert config.ca == Path("/etc/cartosplit/tls/ca.pem") and config.key == Path("/etc/cartosplit/tls/device.key")
    assert config.token_file == Path("/etc/cartosplit/tls/token")
    assert (config.host, config.port, config.allow_non_loopback) == ("127.0.0.1", 8470, False)
    assert (config.max_texts, config.max_chars, config.max_body_bytes, config.max_pending) == (32, 10000, 1 << 20, 8)
    assert (config.read_timeout_s, config.max_connections) == (10.0, 32)


def test_the_unit_file_starts_the_service_with_the_shipped_config_path():
    unit = (REPO / "deploy" / "pi" / "cartosplit-device.service").read_text()
    assert "ExecStart=/opt/cartosplit/venv/bin/cartosplit serve-device --config /etc/cartosplit/device.toml" in unit
    for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict", "Type=notify"):
        assert line in unit.splitlines()


def test_minimal_config_takes_the_defaults_and_resolves_relative_paths(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text('bundle = "bundles/b"\n[tls]\nca = "ca.pem"\n')
    config = load_config(path)
    assert config.bundle == tmp_path / "bundles" / "b"  # relative to the file, not the working directory
    assert config.ca == tmp_path / "ca.pem"
    assert (config.host, config.port, config.backend, config.format) == ("127.0.0.1", 8470, "onnxruntime", None)
    assert config.edge is None and config.cloud is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('bundle = "b"\nthreds = 2\n', r"unknown key 'threds'; the top level takes"),
        ('bundle = "b"\n[server]\nedge = "h:1"\n', r"unknown section \[server\]"),
        ('bundle = "b"\n[servers]\nedge = "h:1"\nretries = 2\n', r"unknown key 'servers.retries'"),
        ('backend = "onnxruntime"\n', "'bundle' .* is required"),
        ('bundle = "b"\nbackend = "tensorflow"\n', r"backend must be one of \['onnxruntime', 'litert'\]"),
        ('bundle = "b"\nthreads = "4"\n', "threads must be an integer"),
        ('bundle = "b"\nthreads = 0\n', "threads must be a positive integer"),
        ('bundle = "b"\n[listen]\nport = 70000\n', "port must be a port number"),
        ('bundle = "b"\n[servers]\nedge = "no-port"\n', "servers.edge must be HOST:PORT"),
        ('bundle = "b"\n[servers]\ntimeout = 0\n', "timeout must be a positive number"),
        ('bundle = ""\n', "bundle must be a non-empty string"),
        ('bundle = "b"\n[tls]\nca = "c"\ncert = "x"\n', "tls.cert and tls.key go together"),
        ('bundle = "b"\n[tls]\ntoken_file = "t"\n', "token_file needs tls.ca"),
        ('bundle = "b"\nbackend = "litert"\nformat = "onnx-int8"\n', "does not run on backend 'litert'"),
        ('bundle = "b"\n[listen]\nhost = "0.0.0.0"\n', "not a loopback address"),
        ('bundle = "b"\n[limits]\nmax_texts = true\n', "max_texts must be an integer"),
        ('bundle = "b"\n[limits]\nmax_connections = 0\n', "max_connections must be a positive integer"),
        ('bundle = "b"\n[listen]\nallow_non_loopback = "yes"\n', "must be true or false"),
        ('bundle = "b"\nbundle = "c"\n', "not valid TOML"),
        ("bundle = b\n", "not valid TOML"),
    ],
)
def test_bad_configs_are_refused_with_the_reason(tmp_path, text, message):
    path = tmp_path / "device.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert str(path) in str(error.value)  # the file is named, so a unit's journal says which one


def test_non_loopback_host_needs_the_explicit_switch():
    config = parse_config('bundle = "/b"\n[listen]\nhost = "0.0.0.0"\nallow_non_loopback = true\n')
    assert config.host == "0.0.0.0"
    assert parse_config('bundle = "/b"\n[listen]\nhost = "::1"\n').host == "::1"


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_classify_request_parsing():
    config = parse_config('bundle = "/b"\n[limits]\nmax_texts = 2\nmax_chars = 10\n')
    assert parse_classify_request(b'{"texts": ["a b"]}', config) == (["a b"], None)
    assert parse_classify_request(b'{"texts": ["a"], "text_pairs": ["b"]}', config) == (["a"], ["b"])
    for body, status in [
        (b"\xff", 400),
        (b"{", 400),
        (b"[]", 400),
        (b'{"texts": []}', 400),
        (b'{"texts": "a"}', 400),
        (b'{"texts": ["a"], "extra": 1}', 400),
        (b'{"texts": ["a", " "]}', 400),
        (b'{"texts": ["a", 3]}', 400),
        (b'{"texts": ["a"], "text_pairs": ["b", "c"]}', 400),
        (b'{"texts": ["a", "b", "c"]}', 413),
        (b'{"texts": ["aaaaaaaaaaa"]}', 413),
        (b'{"texts": ["a"], "text_pairs": ["bbbbbbbbbbb"]}', 413),
    ]:
        with pytest.raises(Exception) as error:
            parse_classify_request(body, config)
        assert getattr(error.value, "status", None) == status, body


# what an independent check sent: each was a 500 (TypeError in the tokenizer, RecursionError, ValueError)
UNREADABLE = [
    (b'{"texts": ["\\ud800"]}', r"texts\[0\] holds a lone surrogate \(U\+D800 at character 0\)"),
    (b'{"texts": ["a"], "text_pairs": ["ok \\udfff"]}', r"text_pairs\[0\] holds a lone surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"texts": ["a"], "x": 1' + b"1" * 5000 + b"}", "a number of more than 4300 digits"),
]


@pytest.mark.parametrize(("body", "message"), UNREADABLE, ids=["surrogate", "surrogate-pair", "nested", "digits"])
def test_unreadable_json_is_a_400_naming_the_problem(body, message):
    config = parse_config('bundle = "/b"\n')
    with pytest.raises(Exception) as error:
        parse_classify_request(body, config)
    assert getattr(error.value, "status", None) == 400 and re.search(message, error.value.message)
    assert parse_classify_request(b'{"texts": ["\\ud83d\\ude00 a pair is fine"]}', config)[0] == [
        "\U0001f600 a pair is fine"
    ]


# --- a live service ---------------------------------------------------------------------------------------


class Running:
    """``serve()`` in a thread on a free loopback port; ``stop()`` shuts it down like SIGTERM would."""

    def __init__(self, config, runtime=None) -> None:
        self.ready = threading.Event()
        self.service: DeviceService | None = None
        self.result: list = []

        def on_ready(service):
            self.service = service
            self.ready.set()

        def run():
            try:
                self.result.append(serve(config, runtime=runtime, ready=on_ready))
            except BaseException as exc:
                self.result.append(exc)
                self.ready.set()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert self.ready.wait(120), "the service did not start"
        assert self.service is not None, self.result
        self.port = self.service.server_address[1]

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            data = response.read()
            return response.status, (json.loads(data) if data else None)
        finally:
            connection.close()

    def classify(self, payload) -> tuple[int, dict]:
        body = json.dumps(payload).encode()
        return self.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})

    def stop(self) -> None:
        self.service.shutdown()
        self.thread.join(30)
        assert not self.thread.is_alive()


def _config(bundle: Path, **limits) -> object:
    extra = "".join(f"{k} = {v}\n" for k, v in limits.items())
    return parse_config(f'bundle = "{bundle}"\nthreads = 1\n[listen]\nport = 0\n[limits]\n{extra}')


@pytest.fixture(scope="module")
def live(bundle):
    running = Running(_config(bundle, max_texts=4, max_chars=200, max_body_bytes=4096))
    yield running
    running.stop()


def test_classify_answers_like_cartosplit_run(live, bundle):
    from cartosplit.device_runtime.runtime import DeviceRuntime

    status, reply = live.classify({"texts": TEXTS})
    assert status == 200
    predictions = reply["predictions"]
    with DeviceRuntime(bundle, threads=1) as runtime:  # what `cartosplit run` computes, with no servers
        expected = [{"index": i, **p.to_dict()} for i, p in enumerate(runtime.predict(TEXTS))]
    assert [p["index"] for p in predictions] == [0, 1, 2]
    for got, want in zip(predictions, expected, strict=True):
        assert set(got) == set(want)
        assert (got["label"], got["tier"], got["route"], got["degraded"]) == (
            want["label"],
            want["tier"],
            want["route"],
            want["degraded"],
        )
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
        assert got["tier"] == "device" and got["bytes_sent"] == 0  # no servers configured: nothing leaves


def test_text_pairs_are_accepted_by_a_pair_model_and_refused_by_a_single_text_one(live):
    model = live.service.runtime.bundle.manifest.model
    body = {"texts": ["good", "bad"], "text_pairs": ["the plot", "the actors"]}
    assert model.text_pairs is False  # the tiny model was trained on single texts
    status, reply = live.classify(body)
    assert status == 400 and "single texts" in reply["error"]
    model.text_pairs = True
    try:
        status, reply = live.classify(body)
        assert status == 200 and len(reply["predictions"]) == 2
        status, reply = live.classify({"texts": ["good"]})
        assert status == 400 and "text pairs" in reply["error"]
    finally:
        model.text_pairs = False


def test_health_names_the_bundle_and_the_tiers(live, bundle):
    status, health = live.request("GET", "/healthz")
    assert status == 200 and health["status"] == "ok"
    assert health["bundle"] == str(bundle)
    assert health["bundle_id"] == live.service.runtime.bundle.bundle_id and len(health["bundle_id"]) == 64
    assert health["tiers"] == {"device": True, "edge": None, "cloud": None}
    assert health["format"] == "onnx-int8" and health["labels"] == live.service.runtime.labels
    assert health["limits"] == {"max_texts": 4, "max_chars": 200}


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    [
        ("POST", "/v1/classify", b"{not json", {}, 400, "not JSON"),
        ("POST", "/v1/classify", b"\xff\xfe", {}, 400, "not UTF-8"),
        ("POST", "/v1/classify", b'{"texts": []}', {}, 400, "non-empty list"),
        ("POST", "/v1/classify", b'{"texts": ["a", ""]}', {}, 400, r"texts\[1\]"),
        ("POST", "/v1/classify", b'{"texts": ["a"], "text_pairs": []}', {}, 400, "as long as"),
        ("POST", "/v1/classify", json.dumps({"texts": ["a"] * 5}).encode(), {}, 413, "5 texts is over"),
        ("POST", "/v1/classify", json.dumps({"texts": ["a" * 201]}).encode(), {}, 413, "201 characters"),
        ("POST", "/v1/classify", b" " * 5000, {}, 413, "5000 bytes is over"),
        ("POST", "/v1/classify", b'{"texts": ["a"]}', {"Content-Type": "text/plain"}, 415, "application/json"),
        ("POST", "/v1/classify", b'{"texts": ["a"]}', {"Content-Length": "x"}, 400, "not a number"),
        ("GET", "/v1/classify", None, {}, 405, "takes POST"),
        ("POST", "/healthz", b"{}", {}, 405, "POST goes to"),
        ("GET", "/nowhere", None, {}, 404, "no such path"),
        ("DELETE", "/v1/classify", None, {}, 405, "use POST"),
        ("POST", "/v1/classify", b'{"texts": ["\\ud800"]}', {}, 400, "lone surrogate"),  # was a 500
        ("POST", "/v1/classify", b"[" * 2000 + b"]" * 2000, {}, 400, "nested too deeply"),  # was a 500
    ],
)
def test_bad_requests_get_4xx_and_the_service_keeps_serving(live, method, path, body, headers, status, message):
    got, reply = live.request(method, path, body, headers)
    assert got == status
    assert reply is not None and re.search(message, reply["error"])
    assert live.classify({"texts": ["good"]})[0] == 200  # still serving


@pytest.mark.parametrize(
    "head",
    [
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /v1/classify HTTP/1.0\r\n\r\n",
    ],
)
def test_a_body_without_content_length_gets_411(live, head):
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as sock:
        sock.sendall(head)
        reply = sock.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.0 411") and "Content-Length" in reply
    assert live.classify({"texts": ["good"]})[0] == 200


def test_a_client_that_stalls_mid_body_does_not_block_others(bundle):
    running = Running(_config(bundle, read_timeout=1.0))
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=30) as stalled:
            stalled.sendall(b"POST /v1/classify HTTP/1.0\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes never come
            assert running.classify({"texts": ["good"]})[0] == 200  # answered while the other one hangs
            assert stalled.recv(4096) == b""  # dropped after read_timeout, with no reply to nobody
        assert running.request("GET", "/healthz")[0] == 200
    finally:
        running.stop()


class BlockingRuntime:
    """predict() waits until released; lets a test hold the model busy deterministically."""

    def __init__(self) -> None:
        self.labels = ["negative", "positive"]
        self.entered = threading.Event()
        self.release = threading.Event()

    def predict(self, texts, text_pairs=None, max_chars=0):
        self.entered.set()
        assert self.release.wait(60)
        return [_StubPrediction() for _ in texts]


class _StubPrediction:
    def to_dict(self) -> dict:
        return {"label": "positive", "tier": "device"}


def test_beyond_max_pending_requests_get_503_then_service_recovers(tmp_path):
    runtime = BlockingRuntime()
    running = Running(parse_config(f'bundle = "{tmp_path}"\n[listen]\nport = 0\n[limits]\nmax_pending = 0\n'), runtime)
    try:
        first: list = []
        worker = threading.Thread(target=lambda: first.append(running.classify({"texts": ["a"]})))
        worker.start()
        assert runtime.entered.wait(30)  # the only slot is taken
        status, reply = running.classify({"texts": ["b"]})
        assert status == 503 and "busy" in reply["error"]
        runtime.release.set()
        worker.join(30)
        assert first[0][0] == 200
        assert first[0][1]["predictions"] == [{"index": 0, "label": "positive", "tier": "device"}]
        assert running.classify({"texts": ["c"]})[0] == 200
        counts = running.request("GET", "/healthz")[1]["counts"]
        assert counts["answered"] == 2 and counts["refused"] == 1
    finally:
        runtime.release.set()
        running.stop()


class FailingRuntime:
    def __init__(self) -> None:
        self.labels = ["negative", "positive"]
        self.calls = 0

    def predict(self, texts, text_pairs=None, max_chars=0):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a graph failed")
        return [_StubPrediction() for _ in texts]


def test_an_internal_error_is_a_500_and_the_next_request_is_served(tmp_path):
    running = Running(parse_config(f'bundle = "{tmp_path}"\n[listen]\nport = 0\n'), FailingRuntime())
    try:
        status, reply = running.classify({"texts": ["a"]})
        assert status == 500 and reply == {"error": "internal error (RuntimeError)"}  # no traceback to the client
        assert running.classify({"texts": ["a"]})[0] == 200
    finally:
        running.stop()


def _stub_config(tmp_path, **limits) -> object:
    extra = "".join(f"{k} = {v}\n" for k, v in limits.items())
    return parse_config(f'bundle = "{tmp_path}"\n[listen]\nport = 0\n[limits]\n{extra}')


def _raw(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send ``data`` on a fresh connection, half-close it and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read()


def _json_error(reply: bytes) -> tuple[int, str]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"Content-Type: application/json" in head, reply[:300]
    return int(head.split()[1]), json.loads(body)["error"]


def test_unreadable_bodies_get_400_and_the_service_keeps_serving(tmp_path):
    running = Running(_stub_config(tmp_path, max_body_bytes=1 << 20), FailingRuntime())
    running.service.runtime.calls = 1  # past its one failure: a predict() call answers
    try:
        for body, message in UNREADABLE:
            status, reply = running.request("POST", "/v1/classify", body, {"Content-Type": "application/json"})
            assert status == 400 and re.search(message, reply["error"]), (body[:40], reply)
        assert running.service.runtime.calls == 1  # none of them reached the model
        assert running.classify({"texts": ["a"]})[0] == 200
    finally:
        running.stop()


def test_errors_of_the_http_parser_are_json_too(live):
    status, error = _json_error(_raw(live.port, b"GARBAGE\r\n\r\n"))
    assert status == 400 and "Bad request" in error
    status, error = _json_error(_raw(live.port, b"NO SUCH THING/1.0\r\n\r\n"))
    assert status == 400 and "version" in error
    status, error = _json_error(_raw(live.port, b"FOO /v1/classify HTTP/1.0\r\n\r\n"))
    assert status == 405 and "Unsupported method ('FOO')" in error and "allowed: GET, POST" in error
    status, error = _json_error(_raw(live.port, b"GET /healthz HTTP/2.0\r\n\r\n"))
    assert status == 400 and "HTTP/1.1" in error  # no 5xx for a client's mistake
    huge = b"GET /healthz HTTP/1.0\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    status, error = _json_error(_raw(live.port, huge))
    assert status == 431 and "Line too long" in error
    status, error = _json_error(_raw(live.port, b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n"))
    assert status == 414
    assert live.classify({"texts": ["good"]})[0] == 200


def test_read_timeout_bounds_the_whole_request_not_each_read(tmp_path):
    running = Running(_stub_config(tmp_path, read_timeout=1.0), FailingRuntime())
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=10) as slow:
            stop = threading.Event()

            def drip():  # a header byte every 0.1 s: each read is quick, the request never ends
                try:
                    slow.sendall(b"POST /v1/classify HTTP/1.0\r\nX-Slow: ")
                    while not stop.wait(0.1):
                        slow.sendall(b"a")
                except OSError:  # the server closed the connection
                    pass

            dripper = threading.Thread(target=drip, daemon=True)
            started = time.monotonic()
            dripper.start()
            with contextlib.suppress(ConnectionResetError):
                assert slow.recv(4096) == b""  # dropped, with nothing to answer
            elapsed = time.monotonic() - started
            stop.set()
            dripper.join(5)
        assert 0.8 < elapsed < 3.0, elapsed  # per read it would have lasted as long as the client liked
        assert running.request("GET", "/healthz")[0] == 200
    finally:
        running.stop()


def test_beyond_max_connections_a_connection_gets_503_and_no_thread(tmp_path):
    running = Running(_stub_config(tmp_path, read_timeout=5.0, max_connections=2), FailingRuntime())
    idle: list[socket.socket] = []
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(2)]
        status, error = _json_error(_raw(running.port, b"GET /healthz HTTP/1.0\r\n\r\n", timeout=10))
        assert status == 503 and "too many connections" in error
        idle += [socket.create_connection(("127.0.0.1", running.port), timeout=10) for _ in range(8)]
        for sock in idle[2:]:  # each answered 503 and closed by the accepting thread
            assert sock.makefile("rb").read().startswith(b"HTTP/1.0 503")
        assert threading.active_count() <= threads + 2
        for sock in idle[:2]:
            sock.close()
        deadline = time.monotonic() + 10
        while (status := running.request("GET", "/healthz")[0]) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # the two handler threads see the close and give their slots back
        assert status == 200
    finally:
        for sock in idle:
            sock.close()
        running.stop()


def test_a_client_that_hangs_up_early_is_one_json_log_line(tmp_path, caplog, capsys):
    runtime = BlockingRuntime()
    running = Running(_stub_config(tmp_path), runtime)
    try:
        with caplog.at_level(logging.INFO, logger="cartosplit.device_service"):
            sock = socket.create_connection(("127.0.0.1", running.port), timeout=10)
            body = b'{"texts": ["a"]}'
            sock.sendall(b"POST /v1/classify HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            assert runtime.entered.wait(30)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset: the answer has nowhere to go
            runtime.release.set()
            deadline = time.monotonic() + 10
            while not any("client_gone" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
                time.sleep(0.05)
        records = [r for r in caplog.records if r.name == "cartosplit.device_service"]
        gone = [json.loads(r.getMessage()) for r in records if "client_gone" in r.getMessage()]
        assert gone and gone[0]["error"] in ("BrokenPipeError", "ConnectionResetError"), [
            r.getMessage() for r in records
        ]
        for record in records:
            json.loads(record.getMessage())  # every line JSON
            assert record.exc_info is None and "Traceback" not in record.getMessage()
        assert "Traceback" not in capsys.readouterr().err
        assert running.classify({"texts": ["b"]})[0] == 200
    finally:
        runtime.release.set()
        running.stop()


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config(f'bundle = "{tmp_path}"\n[listen]\nport = {port}\n')
        with pytest.raises(OSError):
            serve(config, runtime=FailingRuntime())


def test_notify_systemd_sends_ready_to_the_notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert notify_systemd("READY=1")
        assert listener.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify_systemd("READY=1")  # not under systemd: nothing to do


# --- the command line -------------------------------------------------------------------------------------


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cartosplit", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        **kwargs,
    )


def test_cli_refuses_a_bad_config_with_exit_2(tmp_path):
    path = tmp_path / "device.toml"
    path.write_text('bundle = "b"\nport = 1\n')
    result = _cli("serve-device", "--config", str(path))
    assert result.returncode == 2
    assert "unknown key 'port'" in result.stderr and "Traceback" not in result.stderr


def test_cli_check_verifies_the_bundle_and_prints_the_settings(tmp_path, bundle):
    path = tmp_path / "device.toml"
    path.write_text(f'bundle = "{bundle}"\n[tls]\nca = "ca.pem"\n')
    result = _cli("serve-device", "--config", str(path), "--check")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["bundle"] == str(bundle) and settings["ca"] == str(tmp_path / "ca.pem")
    assert settings["format"] == "onnx-int8" and len(settings["bundle_id"]) == 64


def test_cli_serves_until_sigterm(tmp_path, bundle):
    path = tmp_path / "device.toml"
    path.write_text(f'bundle = "{bundle}"\nthreads = 1\n[listen]\nport = 0\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "cartosplit", "serve-device", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = process.stdout.readline()
        assert "device service serving" in line, process.stderr.read() if process.poll() is not None else line
        port = int(line.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        connection.request("POST", "/v1/classify", body=json.dumps({"texts": TEXTS}))
        response = connection.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["predictions"]) == 3
        connection.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
