"""``cartosplit serve-device``: the device runtime as a small local HTTP service (a Pi's systemd unit).

Apps on the same board POST text and get the same per-input answers ``cartosplit run`` writes; the
runtime (graphs, tokenizer, gRPC channels to the edge and the cloud) is loaded once and kept warm.

    GET  /healthz      -> {"status": "ok", "bundle_id": ..., "tiers": {...}, "audit": {...} or null, ...}
    GET  /metrics      -> the audit monitor's live bound and counts, Prometheus text format
    POST /v1/classify  {"texts": [...], "text_pairs": [...]?} -> {"predictions": [{"index": 0, "label": ...}, ...]}

Standard library only (``http.server``, ``tomllib``); listens on 127.0.0.1 unless the config says otherwise.
The HTTP side has no TLS and no authentication, so a non-loopback address must be allowed explicitly.
Every bad request gets a 4xx with a JSON ``{"error": ...}`` (errors of the HTTP parser included) and the
service keeps serving; requests are answered one at a time (one model, one board), a bounded number wait,
beyond that 503. A client has ``read_timeout`` seconds for its whole request (headers and body), and at most
``max_connections`` connections are open at once (one thread each); the next one gets 503 and is closed.
The log is JSON lines, one per event: a client that goes away is one line, never a traceback.

Configuration: one TOML file, see ``deploy/pi/device.toml``. Unknown sections or keys are errors, so a
typo cannot silently fall back to a default; relative paths are relative to the file's folder.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cartosplit.device_runtime.bundle import FORMATS
from cartosplit.device_runtime.cpu_features import AUTO
from cartosplit.device_runtime.inputs import InputError, pair_problem, parse_json, text_problem, trained_on_pairs
from cartosplit.protos.addresses import is_loopback

log = logging.getLogger("cartosplit.device_service")

DEFAULT_PORT = 8470
API_PATH = "/v1/classify"
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"  # the audit monitor's bound, Prometheus text format


class ConfigError(ValueError):
    """The service's TOML file cannot be read or holds something the service does not accept."""


# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceConfig:
    """Everything ``serve-device`` needs, from one TOML file (:func:`load_config`)."""

    bundle: Path
    backend: str = "onnxruntime"
    format: str | None = None  # default: int8 of the backend when the bundle has it; "auto": from the CPU
    encoding: str = "fp16"  # activations on the wire to the edge/cloud
    threads: int | None = None  # CPU threads for the device graphs
    low_memory: bool = False  # onnxruntime without its memory arena and memory-pattern planner
    advice: Path | None = None  # with format = "auto": a `cartosplit bench device` result of this machine
    edge: str | None = None  # HOST:PORT
    cloud: str | None = None
    timeout_s: float = 2.0  # per remote call
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    token_file: Path | None = None
    server_name: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow_non_loopback: bool = False
    max_texts: int = 32  # per request
    max_chars: int = 10_000  # per text (and per text pair)
    max_body_bytes: int = 1 << 20
    max_pending: int = 8  # requests waiting for the model beyond the one running; more get 503
    read_timeout_s: float = 10.0  # seconds for the whole request (headers and body); a slower client is dropped
    max_connections: int = 32  # connections open at once (one thread each); more get 503 and are closed
    # audits (device_runtime.audit): on by default here, unlike `cartosplit run`: drift shows over a long run
    audit_rate: float = 0.02  # share of answers re-checked against the full model, through the edge; 0: off
    audit_epsilon_pt: float = 0.5  # the promise: disagreement with the full model <= this many points
    audit_alpha: float = 0.05  # level of the live bound and the alarm
    audit_adaptive: bool = False  # audit more while the bound is loose, less once it holds
    audit_state: Path | None = None  # the monitor's state, resumed at start and kept there
    source: Path | None = field(default=None, compare=False)  # the file it came from

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def audit_settings(self):
        """The runtime's ``AuditSettings``; None when audits are off (rate 0, or no edge to audit through)."""
        if self.edge is None:
            return None
        from cartosplit.device_runtime.audit import AuditSettings  # numpy: not at module level (stdlib only)

        return AuditSettings.from_points(self.audit_rate, self.audit_epsilon_pt, self.audit_alpha, self.audit_adaptive)


