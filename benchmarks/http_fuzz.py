"""Fuzz the device's HTTP service (``cartosplit serve-device``) and ``cartosplit run``'s JSONL reader.

    cartosplit bench http-fuzz --bundle bundles/demo-sst2 --messages 5000 --jsonl-lines 2000 \
        --out benchmarks/results/http-fuzz

HTTP part: starts ``serve-device`` as a subprocess (the real CLI) on a loopback port with no edge or cloud
(the device answers everything), then sends ``--messages`` messages one after the other over raw sockets (no
HTTP client library: malformed HTTP must be possible): valid requests; JSON bodies with wrong types at every
level, empty and huge lists, lone surrogates, invalid UTF-8, NUL bytes, a BOM, nesting 10^5 deep, 5,000-digit
numbers, NaN/Infinity, duplicate keys, truncated JSON; Content-Length missing, wrong, negative, non-numeric or
larger than the body; wrong Content-Type; chunked transfer-encoding; garbage request lines; unknown methods
and paths; 70 kB headers and hundreds of headers; pipelined requests; clients that hang up mid-request.
Each message is made by its own generator, ``numpy.random.default_rng([seed, index])``, so a failing one can
be sent again from its index (``--replay``).

Each message's outcome is its HTTP status, or "none" (the connection closed with nothing), "reset",
"timeout", "malformed" (bytes that are not an HTTP answer), "0.9" (an HTTP/0.9 answer: a body with no status
line, the answer to an HTTP/0.9 request), "client closed" (the fuzzer hung up first, by design).

``server_errors``: answers >= 500, and a message that got no answer though the client waited for one.
An unknown method gets 405 and an HTTP version >= 2 gets 400 (the service maps the library's 501 and 505:
a client's mistake is never a 5xx), so every 5xx counts. The fuzz is sequential, so ``max_connections`` is
never exceeded and a 503 is a server error too (counted apart as ``busy_503``).

JSONL part: ``--jsonl-lines`` lines (text lines, JSON lines, and the same garbage as JSON lines: surrogates,
deep nesting, 5,000-digit numbers, invalid UTF-8, wrong types, NUL, very long lines, CR/LF variants, blank
lines) in a file, run through ``cartosplit run --input FILE`` and once more through stdin. ``lost_lines``:
non-blank input lines (blank: empty or whitespace after the line break, as ``str.strip`` says) with no output
line of their index, over both runs.

Bounds (exit status 1 if one fails): server_errors == 0; lost_lines == 0; every outcome one its message
allows and every answer well-formed (JSON errors, predictions of the right shape); the server alive at the end,
/healthz 200 and a valid classify 200; the service's stderr JSON lines only, no error event; no handler thread
left; each ``run`` one line per non-blank line, indexes 0..n-1 in order, a label or an error each, no
traceback, exit code 0 or 1 as its errors say.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.report import bench_command, bench_parser, bounds_table, check, histogram_table, publish
from cartosplit.device_runtime.bundle import load_bundle
from cartosplit.device_runtime.inputs import trained_on_pairs
from cartosplit.serving.process import RssMonitor, ServerProcess, memory_summary, rss_mib

API = b"/v1/classify"
HEALTH = b"/healthz"
SOCKET_TIMEOUT_S = 30.0  # per message: far above any answer on loopback, so a timeout is a hung server
SERVER_ERROR_OUTCOMES = frozenset({"none", "reset", "timeout", "malformed", "refused"})
CLIENT_CLOSED = "client closed"
KEPT_PROBLEMS = 50
_WORD_TEXT = (
    "the movie was good bad boring great awful plot actors film quite very not really superb dull fun story "
    "café naïve 日本 映画 😀 Ω ünïcödé"
)
WORDS = tuple(_WORD_TEXT.split())


# ---------------------------------------------------------------------------------------------- the service


@dataclass(frozen=True)
class Limits:
    """The limits the service runs with (the shipped config's); the fuzz aims just under and over them."""

    max_texts: int = 32
    max_chars: int = 10_000
    max_body_bytes: int = 1 << 20
    read_timeout_s: float = 10.0
    max_connections: int = 32


def write_config(folder: Path, bundle: Path, limits: Limits, threads: int) -> Path:
    """The TOML of ``serve-device``: the bundle, no servers, any free loopback port, these limits."""
    path = folder / "device.toml"
    path.write_text(
        f"bundle = {json.dumps(str(Path(bundle).resolve()))}\nthreads = {threads}\n[listen]\nport = 0\n[limits]\n"
        f"max_texts = {limits.max_texts}\nmax_chars = {limits.max_chars}\nmax_body_bytes = {limits.max_body_bytes}\n"
        f"read_timeout = {limits.read_timeout_s}\nmax_connections = {limits.max_connections}\n"
    )
    return path


class DeviceServer(ServerProcess):
    """``cartosplit serve-device`` as a subprocess; its whole stderr (the service's log) kept in a file."""

    def __init__(self, config: Path, log_path: Path, timeout_s: float = 120.0) -> None:
        self.log_path = log_path
        super().__init__(
            ["serve-device", "--config", str(config)],
            "serve-device",
            timeout_s,
            env={"PYTHONUNBUFFERED": "1"},
            stderr_path=log_path,
        )
        self.port = int(self.address.rsplit(":", 1)[1])

    def threads(self) -> int | None:
        """The process's thread count (Linux /proc), None once it is gone."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        return None

    def stop(self, grace_s: float = 15.0) -> int | None:
        return super().stop(grace_s)

    def log_text(self) -> str:
        """The service's stderr so far (all of it once ``stop`` returned)."""
        return self.log_path.read_bytes().decode("utf-8", "replace")


def check_log(text: str) -> dict:
    """The service's stderr: JSON objects one per line (never a traceback), error events counted."""
    lines = [line for line in text.splitlines() if line.strip()]
    not_json, errors = [], []
    events: Counter = Counter()
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            not_json.append(line)
            continue
        if not isinstance(event, dict):
            not_json.append(line)
            continue
        events[str(event.get("event"))] += 1
        if event.get("event") in ("failed", "handler_failed"):
            errors.append(line)
    return {
        "lines": len(lines),
        "non_json_lines": len(not_json),
        "traceback_lines": sum("Traceback" in line for line in lines),
        "error_events": len(errors),
        "events": dict(sorted(events.items())),
        "examples": [line[:2000] for line in (not_json + errors)[:10]],
    }


# ------------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """One fuzz message: the bytes sent on one connection, and what may come back.

    ``expect``: outcomes allowed ("200", "413", ..., "4xx" for any 400-499, "0.9", "none");
    ``texts``: a 200 must hold this many predictions (0: not a classify); ``close``: "half" sends, half-closes
    and reads the answer; "fin" and "reset" hang up right after sending (nothing to read, by design).
    """

    family: str
    variant: str
    data: bytes
    expect: frozenset[str]
    texts: int = 0
    head: bool = False
    close: str = "half"


OK = frozenset({"200"})
REFUSED = frozenset({"4xx"})
OK_OR_REFUSED = frozenset({"200", "4xx"})


def request(
    method: bytes = b"POST",
    path: bytes = API,
    body: bytes = b"",
    headers: Sequence[tuple[bytes, bytes | None]] = (),
    version: bytes = b"HTTP/1.0",
    length: bool = True,
    content_type: bool = True,
) -> bytes:
    """Raw request bytes; ``length``/``content_type``: add a right Content-Length / application/json."""
    head = [method + b" " + path + b" " + version]
    if content_type and method == b"POST":
        head.append(b"Content-Type: application/json")
    head += [name if value is None else name + b": " + value for name, value in headers]  # None: a raw line
    if length and method == b"POST":
        head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _choose(rng: np.random.Generator, names: str) -> str:
    """One of the space-separated ``names``."""
    return _pick(rng, names.split())


def _texts(rng: np.random.Generator, count: int) -> list[str]:
    return [" ".join(_pick(rng, WORDS) for _ in range(int(rng.integers(1, 10)))) for _ in range(count)]


def _dumps(rng: np.random.Generator, payload: object) -> bytes:
    """JSON in one of the styles a client may use: compact, spaced, indented, non-ASCII kept."""
    style = int(rng.integers(4))
    if style == 0:
        text = json.dumps(payload)
    elif style == 1:
        text = json.dumps(payload, separators=(",", ":"))
    elif style == 2:
        text = json.dumps(payload, indent=int(rng.integers(0, 4)))
    else:
        text = json.dumps(payload, ensure_ascii=False)
    return text.encode("utf-8")


# whether the fuzzed bundle's model reads text pairs (its manifest's model.text_pairs; None: not recorded): a
# valid message carries pairs exactly when the model takes them (else the service rightly answers 400).
# Set once per run by run_fuzz / replay, before any message is made.
MODEL_PAIRS: dict[str, bool | None] = {"text_pairs": None}


def _with_pair(rng: np.random.Generator) -> bool:
    pairs = MODEL_PAIRS["text_pairs"]
    return bool(rng.random() < 0.3) if pairs is None else pairs


def _valid_payload(rng: np.random.Generator, count: int | None = None) -> dict:
    count = int(rng.integers(1, 5)) if count is None else count
    payload: dict = {"texts": _texts(rng, count)}
    if _with_pair(rng):
        payload["text_pairs"] = _texts(rng, count)
    if rng.random() < 0.5:  # the key order is the client's
        payload = dict(reversed(list(payload.items())))
    return payload


def _post(body: bytes, **kwargs) -> bytes:
    return request(b"POST", API, body, **kwargs)


def valid(rng: np.random.Generator, lim: Limits) -> Message:
    kind = _pick(rng, ("classify", "classify", "classify", "health", "head", "query"))
    if kind in ("health", "head"):
        method = b"GET" if kind == "health" else b"HEAD"
        return Message(
            "valid",
            kind,
            request(method, HEALTH, version=_pick(rng, (b"HTTP/1.0", b"HTTP/1.1"))),
            OK,
            head=kind == "head",
        )
    payload = _valid_payload(rng)
    path = API + (b"?trace=1" if kind == "query" else b"")
    content_type = bool(rng.random() < 0.8)  # absent: the service takes JSON
    data = request(
        b"POST", path, _dumps(rng, payload), version=_pick(rng, (b"HTTP/1.0", b"HTTP/1.1")), content_type=content_type
    )
    return Message("valid", f"{kind}:{len(payload['texts'])}", data, OK, texts=len(payload["texts"]))


_WRONG_VALUES = ("a", 1, 1.5, None, True, {}, {"a": "b"}, [], [[]], ["a", ["b"]], [1], [None], [{}], [True])


def wrong_types(rng: np.random.Generator, lim: Limits) -> Message:
    """Each level of the body with the wrong kind of value: the body, "texts", its items, "text_pairs", keys."""
    kind = _pick(rng, ("body", "texts", "item", "pairs", "pair_item", "unknown_key", "key_case"))
    texts = _texts(rng, int(rng.integers(1, 4)))
    if kind == "body":
        payload = _pick(rng, ([], [texts], "texts", 3, None, True, [{"texts": texts}]))
    elif kind == "texts":
        payload = {"texts": _pick(rng, _WRONG_VALUES[:9])}
    elif kind == "item":
        bad = list(texts)
        bad[int(rng.integers(len(bad)))] = _pick(rng, (1, 1.5, None, True, {}, [], ["a"], [["a"]], {"text": "a"}))
        payload = {"texts": bad}
    elif kind == "pairs":
        payload = {"texts": texts, "text_pairs": _pick(rng, ("a", 1, {}, True, [*texts, "x"], texts[:-1] or [1, 2]))}
    elif kind == "pair_item":
        pairs = list(texts)
        pairs[int(rng.integers(len(pairs)))] = _pick(rng, (1, None, [], {}, ""))
        payload = {"texts": texts, "text_pairs": pairs}
    elif kind == "unknown_key":
        payload = {"texts": texts, _pick(rng, ("text", "labels", "", "texts ", "\u0000")): 1}
    else:
        payload = {_pick(rng, ("Texts", "TEXTS", "text")): texts}
    return Message("wrong_types", kind, _post(_dumps(rng, payload)), REFUSED)


def sizes(rng: np.random.Generator, lim: Limits) -> Message:
    """Empty and huge lists, texts at and over the length limit, bodies over the size limit, empty texts."""
    kind = _choose(
        rng,
        "empty_list over_max_texts huge_list max_texts max_chars over_max_chars huge_text over_body empty_body "
        "blank_text pair_over_max_chars",
    )
    expect, texts = REFUSED, 0
    if kind == "empty_list":
        payload: object = {"texts": []}
    elif kind in ("over_max_texts", "huge_list"):
        count = (
            lim.max_texts + int(rng.integers(1, 10)) if kind == "over_max_texts" else int(rng.integers(10**4, 10**5))
        )
        payload, expect = {"texts": ["a"] * count}, frozenset({"413"})
    elif kind == "max_texts":
        payload, expect, texts = {"texts": _texts(rng, lim.max_texts)}, OK, lim.max_texts
    elif kind == "max_chars":
        payload, expect, texts = {"texts": ["good " * (lim.max_chars // 5)]}, OK, 1
    elif kind == "over_max_chars":
        payload, expect = {"texts": ["a" * (lim.max_chars + int(rng.integers(1, 100)))]}, frozenset({"413"})
    elif kind == "pair_over_max_chars":
        payload, expect = {"texts": ["a"], "text_pairs": ["b" * (lim.max_chars + 1)]}, frozenset({"413"})
    elif kind == "huge_text":
        payload, expect = (
            {"texts": ["x" * int(rng.integers(lim.max_body_bytes // 2, lim.max_body_bytes - 100))]},
            frozenset({"413"}),
        )
    elif kind == "over_body":
        filler = "y" * (lim.max_body_bytes + int(rng.integers(1, 2 * lim.max_body_bytes)))
        payload, expect = {"texts": [filler]}, frozenset({"413"})
    elif kind == "empty_body":
        return Message("sizes", kind, _post(b""), REFUSED)
    elif kind == "blank_text":
        payload = {"texts": ["good", _pick(rng, ("", " ", "\t\n", "\u3000\u2028"))]}
    return Message("sizes", kind, _post(json.dumps(payload).encode()), expect, texts=texts)


def _escaped_body(text_json: str) -> bytes:
    return ('{"texts": [' + text_json + "]}").encode("utf-8")


def unicode(rng: np.random.Generator, lim: Limits) -> Message:
    """Lone surrogates (escaped and as bytes), invalid UTF-8, NUL bytes, a BOM, odd but valid characters."""
    kind = _choose(
        rng,
        "lone_surrogate surrogate_bytes invalid_utf8 raw_nul escaped_nul bom utf16 surrogate_pair odd_valid "
        "unicode_blank",
    )
    if kind == "lone_surrogate":
        body = _pick(
            rng,
            (
                _escaped_body('"\\ud800"'),
                _escaped_body('"a \\udfff b"'),
                _escaped_body('"\\ud83d"'),
                _escaped_body('"\\ude00\\ud83d"'),
                b'{"texts": ["ok"], "text_pairs": ["\\udbff"]}',
            ),
        )
        return Message("unicode", kind, _post(body), REFUSED)
    if kind == "surrogate_bytes":  # a surrogate encoded as UTF-8 bytes (CESU-8): not UTF-8
        body = '{"texts": ["a \ud800 b"]}'.encode("utf-8", "surrogatepass")
        return Message("unicode", kind, _post(body), REFUSED)
    if kind == "invalid_utf8":
        bad = _pick(rng, (b"\xff", b"\xc0\x80", b"\xe2\x82", b"\xf8\x88\x80\x80\x80", b"\x80", b"caf\xe9"))
        body = b'{"texts": ["good ' + bad + b' movie"]}'
        if rng.random() < 0.3:  # outside a string
            body = b'{"texts": ["good"]' + bad + b"}"
        return Message("unicode", kind, _post(body), REFUSED)
    if kind == "raw_nul":  # a control character inside a string, or between tokens: not JSON
        body = _pick(rng, (b'{"texts": ["a\x00b"]}', b'{"texts":\x00["a"]}', b'\x00{"texts": ["a"]}'))
        return Message("unicode", kind, _post(body), REFUSED)
    if kind == "escaped_nul":
        return Message("unicode", kind, _post(_escaped_body(_pick(rng, ('"a\\u0000b"', '"\\u0000 good"')))), OK, 1)
    if kind == "bom":  # json.loads refuses a BOM; a server could also skip it
        body = b"\xef\xbb\xbf" + json.dumps(_valid_payload(rng, 1)).encode()
        return Message("unicode", kind, _post(body), OK_OR_REFUSED, texts=1)
    if kind == "utf16":
        body = json.dumps(_valid_payload(rng, 1)).encode(_pick(rng, ("utf-16", "utf-16-le", "utf-32")))
        return Message("unicode", kind, _post(body), REFUSED)
    if kind == "surrogate_pair":
        return Message("unicode", kind, _post(_escaped_body('"\\ud83d\\ude00 great"')), OK, texts=1)
    if kind == "odd_valid":  # noncharacters, private use, bidi overrides, zero-width and combining marks
        text = _pick(
            rng, ("\ufffe\uffff a", "\ue000 film", "\u202e good", "a\u200bb", "e\u0301\u0301\u0301", "\U0010ffff")
        )
        return Message("unicode", kind, _post(json.dumps({"texts": [text]}).encode()), OK, texts=1)
    return Message("unicode", kind, _post(json.dumps({"texts": ["\u3000\u2028\u00a0"]}).encode()), REFUSED)


def nesting(rng: np.random.Generator, lim: Limits) -> Message:
    """Arrays and objects nested up to 10^5 deep, at the top, in "texts", in an item; balanced or not."""
    depth = int(rng.choice([500, 1000, 5000, 10**4, 10**5]))
    shape = _pick(rng, ("arrays", "objects", "mixed"))
    if shape == "arrays":
        inner = "[" * depth + "]" * depth
    elif shape == "objects":
        inner = '{"a":' * depth + "1" + "}" * depth
    else:
        inner = '[{"a":' * (depth // 2) + "1" + "}]" * (depth // 2)
    where = _pick(rng, ("top", "texts", "item", "unbalanced"))
    if where == "top":
        body = inner
    elif where == "texts":
        body = '{"texts": ' + inner + "}"
    elif where == "item":
        body = '{"texts": ["good", ' + inner + "]}"
    else:
        body = '{"texts": ' + inner[: len(inner) // 2]
    data = body.encode()
    expect = frozenset({"413"}) if len(data) > lim.max_body_bytes else REFUSED
    return Message("nesting", f"{shape}:{where}:{depth}", _post(data), expect)


def numbers(rng: np.random.Generator, lim: Limits) -> Message:
    """5,000-digit integers and floats, NaN and Infinity literals, huge exponents: never a text."""
    digits = "".join(str(d) for d in rng.integers(0, 10, 5000))
    value = _pick(
        rng,
        (
            "1" + digits,
            "-" + "9" + digits,
            "0." + digits,
            "1" + digits[:4299],
            "1e999999",
            "-1e-999999",
            "NaN",
            "Infinity",
            "-Infinity",
            "-0",
        ),
    )
    where = _pick(rng, ("top", "texts", "item", "pairs", "extra"))
    body = {
        "top": value,
        "texts": '{"texts": ' + value + "}",
        "item": '{"texts": ["good", ' + value + "]}",
        "pairs": '{"texts": ["good"], "text_pairs": [' + value + "]}",
        "extra": '{"texts": ["good"], "n": ' + value + "}",
    }[where]
    return Message("numbers", f"{value[:12]}:{where}", _post(body.encode()), REFUSED)


def duplicate_keys(rng: np.random.Generator, lim: Limits) -> Message:
    """The same key twice: the last one counts (as Python's json and most parsers read it)."""
    good = json.dumps(_texts(rng, 2))
    bad = json.dumps(_pick(rng, (1, None, "a", [], [1])))
    last_good = bool(rng.random() < 0.5)
    first, last = (bad, good) if last_good else (good, bad)
    body = f'{{"texts": {first}, "texts": {last}}}'
    if rng.random() < 0.3 and last_good:  # text_pairs given, then taken back with null
        body = f'{{"text_pairs": ["a", "b"], "texts": {first}, "texts": {last}, "text_pairs": null}}'
    return Message(
        "duplicate_keys",
        "last_good" if last_good else "last_bad",
        _post(body.encode()),
        OK if last_good else REFUSED,
        texts=2 if last_good else 0,
    )


def truncated(rng: np.random.Generator, lim: Limits) -> Message:
    """A valid body cut short: announced at its cut length, or at its full length (the body ends early)."""
    body = _dumps(rng, _valid_payload(rng))
    cut = int(rng.integers(0, len(body)))  # a strict prefix of an object is never JSON
    if rng.random() < 0.5:
        return Message("truncated", f"cut:{cut}/{len(body)}", _post(body[:cut]), REFUSED)
    data = _post(body, headers=[(b"Content-Length", str(len(body)).encode())], length=False)
    return Message("truncated", f"short_body:{cut}/{len(body)}", data[: len(data) - len(body) + cut], REFUSED)


def content_length(rng: np.random.Generator, lim: Limits) -> Message:
    """Content-Length missing, smaller or larger than the body, negative, non-numeric, huge, given twice."""
    body = _dumps(rng, _valid_payload(rng, 1))
    kind = _choose(rng, "missing smaller larger negative non_numeric huge digits lenient twice_same twice_different")
    values: list[bytes]
    expect: frozenset[str] = REFUSED
    if kind == "missing":
        values, expect = [], frozenset({"411"})
    elif kind == "smaller":
        values = [str(int(rng.integers(0, len(body)))).encode()]
    elif kind == "larger":
        values = [str(len(body) + int(rng.integers(1, 10_000))).encode()]
    elif kind == "negative":
        values = [_pick(rng, (b"-1", b"-" + str(len(body)).encode(), b"-99999999999"))]
    elif kind == "non_numeric":
        values = [_pick(rng, (b"abc", b"", b"1e3", b"0x10", b"12abc", b"\xd9\xa1\xd9\xa2", b"NaN", b"1.5", b"\x00"))]
    elif kind == "huge":
        values, expect = (
            [_pick(rng, (b"99999999999999999999", str(lim.max_body_bytes + 1).encode()))],
            frozenset({"413"}),
        )
    elif kind == "digits":  # more digits than int() reads
        values = [b"1" * 5000]
    elif kind == "lenient":  # forms int() takes: the service may read them or refuse them
        n = str(len(body)).encode()
        values, expect = [_pick(rng, (b"+" + n, b" " + n + b" ", b"0" + n, n[:1] + b"_" + n[1:]))], OK_OR_REFUSED
    elif kind == "twice_same":
        values, expect = [str(len(body)).encode()] * 2, OK_OR_REFUSED
    else:
        values = [str(len(body)).encode(), str(len(body) + 7).encode()]
        values, expect = values if rng.random() < 0.5 else values[::-1], OK_OR_REFUSED
    data = _post(body, headers=[(b"Content-Length", v) for v in values], length=False)
    return Message("content_length", kind, data, expect, texts=1 if "200" in expect else 0)


def content_type(rng: np.random.Generator, lim: Limits) -> Message:
    body = _dumps(rng, _valid_payload(rng, 1))
    good = (b"application/json; charset=utf-8", b"APPLICATION/JSON", b" application/json ", b"application/json;x=y")
    bad = (
        b"text/plain",
        b"application/x-www-form-urlencoded",
        b"multipart/form-data; boundary=x",
        b"",
        b"application/jsonx",
        b"json",
        b"\xff\xfe",
    )
    if rng.random() < 0.3:
        value, expect = _pick(rng, good), OK
    else:
        value, expect = _pick(rng, bad), frozenset({"415"})
    data = _post(body, headers=[(b"Content-Type", value)], content_type=False)
    return Message("content_type", value.decode("latin-1")[:40], data, expect, texts=1 if expect == OK else 0)


def transfer_encoding(rng: np.random.Generator, lim: Limits) -> Message:
    """Chunked bodies (with and without a Content-Length), other codings; identity is plain."""
    body = _dumps(rng, _valid_payload(rng, 1))
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    kind = _pick(rng, ("chunked", "chunked_upper", "chunked_with_length", "gzip", "identity"))
    if kind == "identity":
        return Message("transfer_encoding", kind, _post(body, headers=[(b"Transfer-Encoding", b"identity")]), OK, 1)
    coding = {
        "chunked": b"chunked",
        "chunked_upper": b"Chunked",
        "chunked_with_length": b"chunked",
        "gzip": b"gzip, chunked",
    }[kind]
    data = _post(chunked, headers=[(b"Transfer-Encoding", coding)], length=kind == "chunked_with_length")
    return Message("transfer_encoding", kind, data, frozenset({"411"}))


def request_line(rng: np.random.Generator, lim: Limits) -> Message:
    """Garbage and odd request lines; HTTP/0.9 and HTTP/2 requests; blank lines before a request."""
    kind = _choose(
        rng,
        "noise noise one_word four_words bad_version version_2 lowercase_version long_uri nul tabs lf_only "
        "blank_then_request only_blank http09 http09_post no_line_end",
    )
    health = b"GET /healthz HTTP/1.0\r\n\r\n"
    cases: dict[str, tuple[bytes, frozenset[str]]] = {
        "one_word": (b"GET\r\n\r\n", REFUSED),
        "four_words": (b"GET /healthz HTTP/1.0 extra\r\n\r\n", REFUSED),
        "bad_version": (
            _pick(
                rng,
                (
                    b"GET /healthz HTTP/1\r\n\r\n",
                    b"GET /healthz HTTP/1.x\r\n\r\n",
                    b"GET /healthz HTTX/1.0\r\n\r\n",
                    b"GET /healthz HTTP/-1.0\r\n\r\n",
                ),
            ),
            REFUSED,
        ),
        "version_2": (
            _pick(rng, (b"GET /healthz HTTP/2.0\r\n\r\n", b"GET /healthz HTTP/9.9\r\n\r\n")),
            frozenset({"4xx"}),
        ),
        "lowercase_version": (b"GET /healthz http/1.0\r\n\r\n", REFUSED),
        "long_uri": (b"GET /" + b"a" * int(rng.integers(65_537, 70_000)) + b" HTTP/1.0\r\n\r\n", frozenset({"414"})),
        "nul": (b"GET /heal\x00thz HTTP/1.0\r\n\r\n", REFUSED),
        "tabs": (b"GET\t/healthz\tHTTP/1.0\r\n\r\n", OK_OR_REFUSED),
        "lf_only": (b"GET /healthz HTTP/1.0\n\n", OK),
        "blank_then_request": (_pick(rng, (b"\r\n", b"\n", b"\r\n\r\n", b" \r\n")) + health, OK),
        "only_blank": (_pick(rng, (b"\r\n", b"\r\n\r\n", b"\n" * 50, b" \t\r\n")), frozenset({"none"})),
        "http09": (b"GET /healthz\r\n", frozenset({"0.9"})),
        "http09_post": (b"POST /v1/classify\r\n", REFUSED),
        "no_line_end": (b"GET /healthz HTTP/1.0", OK_OR_REFUSED),
    }
    if kind == "noise":
        data = rng.bytes(int(rng.integers(1, 2000)))
        # the service skips blank lines before a request line: noise of blank lines only is no request at all
        blank = all(not str(line, "iso-8859-1").split() for line in data.split(b"\n"))
        expect = frozenset({"none"}) if blank else frozenset({"4xx", "0.9"})
        return Message("request_line", f"noise:{len(data)}B", data, expect)
    data, expect = cases[kind]
    return Message("request_line", kind, data, expect)


def methods_paths(rng: np.random.Generator, lim: Limits) -> Message:
    """Unknown methods (405), known methods on the wrong path (405), unknown paths (404), odd paths."""
    kind = _pick(rng, ("unknown_method", "wrong_method", "unknown_path", "odd_path"))
    if kind == "unknown_method":
        method = _pick(rng, (b"FOO", b"PROPFIND", b"TRACE", b"CONNECT", b"OPTIONS", b"get", b"G\x00T", b"M" * 1000))
        data = request(method, _pick(rng, (API, HEALTH, b"*")), version=b"HTTP/1.0")
        return Message("methods_paths", f"{kind}:{method[:12]!r}", data, frozenset({"405"}))
    if kind == "wrong_method":
        method, path = _pick(
            rng, ((b"GET", API), (b"HEAD", API), (b"POST", HEALTH), (b"PUT", API), (b"DELETE", API), (b"PATCH", HEALTH))
        )
        return Message(
            "methods_paths",
            f"{kind}:{method.decode()} {path.decode()}",
            request(method, path, b'{"texts": ["a"]}'),
            frozenset({"405"}),
            head=method == b"HEAD",
        )
    if kind == "unknown_path":
        method = _pick(rng, (b"GET", b"POST"))
        path = _pick(rng, (b"/", b"/metrics", b"/v1/classify/", b"/v2/classify", b"/V1/CLASSIFY", b"/healthz/x"))
        return Message("methods_paths", f"{kind}:{path.decode()}", request(method, path, b"{}"), frozenset({"404"}))
    path = _pick(
        rng,
        (
            b"/../../etc/passwd",
            b"/%00",
            b"/healthz%00",
            b"http://x/healthz",
            b"//healthz",
            b"/healthz#x",
            b"/healthz?" + b"q" * 5000,
            b"/\xff\xfe",
            b"/v1/classify;x",
        ),
    )
    return Message("methods_paths", f"{kind}:{path[:24]!r}", request(b"GET", path), OK_OR_REFUSED)


def headers(rng: np.random.Generator, lim: Limits) -> Message:
    """A 70 kB header line, too many headers, odd header syntax (no colon, folded, NUL, non-ASCII)."""
    kind = _pick(
        rng, ("huge_value", "huge_name", "too_many", "one_hundred", "no_colon", "folded", "nul", "latin1", "big_total")
    )
    target = _pick(rng, ((b"GET", HEALTH), (b"POST", API)))
    extra: list[tuple[bytes, bytes | None]]
    expect: frozenset[str] = OK_OR_REFUSED
    if kind == "huge_value":
        extra, expect = [(b"X-Big", b"a" * int(rng.integers(65_537, 72_000)))], frozenset({"431"})
    elif kind == "huge_name":
        extra, expect = [(b"X" * 70_000, b"1")], frozenset({"431"})
    elif kind == "too_many":
        extra, expect = [(b"X-%d" % i, b"v") for i in range(int(rng.integers(101, 2000)))], frozenset({"431"})
    elif kind == "one_hundred":  # the parser's limit is "more than 100" (with ours: Content-Type, -Length)
        extra, expect = [(b"X-%d" % i, b"v") for i in range(96)], OK
    elif kind == "no_colon":
        extra = [(b"Bad header no colon", None)]
    elif kind == "folded":
        extra = [(b"X-Folded", b"a\r\n continued\r\n\tagain")]
    elif kind == "nul":
        extra = [(b"X-Nul", b"a\x00b"), (b"\x00", b"x")]
    elif kind == "latin1":
        extra = [(b"X-Name", b"caf\xe9 \xff\xfe")]
    else:  # many long lines, each under the limit
        extra = [(b"X-%d" % i, b"b" * 60_000) for i in range(int(rng.integers(2, 20)))]
    body = json.dumps({"texts": ["good"]}).encode()
    data = request(target[0], target[1], body, headers=extra)
    texts = 1 if target[0] == b"POST" and "200" in expect else 0
    return Message("headers", f"{kind}:{target[0].decode()}", data, expect, texts=texts)


def pipelined(rng: np.random.Generator, lim: Limits) -> Message:
    """Several requests on one connection: the service speaks HTTP/1.0 and answers the first one."""
    count = int(rng.integers(2, 60))
    parts, first_expect, first_texts = [], OK, 0
    for i in range(count):
        kind = _pick(rng, ("health", "classify", "bad"))
        version = _pick(rng, (b"HTTP/1.0", b"HTTP/1.1"))
        if kind == "health":
            part, expect, texts = request(b"GET", HEALTH, version=version), OK, 0
        elif kind == "classify":
            payload = _valid_payload(rng, int(rng.integers(1, 3)))
            part, expect, texts = _post(json.dumps(payload).encode(), version=version), OK, len(payload["texts"])
        else:
            part, expect, texts = _post(b'{"texts": 1}', version=version), REFUSED, 0
        if i == 0:
            first_expect, first_texts = expect, texts
        parts.append(part)
    return Message("pipelined", f"{count}", b"".join(parts), first_expect, texts=first_texts)


def close_early(rng: np.random.Generator, lim: Limits) -> Message:
    """The client hangs up: before sending anything, mid-line, mid-headers, mid-body, or right after a request."""
    body = _dumps(rng, _valid_payload(rng, 1))
    full = _post(body)
    kind = _pick(rng, ("nothing", "mid_line", "mid_headers", "mid_body", "after_request"))
    cut = {
        "nothing": 0,
        "mid_line": int(rng.integers(1, 15)),
        "mid_headers": int(rng.integers(20, len(full) - len(body) - 1)),
        "mid_body": len(full) - len(body) + int(rng.integers(0, len(body))),
        "after_request": len(full),
    }[kind]
    how = _pick(rng, ("fin", "reset"))
    return Message("close_early", f"{kind}:{how}", full[:cut], frozenset({"none"}), close=how)


FAMILIES: dict[str, Callable[[np.random.Generator, Limits], Message]] = {
    "valid": valid,
    "wrong_types": wrong_types,
    "sizes": sizes,
    "unicode": unicode,
    "nesting": nesting,
    "numbers": numbers,
    "duplicate_keys": duplicate_keys,
    "truncated": truncated,
    "content_length": content_length,
    "content_type": content_type,
    "transfer_encoding": transfer_encoding,
    "request_line": request_line,
    "methods_paths": methods_paths,
    "headers": headers,
    "pipelined": pipelined,
    "close_early": close_early,
}
# relative shares; the big ones (nesting 10^5, bodies over 1 MiB, 70 kB headers) are a small part of each family
WEIGHTS: dict[str, float] = {
    "valid": 12,
    "wrong_types": 10,
    "sizes": 6,
    "unicode": 9,
    "nesting": 5,
    "numbers": 6,
    "duplicate_keys": 4,
    "truncated": 6,
    "content_length": 7,
    "content_type": 4,
    "transfer_encoding": 3,
    "request_line": 8,
    "methods_paths": 6,
    "headers": 5,
    "pipelined": 4,
    "close_early": 5,
}


def make_message(seed: int, index: int, lim: Limits, families: Sequence[str] | None = None) -> Message:
    """Message ``index`` of a run seeded ``seed``: the same on every run."""
    rng = np.random.default_rng([seed, index])
    names = list(families or WEIGHTS)
    weights = np.array([WEIGHTS[n] for n in names], dtype=np.float64)
    return FAMILIES[str(rng.choice(names, p=weights / weights.sum()))](rng, lim)


# ------------------------------------------------------------------------------------------------- sending


@dataclass
class Exchange:
    """What came back on one connection."""

    reply: bytes = b""
    reset: bool = False
    timed_out: bool = False
    refused: bool = False
    send_error: str | None = None


def send(port: int, message: Message, timeout_s: float = SOCKET_TIMEOUT_S) -> Exchange:
    """Send ``message`` on a fresh connection; unless it hangs up early, half-close and read until the server closes."""
    result = Exchange()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    except ConnectionRefusedError:
        result.refused = True
        return result
    with sock:
        try:
            sock.sendall(message.data)
            if message.close == "half":
                sock.shutdown(socket.SHUT_WR)  # "that is all": a server waiting for more bytes reads EOF
        except OSError as exc:  # the server answered and closed before reading it all: its answer is still there
            result.send_error = type(exc).__name__
        if message.close != "half":
            if message.close == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return result
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            result.reset = True
        except TimeoutError:
            result.timed_out = True
        result.reply = b"".join(chunks)
    return result


class _Bytes:
    """What http.client.HTTPResponse reads a received answer from."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, *_args, **_kwargs) -> io.BytesIO:
        return io.BytesIO(self.data)


def parse_reply(exchange: Exchange, head: bool) -> tuple[str, bytes]:
    """The outcome (a status, "0.9", "none", "reset", "timeout", "malformed", "refused") and the body."""
    data = exchange.reply
    if exchange.refused:
        return "refused", b""
    if data.startswith(b"HTTP/"):
        response = http.client.HTTPResponse(_Bytes(data), method="HEAD" if head else "GET")
        try:
            response.begin()
            body = response.read()
        except (http.client.HTTPException, ValueError):
            return "malformed", data
        return str(response.status), body
    if data:
        return ("0.9", data) if _json(data) is not None else ("malformed", data)
    if exchange.timed_out:
        return "timeout", b""
    return ("reset" if exchange.reset else "none"), b""


def _json(data: bytes) -> object | None:
    try:
        return json.loads(data)
    except ValueError:
        return None


def allowed(outcome: str, expect: frozenset[str]) -> bool:
    return outcome in expect or ("4xx" in expect and outcome.isdigit() and 400 <= int(outcome) < 500)


def is_server_error(outcome: str, message: Message) -> bool:
    """Any 5xx, or no answer where the client waited for one."""
    if outcome == CLIENT_CLOSED:
        return False
    if outcome.isdigit():
        return int(outcome) >= 500
    return outcome in SERVER_ERROR_OUTCOMES and not ("none" in message.expect and outcome in ("none", "reset"))


def body_problems(outcome: str, body: bytes, message: Message, labels: Sequence[str]) -> list[str]:
    """What is wrong with an answer's body: errors must be JSON {"error": ...}, predictions of the right shape."""
    if not outcome.isdigit() or message.head:
        return []
    value = _json(body)
    if outcome != "200":
        if not (isinstance(value, dict) and isinstance(value.get("error"), str)):
            return [f'error body is not JSON {{"error": ...}}: {body[:200]!r}']
        return []
    if not message.texts:  # /healthz
        return [] if isinstance(value, dict) and value.get("status") == "ok" else [f"health body: {body[:200]!r}"]
    predictions = value.get("predictions") if isinstance(value, dict) else None
    if not isinstance(predictions, list) or len(predictions) != message.texts:
        return [f"expected {message.texts} predictions, got {body[:200]!r}"]
    for i, p in enumerate(predictions):
        if not isinstance(p, dict) or p.get("index") != i or p.get("label") not in labels:
            return [f"prediction {i} malformed: {json.dumps(p)[:200]}"]
    return []


@dataclass
class Outcome:
    index: int
    family: str
    variant: str
    outcome: str
    server_error: bool
    problems: list[str] = field(default_factory=list)
    send_error: str | None = None
    data: bytes = b""


def judge(index: int, message: Message, exchange: Exchange, labels: Sequence[str]) -> Outcome:
    if message.close != "half":
        outcome, body = CLIENT_CLOSED, b""
    else:
        outcome, body = parse_reply(exchange, message.head)
    problems = []
    if message.close == "half" and not allowed(outcome, message.expect):
        problems.append(f"outcome {outcome}, allowed {sorted(message.expect)}: {body[:200]!r}")
    problems += body_problems(outcome, body, message, labels)
    server_error = is_server_error(outcome, message)
    kept = message.data if (problems or server_error) and len(message.data) <= 4096 else b""
    return Outcome(index, message.family, message.variant, outcome, server_error, problems, exchange.send_error, kept)


def probe(port: int, labels: Sequence[str]) -> dict:
    """/healthz and one valid classify: does the service still answer properly?"""
    health = Message("probe", "health", request(b"GET", HEALTH), OK)
    texts = ["a good film", "a dull plot"]
    classify = Message("probe", "classify", _post(json.dumps({"texts": texts}).encode()), OK, texts=len(texts))
    results = {}
    for name, message in (("healthz", health), ("classify", classify)):
        o = judge(-1, message, send(port, message), labels)
        results[name] = {"outcome": o.outcome, "problems": o.problems}
    results["ok"] = all(r["outcome"] == "200" and not r["problems"] for r in results.values() if isinstance(r, dict))
    return results


def _labels(port: int) -> list[str]:
    health = Message("probe", "health", request(b"GET", HEALTH), OK)
    outcome, body = parse_reply(send(port, health), head=False)
    if outcome != "200":
        raise RuntimeError(f"the service's /healthz answered {outcome}: {body[:300]!r}")
    return list(json.loads(body)["labels"])


# ---------------------------------------------------------------------------------------------- HTTP run


def _histogram(outcomes: list[Outcome], key: Callable[[Outcome], str]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = {}
    for o in outcomes:
        table.setdefault(key(o), Counter())[o.outcome] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(table.items())}


def _peak(*samples: float | None) -> float | None:
    """The highest RSS seen: the monitor's samples and the last reading (taken between two samples)."""
    seen = [v for v in samples if v is not None]
    return max(seen) if seen else None


def _wait_threads(server: DeviceServer, baseline: int | None, wait_s: float) -> int | None:
    """The server's thread count once its handler threads are gone (or ``wait_s`` has passed)."""
    deadline = time.monotonic() + wait_s
    threads = server.threads()
    while threads is not None and baseline is not None and threads > baseline and time.monotonic() < deadline:
        time.sleep(0.2)
        threads = server.threads()
    return threads


def fuzz_http(
    bundle: str | Path,
    messages: int = 5000,
    seed: int = 0,
    limits: Limits = Limits(),
    threads: int = 1,
    families: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Start ``serve-device``, send ``messages`` fuzz messages one at a time, probe it, stop it: the HTTP section."""
    with tempfile.TemporaryDirectory(prefix="http-fuzz-") as folder:
        config = write_config(Path(folder), Path(bundle), limits, threads)
        server = DeviceServer(config, Path(folder) / "serve-device.stderr")
        try:
            labels = _labels(server.port)
            probe(server.port, labels)  # the first inference (lazy allocations) before the baselines
            threads_start, rss_start = server.threads(), rss_mib(server.pid)
            warmup = max(1, messages // 10)
            outcomes: list[Outcome] = []
            rss_after_warmup = None
            started = time.perf_counter()
            with RssMonitor({"device": server.pid}, interval_s=0.5) as monitor:
                for index in range(messages):
                    message = make_message(seed, index, limits, families)
                    outcomes.append(judge(index, message, send(server.port, message), labels))
                    if outcomes[-1].outcome == "refused" and not server.alive():
                        log(f"http-fuzz: the service died at message {index} ({message.family} {message.variant})")
                        break
                    if index + 1 == warmup:
                        rss_after_warmup = rss_mib(server.pid)
                    if (index + 1) % 1000 == 0:
                        log(f"http-fuzz: {index + 1}/{messages} messages, {time.perf_counter() - started:.0f} s")
                elapsed = time.perf_counter() - started
                rss_end = rss_mib(server.pid)
            alive = server.alive()
            final = probe(server.port, labels) if alive else {"ok": False}
            threads_end = _wait_threads(server, threads_start, limits.read_timeout_s + 2.0)
            alive_after = server.alive()
        finally:
            exit_code = server.stop()
            log_text = server.log_text()
    return _http_section(
        outcomes,
        elapsed,
        {"alive": alive and alive_after, **final, "exit_code_on_sigterm": exit_code},
        check_log(log_text),
        memory_summary(rss_start, rss_after_warmup, rss_end, _peak(monitor.peak.get("device"), rss_end)),
        {"start": threads_start, "end": threads_end},
        warmup,
    )


def _http_section(
    outcomes: list[Outcome], elapsed: float, final: dict, log_check: dict, memory: dict, threads: dict, warmup: int
) -> dict:
    errors = [o for o in outcomes if o.server_error]
    problems = [o for o in outcomes if o.problems]
    status_counts = Counter(o.outcome for o in outcomes)
    return {
        "messages": len(outcomes),
        "seconds": round(elapsed, 1),
        "messages_per_s": round(len(outcomes) / elapsed, 1) if elapsed else None,
        "status_counts": dict(sorted(status_counts.items())),
        "server_errors": len(errors),
        "server_errors_by_outcome": dict(Counter(o.outcome for o in errors)),
        "busy_503": status_counts.get("503", 0),
        "problem_count": len(problems),
        "status_by_family": _histogram(outcomes, lambda o: o.family),
        "send_errors": dict(Counter(o.send_error for o in outcomes if o.send_error)),
        "errors_and_problems": [
            _record(o) for o in (errors + [p for p in problems if not p.server_error])[:KEPT_PROBLEMS]
        ],
        "final": final,
        "log": log_check,
        "memory": memory,
        "memory_warmup_messages": warmup,
        "threads": threads,
    }


def _record(o: Outcome) -> dict:
    record = {k: v for k, v in asdict(o).items() if k != "data"}
    if o.data:
        record["message_base64"] = base64.b64encode(o.data).decode()
    return record


# ------------------------------------------------------------------------------------------------- JSONL


@dataclass(frozen=True)
class Line:
    """One input line of ``cartosplit run`` (without its line break) and what its output must be."""

    family: str
    raw: bytes
    expect: str  # "label", "error", "either"; blank lines have no output at all ("blank")
    ending: bytes = b"\n"


def is_blank(raw: bytes) -> bool:
    """A line with no output: empty or whitespace once decoded (an undecodable line is an input with an error)."""
    try:
        return not raw.decode("utf-8").rstrip("\r\n").strip()
    except UnicodeDecodeError:
        return False


def _json_line(value: object, rng: np.random.Generator) -> bytes:
    return _dumps(rng, value).replace(b"\n", b" ")  # indented JSON, but on one line


def jsonl_line(rng: np.random.Generator, max_chars: int) -> Line:
    """One line of the JSONL fuzz: valid text and JSON lines, and the garbage of the HTTP fuzz as lines."""
    family = str(rng.choice(list(LINE_WEIGHTS), p=_LINE_P))
    words = " ".join(_pick(rng, WORDS) for _ in range(int(rng.integers(1, 12))))
    raw, expect = _LINE_MAKERS[family](rng, words, max_chars)
    ending = _pick(rng, (b"\n", b"\n", b"\n", b"\r\n", b"\r\r\n"))
    return Line(family, raw, "blank" if is_blank(raw) else expect, ending)


def _text_line(rng, words, max_chars):
    return _pick(
        rng, (words, "  " + words + "\t", "[1, 2] " + words, '"' + words + '"', "\\ud800 " + words)
    ).encode(), "label"


def _json_valid(rng, words, max_chars):
    value: dict = {"text": words}
    if _with_pair(rng):
        value["text_pair"] = "the plot"
    return (b"  " if rng.random() < 0.2 else b"") + _json_line(value, rng), "label"


def _json_wrong_types(rng, words, max_chars):
    value = _pick(
        rng,
        (
            {"text": None},
            {"text": 1},
            {"text": [words]},
            {"text": {}},
            {"text": True},
            {},
            {"txt": words},
            {"text": words, "text_pair": 1},
            {"text": ""},
            {"text": "   "},
            {"text": words, "text_pair": ["a"]},
        ),
    )
    return _json_line(value, rng), "error"


def _surrogate(rng, words, max_chars):
    raw = _pick(
        rng,
        (
            '{"text": "\\ud800"}',
            '{"text": "a \\udfff"}',
            '{"text": "ok", "text_pair": "\\udbff"}',
            '{"text": "\\ud83d\\ude00 ' + words + '"}',
        ),
    )
    return raw.encode(), "label" if "ude00" in raw else "error"


def _deep(rng, words, max_chars):
    depth = int(rng.choice([1000, 10**4, 10**5]))
    kind = _pick(rng, ("in_json", "text_json", "braces", "text_line"))
    if kind == "in_json":
        return ('{"text": "' + words + '", "x": ' + "[" * depth + "]" * depth + "}").encode(), "either"
    if kind == "text_json":
        return ('{"text": ' + "[" * depth + "]" * depth + "}").encode(), "error"
    if kind == "braces":
        return ("{" * depth).encode(), "error"
    raw = "[" * depth + "]" * depth  # not "{": a text line; over --max-chars or not
    return raw.encode(), "error" if len(raw) > max_chars else "label"


def _big_number(rng, words, max_chars):
    digits = "".join(str(d) for d in rng.integers(0, 10, 5000))
    raw = _pick(
        rng,
        (
            '{"text": "' + words + '", "n": 1' + digits + "}",
            '{"text": 1' + digits + "}",
            '{"text": NaN}',
            '{"text": Infinity}',
            '{"text": 1e999999}',
            "1" + digits,
        ),
    )
    return raw.encode(), "label" if raw.startswith("1") else "error"


def _invalid_utf8(rng, words, max_chars):
    bad = _pick(rng, (b"\xff", b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"caf\xe9", b"\x80\x80"))
    raw = _pick(rng, (words.encode() + b" " + bad, b'{"text": "' + bad + b'"}', bad))
    return raw, "error"


def _nul(rng, words, max_chars):
    raw, expect = _pick(
        rng,
        (
            (words + "\x00 end", "label"),
            ('{"text": "a\\u0000b"}', "label"),
            ('{"text": "a\x00b"}', "error"),
            ("\x00", "either"),
        ),
    )
    return raw.encode(), expect


def _long(rng, words, max_chars):
    size = int(rng.choice([max_chars // 2, max_chars + 1 + int(rng.integers(0, 50_000)), 20 * max_chars]))
    text = ("good " * (size // 5 + 1))[:size]
    raw = text if rng.random() < 0.5 else json.dumps({"text": text})
    return raw.encode(), "label" if size <= max_chars else "error"


def _cr_variants(rng, words, max_chars):
    raw = _pick(rng, (words + "\r", "a\rb " + words, '{"text": "' + words + '"}\r', "\r\r" + words, words + "\r\r"))
    return raw.encode(), "label"


def _blank(rng, words, max_chars):
    return _pick(rng, (b"", b" ", b"\t", b"\r", b"  \t \r", b"\x0b\x0c", "\u3000\u00a0".encode())), "blank"


def _bom(rng, words, max_chars):
    raw, expect = _pick(rng, (("\ufeff" + words, "label"), ('\ufeff{"text": "a"}', "either"), ("\ufeff", "either")))
    return raw.encode(), expect


def _truncated_json(rng, words, max_chars):
    full = json.dumps({"text": words})
    return full[: int(rng.integers(1, len(full)))].encode(), "error"


def _duplicate(rng, words, max_chars):
    if rng.random() < 0.5:
        return ('{"text": 1, "text": "' + words + '"}').encode(), "label"
    return ('{"text": "' + words + '", "text": 1}').encode(), "error"


_LINE_MAKERS = {
    "text": _text_line,
    "json_valid": _json_valid,
    "json_wrong_types": _json_wrong_types,
    "surrogate": _surrogate,
    "deep_nesting": _deep,
    "big_number": _big_number,
    "invalid_utf8": _invalid_utf8,
    "nul": _nul,
    "long": _long,
    "cr_variants": _cr_variants,
    "blank": _blank,
    "bom": _bom,
    "truncated_json": _truncated_json,
    "duplicate_keys": _duplicate,
}
LINE_WEIGHTS = {
    "text": 16,
    "json_valid": 16,
    "json_wrong_types": 8,
    "surrogate": 5,
    "deep_nesting": 3,
    "big_number": 4,
    "invalid_utf8": 6,
    "nul": 4,
    "long": 2,
    "cr_variants": 6,
    "blank": 8,
    "bom": 3,
    "truncated_json": 5,
    "duplicate_keys": 3,
}
_LINE_P = np.array(list(LINE_WEIGHTS.values()), dtype=np.float64) / sum(LINE_WEIGHTS.values())


def jsonl_lines(seed: int, count: int, max_chars: int) -> list[Line]:
    """``count`` lines; the last one without its line break (a file that does not end in one)."""
    rng = np.random.default_rng([seed, 1 << 30])
    lines = [jsonl_line(rng, max_chars) for _ in range(count)]
    if lines:
        last = lines[-1]
        lines[-1] = Line(last.family, last.raw, last.expect, b"")
    return lines


def check_run_output(lines: Sequence[Line], output: bytes, returncode: int, stderr: str) -> dict:
    """How one ``cartosplit run`` answered: lost, extra and misplaced lines, expectations, exit code, stderr."""
    expected = [line for line in lines if line.expect != "blank"]
    rows, unparsed = [], 0
    for raw in output.splitlines():
        row = _json(raw)
        if isinstance(row, dict) and isinstance(row.get("index"), int):
            rows.append(row)
        else:
            unparsed += 1
    seen = Counter(r["index"] for r in rows)
    answered = {i for i in seen if 0 <= i < len(expected)}
    in_order = [r["index"] for r in rows] == list(range(len(rows)))
    neither = sum(1 for r in rows if ("label" in r) == ("error" in r))  # exactly one of them
    mismatch: Counter = Counter()
    for r in rows:
        if 0 <= r["index"] < len(expected):
            want, line = expected[r["index"]].expect, expected[r["index"]]
            got = "error" if "error" in r else "label"
            if want in ("label", "error") and got != want:
                mismatch[f"{line.family}: {want} expected, got {got}"] += 1
    errors = sum(1 for r in rows if "error" in r)
    return {
        "nonblank_lines": len(expected),
        "output_lines": len(rows) + unparsed,
        "lost_lines": len(expected) - len(answered),
        "extra_lines": sum(seen.values()) - len(answered) + unparsed,
        "unparsed_output_lines": unparsed,
        "in_order": in_order,
        "neither_label_nor_error": neither,
        "labels": len(rows) - errors,
        "errors": errors,
        "expectation_mismatches": dict(mismatch),
        "answers": ["error" if "error" in r else r.get("label") for r in rows],  # compared between runs
        "returncode": returncode,
        "returncode_ok": returncode == (1 if errors else 0),
        "traceback": "Traceback" in stderr,
        "stderr_tail": stderr[-600:],
    }


def _run_cli(
    bundle: Path, path: Path, via_stdin: bool, threads: int, max_chars: int, timeout_s: float
) -> tuple[bytes, int, str]:
    command = [sys.executable, "-m", "cartosplit", "run", "--bundle", str(bundle), "--threads", str(threads)]
    command += ["--max-chars", str(max_chars)]
    with tempfile.TemporaryDirectory(prefix="http-fuzz-run-") as folder:
        if via_stdin:
            with path.open("rb") as stdin:
                done = subprocess.run(command, stdin=stdin, capture_output=True, timeout=timeout_s)
            return done.stdout, done.returncode, done.stderr.decode("utf-8", "replace")
        out = Path(folder) / "out.jsonl"
        done = subprocess.run(
            [*command, "--input", str(path), "--output", str(out)], capture_output=True, timeout=timeout_s
        )
        output = out.read_bytes() if out.exists() else b""
        return output, done.returncode, done.stderr.decode("utf-8", "replace") + done.stdout.decode("utf-8", "replace")


def fuzz_jsonl(
    bundle: str | Path,
    count: int = 2000,
    seed: int = 0,
    max_chars: int = 100_000,
    threads: int = 1,
    timeout_s: float = 1800.0,
    log: Callable[[str], None] = print,
) -> dict:
    """``count`` fuzz lines through ``cartosplit run``, from a file and from stdin: the JSONL section.

    ``max_chars``: ``run``'s --max-chars (the long lines aim just under and over it)."""
    lines = jsonl_lines(seed, count, max_chars)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="http-fuzz-jsonl-") as folder:
        path = Path(folder) / "input.jsonl"
        path.write_bytes(b"".join(line.raw + line.ending for line in lines))
        for name, via_stdin in (("file", False), ("stdin", True)):
            started = time.perf_counter()
            output, returncode, stderr = _run_cli(Path(bundle), path, via_stdin, threads, max_chars, timeout_s)
            runs[name] = {**check_run_output(lines, output, returncode, stderr)}
            runs[name]["seconds"] = round(time.perf_counter() - started, 1)
            log(f"http-fuzz: cartosplit run via {name}: {runs[name]['output_lines']} lines, exit {returncode}")
    answers = [runs[name].pop("answers") for name in runs]
    families = Counter(line.family for line in lines)
    return {
        "file_vs_stdin_differences": _differences(*answers),
        "lines": len(lines),
        "bytes": sum(len(line.raw) + len(line.ending) for line in lines),
        "nonblank_lines": sum(1 for line in lines if line.expect != "blank"),
        "lines_by_family": dict(sorted(families.items())),
        "lost_lines": sum(r["lost_lines"] for r in runs.values()),
        "runs": runs,
    }


def _differences(first: list, second: list) -> int:
    """Positions where two runs' answers differ, a missing answer counted as a difference."""
    return sum(a != b for a, b in zip(first, second, strict=False)) + abs(len(first) - len(second))


# ---------------------------------------------------------------------------------------------------- report


def build_report(http: dict, jsonl: dict, meta: dict) -> dict:
    """Both sections, their bounds, and the top-level keys other tools read."""
    final, log_check, runs = http["final"], http["log"], jsonl["runs"]
    checks = [
        check(
            "server errors (5xx, no answer to a waiting client)",
            http["server_errors"],
            "== 0",
            http["server_errors"] == 0,
        ),
        check(
            "outcomes not allowed for their message, malformed answers",
            http["problem_count"],
            "== 0",
            http["problem_count"] == 0,
        ),
        check(
            "service alive at the end, /healthz 200, a valid classify 200",
            final.get("ok") and final["alive"],
            "True",
            final.get("ok") and final["alive"],
        ),
        check(
            "service log: non-JSON lines (tracebacks)",
            log_check["non_json_lines"],
            "== 0",
            log_check["non_json_lines"] == 0,
        ),
        check("service log: error events", log_check["error_events"], "== 0", log_check["error_events"] == 0),
        check(
            "service threads after the fuzz (handler threads gone)",
            http["threads"],
            "end <= start",
            None not in http["threads"].values() and http["threads"]["end"] <= http["threads"]["start"],
        ),
        check("JSONL lines lost (both runs)", jsonl["lost_lines"], "== 0", jsonl["lost_lines"] == 0),
        check(
            "JSONL answers that differ between file and stdin",
            jsonl["file_vs_stdin_differences"],
            "== 0",
            jsonl["file_vs_stdin_differences"] == 0,
        ),
    ]
    for name, r in runs.items():
        shape = r["extra_lines"] == 0 and r["in_order"] and r["neither_label_nor_error"] == 0
        checks += [
            check(
                f"run via {name}: one line per non-blank line, in order, a label or an error each",
                f"{r['output_lines']}/{r['nonblank_lines']}",
                "all",
                shape,
            ),
            check(
                f"run via {name}: lines answered against expectation",
                sum(r["expectation_mismatches"].values()),
                "== 0",
                not r["expectation_mismatches"],
            ),
            check(
                f"run via {name}: exit code (0 none, 1 some errors), no traceback",
                f"{r['returncode']}, traceback={r['traceback']}",
                "as errors say, False",
                r["returncode_ok"] and not r["traceback"],
            ),
        ]
    lost = jsonl["lost_lines"]
    return {
        "messages": http["messages"],
        "status_counts": http["status_counts"],
        "server_errors": http["server_errors"],
        "lost_lines": lost,
        "server_alive_after": bool(final["alive"] and final.get("ok")),
        **meta,
        "http": http,
        "jsonl": jsonl,
        "checks": checks,
        "passed": all(c["held"] for c in checks),
    }


def markdown(r: dict) -> list[str]:
    h, j = r["http"], r["jsonl"]
    lim = r["limits"]
    lines = [
        "# Fuzzing the device's HTTP service and `cartosplit run`'s JSONL reader",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Load average (1 min) before the run {r['load_average']['before'][0]:.2f}, at its end "
        f"{r['load_average']['end'][0]:.2f}.  ",
        f"Bundle: {r['bundle']}, no edge or cloud (the device answers everything), seed {r['seed']}; limits: "
        f"max_texts {lim['max_texts']}, max_chars {lim['max_chars']:,}, max_body_bytes {lim['max_body_bytes']:,}, "
        f"read_timeout {lim['read_timeout_s']} s.",
        "",
        f"**{r['messages']:,} HTTP messages** over raw sockets, one at a time, in {h['seconds']} s "
        f"({h['messages_per_s']}/s): **{r['server_errors']} server errors**. **{j['lines']:,} JSONL lines** "
        f"({j['nonblank_lines']:,} non-blank) through `cartosplit run` from a file and from stdin: "
        f"**{r['lost_lines']} lost**. Result: **{'PASSED' if r['passed'] else 'FAILED'}**.",
        "",
        *bounds_table(r["checks"]),
        "",
        "## HTTP outcomes",
        "",
        "Outcome counts: " + ", ".join(f"{k}: {v:,}" for k, v in r["status_counts"].items()) + ".  ",
        "An unknown method is answered 405 and HTTP >= 2 is answered 400 (no 5xx for a client's mistake). "
        f"503: {h['busy_503']} (sequential: max_connections never exceeded).  ",
        f"Sends cut short by the server closing first (its answer still read): {h['send_errors'] or 'none'}.",
        "",
        *histogram_table(h["status_by_family"], "family"),
        "",
        "## The service after the fuzz",
        "",
        f"Final probe: {_show_final(h['final'])}; exit code on SIGTERM {h['final']['exit_code_on_sigterm']}.  ",
        f"Log: {h['log']['lines']:,} lines, {h['log']['non_json_lines']} not JSON, "
        f"{h['log']['traceback_lines']} with a traceback, {h['log']['error_events']} error events; events "
        f"{h['log']['events']}.  ",
        f"Threads: {h['threads']['start']} before, {h['threads']['end']} after.  ",
        f"RSS (MiB): start {h['memory']['start_mib']}, after warm-up ({h['memory_warmup_messages']} messages) "
        f"{h['memory']['after_warmup_mib']}, end {h['memory']['end_mib']}, peak {h['memory']['peak_mib']}, growth "
        f"after warm-up {h['memory']['growth_after_warmup_mib']}.",
        "",
        "## `cartosplit run` on fuzzed JSONL",
        "",
        f"{j['lines']:,} lines ({j['bytes']:,} bytes, the last without a line break): "
        + ", ".join(f"{k} {v}" for k, v in j["lines_by_family"].items())
        + ".",
        "",
        "| input | non-blank lines | output lines | lost | extra | labels | errors | exit | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in j["runs"].items():
        lines.append(
            f"| {name} | {run['nonblank_lines']} | {run['output_lines']} | {run['lost_lines']} | {run['extra_lines']} "
            f"| {run['labels']} | {run['errors']} | {run['returncode']} | {run['seconds']} |"
        )
    mismatches = {n: run["expectation_mismatches"] for n, run in j["runs"].items() if run["expectation_mismatches"]}
    if mismatches:
        lines += ["", f"Lines answered against expectation: {mismatches}"]
    if h["errors_and_problems"]:
        lines += ["", f"## Server errors and problems (first {len(h['errors_and_problems'])})", ""]
        lines += [
            f"- #{p['index']} {p['family']} `{p['variant']}`: {p['outcome']}"
            f"{' (server error)' if p['server_error'] else ''}; {'; '.join(p['problems'])[:300]}"
            for p in h["errors_and_problems"]
        ]
    if h["log"]["examples"]:
        lines += ["", "## Log lines that are not JSON, or error events", ""]
        lines += [f"- `{e[:300]}`" for e in h["log"]["examples"]]
    return lines


def _show_final(final: dict) -> str:
    if "healthz" not in final:
        return f"alive={final['alive']}"
    return f"alive={final['alive']}, /healthz {final['healthz']['outcome']}, classify {final['classify']['outcome']}"


def run_fuzz(
    bundle: str | Path,
    messages: int = 5000,
    jsonl_count: int = 2000,
    seed: int = 0,
    threads: int = 1,
    families: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Both parts on one bundle: the report (without command and machine)."""
    limits = Limits()
    load_before = os.getloadavg()  # other jobs on the machine show here
    MODEL_PAIRS["text_pairs"] = trained_on_pairs(load_bundle(bundle, verify=False))
    http = fuzz_http(bundle, messages, seed, limits, threads, families, log)
    jsonl = fuzz_jsonl(bundle, jsonl_count, seed, threads=threads, log=log)
    meta = {
        "bundle": str(bundle),
        "seed": seed,
        "threads": threads,
        "families": list(families or WEIGHTS),
        "limits": asdict(limits),
        "load_average": {"before": load_before, "end": os.getloadavg()},
    }
    return build_report(http, jsonl, meta)


def replay(bundle: str | Path, indexes: Sequence[int], seed: int = 0, families: Sequence[str] | None = None) -> None:
    """Send messages of a run (same seed and families) again by index to a fresh service, and print what came back."""
    limits = Limits()
    MODEL_PAIRS["text_pairs"] = trained_on_pairs(load_bundle(bundle, verify=False))
    with tempfile.TemporaryDirectory(prefix="http-fuzz-") as folder:
        server = DeviceServer(write_config(Path(folder), Path(bundle), limits, 1), Path(folder) / "stderr")
        try:
            labels = _labels(server.port)
            for index in indexes:
                message = make_message(seed, index, limits, families)
                o = judge(index, message, send(server.port, message), labels)
                print(f"#{index} {o.family} {o.variant}: {o.outcome} server_error={o.server_error} {o.problems}")
                print(f"  sent {message.data[:300]!r}{'...' if len(message.data) > 300 else ''}")
        finally:
            server.stop()
            print(server.log_text()[-3000:])


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("http-fuzz", __doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--messages", type=int, default=5000, help="HTTP messages to send (default 5000)")
    parser.add_argument("--jsonl-lines", type=int, default=2000, help="lines of the JSONL fuzz (default 2000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of the device graphs (default 1)")
    parser.add_argument("--only", nargs="+", choices=sorted(WEIGHTS), help="send only these HTTP families")
    parser.add_argument("--replay", nargs="+", type=int, metavar="INDEX", help="resend these messages and print")
    parser.add_argument("--out", help="path prefix for .json and .md (required unless --replay)")
    args = parser.parse_args(argv)
    if args.replay:
        replay(args.bundle, args.replay, args.seed, args.only)
        return 0
    if not args.out:
        parser.error("--out is required (unless --replay)")
    report = run_fuzz(args.bundle, args.messages, args.jsonl_lines, args.seed, args.threads, args.only)
    publish(report, args.out, bench_command("http-fuzz", argv), markdown)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