# section -> key -> (field name, kind); kind: "str", "path", "address", "int" (>= 1), "count" (>= 0), "port",
# "float" (seconds > 0), "bool", "probability" ([0, 1]), "level" ((0, 1)), "points" ((0, 100)), or a tuple of
# the accepted values
_SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "": {  # the top level
        "bundle": ("bundle", "path"),
        "backend": ("backend", ("onnxruntime", "litert")),
        "format": ("format", (*FORMATS, AUTO)),
        "encoding": ("encoding", ("fp32", "fp16", "int8")),
        "threads": ("threads", "int"),
        "low_memory": ("low_memory", "bool"),
        "advice": ("advice", "path"),
    },
    "servers": {"edge": ("edge", "address"), "cloud": ("cloud", "address"), "timeout": ("timeout_s", "float")},
    "tls": {
        "ca": ("ca", "path"),
        "cert": ("cert", "path"),
        "key": ("key", "path"),
        "token_file": ("token_file", "path"),
        "server_name": ("server_name", "str"),
    },
    "listen": {
        "host": ("host", "str"),
        "port": ("port", "port"),
        "allow_non_loopback": ("allow_non_loopback", "bool"),
    },
    "limits": {
        "max_texts": ("max_texts", "int"),
        "max_chars": ("max_chars", "int"),
        "max_body_bytes": ("max_body_bytes", "int"),
        "max_pending": ("max_pending", "count"),
        "read_timeout": ("read_timeout_s", "float"),
        "max_connections": ("max_connections", "int"),
    },
    "audit": {
        "rate": ("audit_rate", "probability"),
        "epsilon_pt": ("audit_epsilon_pt", "points"),
        "alpha": ("audit_alpha", "level"),
        "adaptive": ("audit_adaptive", "bool"),
        "state": ("audit_state", "path"),
    },
}

# the numbers in a range: kind -> (accepted, what the error says is expected)
_RANGES = {
    "probability": (lambda x: 0.0 <= x <= 1.0, "a probability in [0, 1] (0.02 = 2 % of the answers)"),
    "level": (lambda x: 0.0 < x < 1.0, "a number in (0, 1)"),
    "points": (lambda x: 0.0 < x < 100.0, "a number of percentage points in (0, 100)"),
}


def _load_toml(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as a package
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ConfigError("reading the TOML config needs Python >= 3.11 (or `pip install tomli` on 3.10)") from None
    return tomllib.loads(text)


def _convert(where: str, value: Any, kind: Any, folder: Path) -> Any:
    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where} must be {expected}, got {value!r}")

    if isinstance(kind, tuple):
        if value not in kind:
            raise wrong(f"one of {list(kind)}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind in ("int", "count", "port"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
        if kind == "port" and not 0 <= value <= 65535:
            raise wrong("a port number 0..65535 (0: any free port)")
        if value < (1 if kind == "int" else 0):
            raise wrong("a positive integer" if kind == "int" else "an integer >= 0")
        return value
    if kind in _RANGES:
        accepted, expected = _RANGES[kind]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not accepted(value):  # NaN: refused
            raise wrong(expected)
        return float(value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
            raise wrong("a positive number of seconds")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise wrong("a non-empty string")
    if kind == "path":
        path = Path(value).expanduser()
        return path if path.is_absolute() else folder / path
    if kind == "address":
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise wrong("HOST:PORT")
    return value


def parse_config(text: str, source: Path | None = None) -> ServiceConfig:
    """A :class:`ServiceConfig` from TOML text; relative paths resolve against ``source``'s folder."""
    where = str(source) if source is not None else "config"
    folder = source.parent if source is not None else Path.cwd()
    try:
        data = _load_toml(text)
    except ConfigError:
        raise
    except Exception as exc:  # tomllib.TOMLDecodeError: line and column are in its message
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    values: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in _SCHEMA or key == "":
                sections = sorted(s for s in _SCHEMA if s)
                raise ConfigError(f"{where}: unknown section [{key}]; known sections: {sections}")
            section, items = key, value.items()
        else:
            section, items = "", [(key, value)]
        for name, item in items:
            label = f"{section}.{name}" if section else name
            if name not in _SCHEMA[section]:
                known = sorted(_SCHEMA[section])
                place = f"section [{section}]" if section else "the top level"
                raise ConfigError(f"{where}: unknown key {label!r}; {place} takes {known}")
            if isinstance(item, dict):
                raise ConfigError(f"{where}: {label} must be a value, not a table")
            field_name, kind = _SCHEMA[section][name]
            values[field_name] = _convert(f"{where}: {label}", item, kind, folder)
    if "bundle" not in values:
        raise ConfigError(f"{where}: 'bundle' (the bundle folder) is required")
    config = ServiceConfig(**values, source=source)
    if (config.cert is None) != (config.key is None):
        raise ConfigError(f"{where}: tls.cert and tls.key go together (mutual TLS needs both)")
    if config.ca is None and (config.cert is not None or config.server_name is not None):
        raise ConfigError(f"{where}: tls.cert and tls.server_name need tls.ca (the CA that signed the servers)")
    if config.token_file is not None and config.ca is None:
        raise ConfigError(f"{where}: tls.token_file needs tls.ca: a bearer token never travels in plaintext")
    if config.audit_adaptive and config.audit_rate == 0.0:
        raise ConfigError(f"{where}: audit.adaptive needs audit.rate > 0 (the rate it adapts around)")
    if config.advice is not None and config.format != AUTO:
        raise ConfigError(f'{where}: advice is read only with format = "auto"')
    if config.format is not None and config.format != AUTO:
        wanted = "onnx" if config.backend == "onnxruntime" else "tflite"
        if not config.format.startswith(wanted):
            raise ConfigError(f"{where}: format {config.format!r} does not run on backend {config.backend!r}")
    if not config.allow_non_loopback and not is_loopback(config.host):
        raise ConfigError(
            f"{where}: listen.host {config.host!r} is not a loopback address; the HTTP API has no TLS and no "
            "authentication, so set listen.allow_non_loopback = true only behind a firewall or a proxy that adds them"
        )
    return config


def load_config(path: str | Path) -> ServiceConfig:
    """Read and check the TOML file at ``path``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from None
    return parse_config(text, path.resolve())


def describe_config(config: ServiceConfig) -> dict:
    """The configuration as JSON-ready values (paths as strings; no file contents, never the token)."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


# --- the service ------------------------------------------------------------------------------------------


class RequestError(Exception):
    """A request the service refuses: its HTTP status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_classify_request(
    body: bytes, config: ServiceConfig, text_pairs: bool | None = None
) -> tuple[list[str], list[str] | None]:
    """``texts`` and ``text_pairs`` of a ``/v1/classify`` body, or :class:`RequestError` saying what is wrong.

    ``text_pairs``: the model was trained on pairs (True: a body without ``text_pairs`` is refused), on single
    texts (False: one with them is), or unknown (None: an old bundle, nothing checked)."""
    try:
        payload = parse_json(body.decode("utf-8"), "body")
    except UnicodeDecodeError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"body is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except InputError as exc:  # not JSON, nested too deeply, a number too long
        raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    if not isinstance(payload, dict):
        raise RequestError(HTTPStatus.BAD_REQUEST, 'body must be a JSON object {"texts": [...]}')
    unknown = sorted(set(payload) - {"texts", "text_pairs"})
    if unknown:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"unknown fields {unknown}; the body takes texts and text_pairs")
    texts, pairs = payload.get("texts"), payload.get("text_pairs")
    if not isinstance(texts, list) or not texts:
        raise RequestError(HTTPStatus.BAD_REQUEST, '"texts" must be a non-empty list of strings')
    if len(texts) > config.max_texts:
        message = f"{len(texts)} texts is over this service's limit of {config.max_texts}"
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message)
    if pairs is not None and (not isinstance(pairs, list) or len(pairs) != len(texts)):
        raise RequestError(HTTPStatus.BAD_REQUEST, '"text_pairs" must be a list as long as "texts" (or absent)')
    for name, values in (("texts", texts), ("text_pairs", pairs or [])):
        for i, text in enumerate(values):
            problem = text_problem(text)  # not a string, or a lone surrogate the tokenizer cannot take
            if problem or not text.strip():
                raise RequestError(HTTPStatus.BAD_REQUEST, f"{name}[{i}] {problem or 'must be a non-empty string'}")
            if len(text) > config.max_chars:
                raise RequestError(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    f"{name}[{i}] has {len(text)} characters, over this service's limit of {config.max_chars}",
                )
    problem = pair_problem(text_pairs, pairs is not None, '"text_pairs"')
    if problem:
        raise RequestError(HTTPStatus.BAD_REQUEST, problem)
    return texts, pairs


class DeviceService(ThreadingHTTPServer):
    """The HTTP server around one :class:`~cartosplit.device_runtime.runtime.DeviceRuntime`.

    ``runtime`` is anything with ``predict(texts, text_pairs, max_chars)`` (tests pass their own).
    """

    daemon_threads = True  # a stuck client never keeps the process from exiting
    allow_reuse_address = True

    def __init__(self, config: ServiceConfig, runtime) -> None:
        self.config = config
        self.runtime = runtime
        self.started = time.monotonic()
        self.model_lock = threading.Lock()  # the device graphs run one input at a time
        self.slots = threading.BoundedSemaphore(config.max_pending + 1)
        self.connections = threading.BoundedSemaphore(config.max_connections)  # one handler thread each
        self.counts = {"requests": 0, "answered": 0, "refused": 0, "failed": 0}
        self.counts_lock = threading.Lock()
        self.audit_events_logged = 0  # of runtime.monitor.events
        self.log_audit_events()  # "resumed", when the state was resumed
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        self.address_family = family
        super().__init__((config.host, config.port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN, a DNS lookup that can hang a board without
        # a network at boot; the name is only used in logs, so skip it
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = host, port

    def process_request(self, request: socket.socket, client_address) -> None:
        # runs in the accepting thread: past max_connections no thread is started, the client gets 503 at once
        if not self.connections.acquire(blocking=False):
            self.count("refused")
            log.info(json.dumps({"event": "refused", "status": 503, "error": "too many connections"}))
            _answer_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: nobody else will give the slot back
            self.connections.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address) -> None:
        # the base class prints a traceback to stderr; the log is JSON lines, and a client that hangs up
        # early (a broken pipe, a reset, a timeout) is an ordinary event, not a failure
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.info(json.dumps({"event": "client_gone", "error": type(error).__name__}))
            return
        self.count("failed")
        log.error(json.dumps({"event": "handler_failed", "error": repr(error), "traceback": traceback.format_exc()}))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def count(self, key: str) -> None:
        with self.counts_lock:
            self.counts[key] += 1

    def metrics_text(self) -> str:
        from cartosplit.device_runtime.audit_metrics import prometheus_text

        summary = getattr(self.runtime, "audit_summary", lambda: None)()
        return prometheus_text(summary)

    def health(self) -> dict:
        runtime = self.runtime
        bundle = getattr(runtime, "bundle", None)

        def tier(name: str) -> dict | None:
            client = getattr(runtime, name, None)
            if client is None:
                return None
            return {"address": client.address, "recently_failed": not client.available}

        with self.counts_lock:
            counts = dict(self.counts)
        return {
            "status": "ok",
            "bundle": str(self.config.bundle),
            "bundle_id": getattr(bundle, "bundle_id", None),
            "backend": self.config.backend,
            "format": getattr(runtime, "fmt", self.config.format),
            "labels": list(getattr(runtime, "labels", [])),
            "tiers": {"device": True, "edge": tier("edge"), "cloud": tier("cloud")},
            "tls": self.config.tls,
            "limits": {"max_texts": self.config.max_texts, "max_chars": self.config.max_chars},
            "uptime_s": round(time.monotonic() - self.started, 1),
            "counts": counts,
            "audit": runtime.audit_summary() if hasattr(runtime, "audit_summary") else None,  # None: off
        }

    def log_audit_events(self) -> None:
        """One log line per audit-monitor event not logged yet (alarm, recalibrated, resumed, ...). The audit
        worker adds them in the background; polled after each request, so one shows up with the next request."""
        monitor = getattr(self.runtime, "monitor", None)
        if monitor is None:
            return
        events = monitor.events[self.audit_events_logged :]
        self.audit_events_logged += len(events)
        for event in events:
            name = event["event"]
            if name != "start":  # the shipped policy, at start: nothing happened yet
                level = logging.WARNING if name == "alarm" else logging.INFO
                log.log(level, json.dumps({**event, "event": f"audit_{name}"}))

    def classify(self, texts: list[str], pairs: list[str] | None) -> list[dict]:
        with self.model_lock:
            predictions = self.runtime.predict(texts, pairs, max_chars=self.config.max_chars)
            self.log_audit_events()
        return [{"index": i, **p.to_dict()} for i, p in enumerate(predictions)]


_BUSY_BODY = (json.dumps({"error": "busy: too many connections open; retry shortly"}) + "\n").encode()
_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(_BUSY_BODY)}\r\n".encode()
    + b"Retry-After: 1\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    + _BUSY_BODY
)


def _answer_busy(request: socket.socket) -> None:
    """Send the 503 of a connection over the limit without blocking the accepting thread."""
    try:
        request.setblocking(False)
        request.send(_BUSY)  # far below a fresh socket's send buffer
        while request.recv(65536):  # what the client already sent: unread, the close would be a reset
            pass
    except OSError:  # nothing more to read (BlockingIOError), or the client is already gone
        pass


class _DeadlineReader(io.RawIOBase):
    """A socket's reading side that fails with TimeoutError once ``deadline`` (time.monotonic()) has passed.

    The socket timeout alone bounds each read, so a client sending a byte a second would never time out;
    this bounds the whole request.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the request took longer than read_timeout")
        self.sock.settimeout(remaining)
        return self.sock.recv_into(buffer)


class _Handler(BaseHTTPRequestHandler):
    server: DeviceService
    server_version = "cartosplit-device"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to keep alive on a local socket

    def setup(self) -> None:
        self.timeout = self.server.config.read_timeout_s  # applied to the socket by StreamRequestHandler
        super().setup()
        # the whole request (request line, headers, body) must arrive within read_timeout of the connection
        deadline = time.monotonic() + self.server.config.read_timeout_s
        self.rfile.close()  # the socket's own reader, unused: left open, it would keep the socket from closing
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    # -- plumbing -------------------------------------------------------------------------------------------

    def parse_request(self) -> bool:
        # The base class takes a blank line for the request line and closes without a word, so
        # "\r\nGET /healthz ..." got no answer at all; RFC 9112 (2.2) asks a server to skip empty lines before
        # the request line. Skipped here (read_timeout still bounds the whole request).
        while self.raw_requestline and not str(self.raw_requestline, "iso-8859-1").split():
            self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline:  # the client ended the connection before any request line
            self.close_connection = True
            return False
        if len(self.raw_requestline) > 65536:  # the base class checks only the first line it read
            self.requestline = self.request_version = self.command = ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        return super().parse_request()

    def log_message(self, format: str, *args) -> None:  # the base class's signature; its access log
        log.debug(json.dumps({"event": "http", "client": self.address_string(), "message": format % args}))

    def log_error(self, format: str, *args) -> None:  # the base class's timeouts; send_error logs its own
        log.info(json.dumps({"event": "client_gone", "client": self.address_string(), "error": format % args}))

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The HTTP parser's errors (bad request line, headers too long, unsupported method) as JSON too."""
        try:
            status = HTTPStatus(code)
        except ValueError:
            status = HTTPStatus.BAD_REQUEST
        # an unknown method or an HTTP version we do not speak is the client's mistake: 4xx, never 5xx
        # (the library's 501 and 505), so that a 5xx always means the service itself failed
        if status is HTTPStatus.NOT_IMPLEMENTED:
            status, message = HTTPStatus.METHOD_NOT_ALLOWED, f"{message or status.phrase}; allowed: GET, POST"
        elif status is HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            status, message = HTTPStatus.BAD_REQUEST, f"{message or status.phrase}; speak HTTP/1.0 or HTTP/1.1"
        if self.request_version in ("HTTP/0.9", ""):  # the request line was unreadable: answer in HTTP/1.0
            self.request_version = "HTTP/1.0"
        self.close_connection = True
        self.server.count("requests")
        text = message or status.phrase
        self._refuse(RequestError(status, f"{text} ({explain})" if explain else text))

    def _reply(self, status: HTTPStatus, payload: dict) -> None:
        body = (json.dumps(payload) + "\n").encode("utf-8")
        self.connection.settimeout(self.server.config.read_timeout_s)  # the read deadline is not the write's
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            self.send_header("Retry-After", "1")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reply_text(self, status: HTTPStatus, text: str) -> None:
        from cartosplit.device_runtime.audit_metrics import CONTENT_TYPE

        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _refuse(self, error: RequestError) -> None:
        self.server.count("refused")
        path = getattr(self, "path", None)  # absent when the request line itself was refused
        log.info(json.dumps({"event": "refused", "path": path, "status": int(error.status), "error": error.message}))
        self._reply(error.status, {"error": error.message})

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length (no chunked encoding)")
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        try:
            length = int(length_header)
        except ValueError:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {length_header!r} is not a number") from None
        if length < 0:
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length must not be negative")
        if length > self.server.config.max_body_bytes:
            self.close_connection = True  # the body is never read: do not let it be taken for a next request
            raise RequestError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"body of {length} bytes is over this service's limit of {self.server.config.max_body_bytes}",
            )
        content_type = self.headers.get("Content-Type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"send application/json, not {content_type}")
        body = self.rfile.read(length)
        if len(body) != length:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes")
        return body

    # -- methods --------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self.server.count("requests")
        if self.path.split("?")[0] == HEALTH_PATH:
            self._reply(HTTPStatus.OK, self.server.health())
        elif self.path.split("?")[0] == METRICS_PATH:
            self._reply_text(HTTPStatus.OK, self.server.metrics_text())
        elif self.path.split("?")[0] == API_PATH:
            self._refuse(RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"{API_PATH} takes POST"))
        else:
            self._refuse(RequestError(HTTPStatus.NOT_FOUND, f"no such path; try POST {API_PATH} or GET {HEALTH_PATH}"))

    do_HEAD = do_GET

    def do_POST(self) -> None:
        self.server.count("requests")
        started = time.perf_counter()
        path = self.path.split("?")[0]
        try:
            if path != API_PATH:
                status = HTTPStatus.METHOD_NOT_ALLOWED if path == HEALTH_PATH else HTTPStatus.NOT_FOUND
                raise RequestError(status, f"POST goes to {API_PATH}")
            try:
                body = self._read_body()
            except (TimeoutError, ConnectionError):  # the client stalled or went away mid-body: nobody to answer
                self.server.count("refused")
                log.info(json.dumps({"event": "client_gone", "path": self.path}))
                self.close_connection = True
                return
            texts, pairs = parse_classify_request(body, self.server.config, trained_on_pairs(self.server.runtime))
            if not self.server.slots.acquire(blocking=False):
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "busy: too many requests waiting; retry shortly")
            try:
                predictions = self.server.classify(texts, pairs)
            finally:
                self.server.slots.release()
        except RequestError as error:
            self._refuse(error)
            return
        except Exception as exc:  # never let one request take the service down
            self.server.count("failed")
            log.error(json.dumps({"event": "failed", "error": repr(exc), "traceback": traceback.format_exc()}))
            self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"internal error ({type(exc).__name__})"})
            return
        self.server.count("answered")
        ms = 1000 * (time.perf_counter() - started)
        log.info(json.dumps({"event": "classified", "texts": len(texts), "ms": round(ms, 1)}))
        self._reply(HTTPStatus.OK, {"predictions": predictions})

    def do_PUT(self) -> None:
        self.server.count("requests")
        self._refuse(RequestError(HTTPStatus.METHOD_NOT_ALLOWED, f"use POST {API_PATH} or GET {HEALTH_PATH}"))

    do_DELETE = do_PATCH = do_PUT


# --- running it -------------------------------------------------------------------------------------------


def build_runtime(config: ServiceConfig):
    """The :class:`~cartosplit.device_runtime.runtime.DeviceRuntime` a config describes (bundle verified first)."""
    from cartosplit.device_runtime.runtime import DeviceRuntime
    from cartosplit.protos.security import ClientSecurity

    security = ClientSecurity.from_options(config.ca, config.cert, config.key, config.token_file, config.server_name)
    audit = config.audit_settings()
    if audit is None and config.audit_rate > 0.0:
        reason = "no edge configured (servers.edge): an audit goes through the edge to the full model"
        log.info(json.dumps({"event": "audit_off", "reason": reason}))
    runtime = DeviceRuntime(
        config.bundle,
        edge=config.edge,
        cloud=config.cloud,
        backend=config.backend,
        fmt=config.format,
        threads=config.threads,
        timeout_s=config.timeout_s,
        encoding=config.encoding,
        security=security,
        low_memory=config.low_memory,
        advice=config.advice,
        audit=audit,
        audit_state=config.audit_state if audit is not None else None,
    )
    if getattr(runtime, "audit_resume_note", None):  # why the saved state was not resumed, or what was skipped
        log.info(json.dumps({"event": "audit_state", "note": runtime.audit_resume_note}))
    return runtime


def notify_systemd(state: str) -> bool:
    """``sd_notify``: tell systemd (``Type=notify``) the service is ready or stopping. False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def serve(config: ServiceConfig, runtime=None, ready=None) -> int:
    """Serve until SIGTERM/SIGINT (in the main thread) or ``service.shutdown()``; print one ready line.

    ``ready(service)`` is called once listening (tests use it to learn the port).
    """
    runtime = runtime if runtime is not None else build_runtime(config)
    try:
        service = DeviceService(config, runtime)
    except OSError:
        if hasattr(runtime, "close"):
            runtime.close()
        raise
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info(json.dumps({"event": "signal", "signal": signal.Signals(signum).name}))
        stop.set()

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    worker = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    worker.start()
    try:
        print(f"device service serving {config.bundle} on {service.url}", flush=True)
        notify_systemd("READY=1")
        if ready is not None:
            ready(service)
        while not stop.wait(0.5) and worker.is_alive():
            pass
    finally:
        notify_systemd("STOPPING=1")
        service.shutdown()
        service.server_close()
        if hasattr(runtime, "close"):
            runtime.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


__all__ = [
    "ConfigError",
    "DeviceService",
    "ServiceConfig",
    "load_config",
    "parse_config",
    "serve",
]
