"""``cartosplit bench http-fuzz``: a short run on the tiny bundle, the fuzzer's own judgement, and property tests
of what the HTTP service and ``cartosplit run`` share for reading untrusted input.

The short run starts the real ``serve-device`` and ``cartosplit run`` (subprocesses) on the ``bundle`` fixture.
The property tests feed arbitrary bytes and arbitrary JSON to ``parse_classify_request`` and the
``inputs`` helpers: anything but their documented error is a 500 (or a lost line) waiting to happen.
"""

from __future__ import annotations

import json
import math
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cartosplit.benchmarks import http_fuzz as hf
from cartosplit.device_runtime.inputs import InputError, parse_json, text_problem
from cartosplit.device_runtime.service import DeviceService, RequestError, parse_classify_request, parse_config

# --- the short run ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_run(bundle):
    return hf.run_fuzz(bundle, messages=300, jsonl_count=200, seed=7, log=lambda *_: None)


def test_short_fuzz_has_no_server_error_and_loses_no_line(short_run):
    failed = [c for c in short_run["checks"] if not c["held"]]
    assert short_run["server_errors"] == 0, short_run["http"]["errors_and_problems"]
    assert short_run["lost_lines"] == 0, short_run["jsonl"]["runs"]
    assert short_run["server_alive_after"]
    assert not failed and short_run["passed"], failed


def test_short_fuzz_reaches_every_kind_of_answer(short_run):
    counts = short_run["status_counts"]
    assert sum(counts.values()) == short_run["messages"] == 300
    # valid requests answered, bad bodies refused, HTTP-level refusals reached: the fuzz is not all one path
    for status in ("200", "400", "411", "413", "415", "client closed"):
        assert counts.get(status, 0) > 0, counts
    assert short_run["http"]["log"]["events"]["classified"] > 0
    runs = short_run["jsonl"]["runs"]
    assert runs["file"]["labels"] > 0 and runs["file"]["errors"] > 0  # both kinds of line were in the input
    assert short_run["jsonl"]["nonblank_lines"] < short_run["jsonl"]["lines"]  # and blank ones
    assert runs["file"]["output_lines"] == runs["stdin"]["output_lines"] == short_run["jsonl"]["nonblank_lines"]


def test_the_benchmark_is_registered():
    from cartosplit.benchmarks.cli import BENCHMARKS

    assert BENCHMARKS["http-fuzz"][0] == "cartosplit.benchmarks.http_fuzz"


# --- the fuzzer's judgement -------------------------------------------------------------------------------


def test_messages_are_replayable_and_every_family_is_made():
    limits = hf.Limits()
    messages = [hf.make_message(3, i, limits) for i in range(600)]
    assert [m.data for m in messages[:50]] == [hf.make_message(3, i, limits).data for i in range(50)]
    assert {m.family for m in messages} == set(hf.FAMILIES)
    assert all(m.expect for m in messages)


def _message(expect: set[str], **kwargs) -> hf.Message:
    return hf.Message("test", "v", b"", frozenset(expect), **kwargs)


@pytest.mark.parametrize(
    ("exchange", "expect", "outcome", "server_error"),
    [
        (hf.Exchange(reply=b"HTTP/1.0 500 Internal\r\nContent-Length: 2\r\n\r\n{}"), {"4xx"}, "500", True),
        (hf.Exchange(reply=b"HTTP/1.0 503 Busy\r\nContent-Length: 0\r\n\r\n"), {"200"}, "503", True),
        (hf.Exchange(reply=b"HTTP/1.0 501 No\r\nContent-Length: 0\r\n\r\n"), {"4xx"}, "501", True),
        (hf.Exchange(reply=b"HTTP/1.0 404 No\r\nContent-Length: 0\r\n\r\n"), {"4xx"}, "404", False),
        (hf.Exchange(), {"4xx"}, "none", True),  # the client waited and got nothing
        (hf.Exchange(), {"none"}, "none", False),  # it sent no request
        (hf.Exchange(reset=True), {"200"}, "reset", True),
        (hf.Exchange(timed_out=True), {"200"}, "timeout", True),
        (hf.Exchange(refused=True), {"200"}, "refused", True),
        (hf.Exchange(reply=b"garbage"), {"200"}, "malformed", True),
        (hf.Exchange(reply=b'{"status": "ok"}'), {"0.9"}, "0.9", False),
    ],
)
def test_outcomes_and_server_errors(exchange, expect, outcome, server_error):
    message = _message(expect)
    got, _ = hf.parse_reply(exchange, head=False)
    assert got == outcome
    assert hf.is_server_error(got, message) is server_error


def test_a_client_that_hung_up_is_never_a_server_error():
    message = _message({"none"}, close="reset")
    result = hf.judge(0, message, hf.Exchange(), labels=["a"])
    assert result.outcome == hf.CLIENT_CLOSED and not result.server_error and not result.problems


def test_answers_are_checked_for_shape():
    labels = ("negative", "positive")
    ok = b'{"predictions": [{"index": 0, "label": "positive"}]}'
    message = _message({"200"}, texts=1)
    assert hf.body_problems("200", ok, message, labels) == []
    assert hf.body_problems("200", b'{"predictions": []}', message, labels)
    assert hf.body_problems("200", ok.replace(b"positive", b"maybe"), message, labels)
    assert hf.body_problems("400", b'{"error": "no"}', _message({"4xx"}), labels) == []
    assert hf.body_problems("400", b"<html>no</html>", _message({"4xx"}), labels)


def _lines(*expects: str) -> list[hf.Line]:
    return [hf.Line("test", b"x", e) for e in expects]


def test_run_output_check_counts_lost_extra_and_misplaced_lines():
    lines = _lines("label", "blank", "error", "label")  # three non-blank: indexes 0, 1, 2
    rows = [{"index": 0, "label": "a"}, {"index": 1, "error": "bad"}, {"index": 2, "label": "b"}]
    good = "".join(json.dumps(r) + "\n" for r in rows).encode()
    result = hf.check_run_output(lines, good, 1, "")
    assert (result["lost_lines"], result["extra_lines"], result["in_order"], result["returncode_ok"]) == (
        0,
        0,
        True,
        True,
    )
    assert result["expectation_mismatches"] == {}

    lost = hf.check_run_output(lines, good.splitlines(keepends=True)[0] + good.splitlines(keepends=True)[2], 1, "")
    assert lost["lost_lines"] == 1 and not lost["in_order"]
    extra = hf.check_run_output(lines, good + b"not json\n" + json.dumps(rows[0]).encode() + b"\n", 1, "")
    assert extra["extra_lines"] == 2 and extra["unparsed_output_lines"] == 1
    wrong = hf.check_run_output(lines, good.replace(b'"error": "bad"', b'"label": "c"'), 1, "Traceback (most")
    assert wrong["expectation_mismatches"] == {"test: error expected, got label": 1}
    assert not wrong["returncode_ok"] and wrong["traceback"]  # no errors left, yet exit 1


def test_jsonl_lines_are_replayable_and_hold_blank_and_garbage_lines():
    lines = hf.jsonl_lines(5, 500, 100_000)
    assert lines == hf.jsonl_lines(5, 500, 100_000)
    assert {line.family for line in lines} == set(hf.LINE_WEIGHTS)
    assert all(b"\n" not in line.raw for line in lines)  # one input line each
    assert lines[-1].ending == b"" and all(b"\n" in line.ending for line in lines[:-1])
    assert all((line.expect == "blank") == hf.is_blank(line.raw) for line in lines)


# --- a defect the fuzz found: a blank line before the request line was answered with nothing --------------


class _Runtime:
    labels = ("negative", "positive")

    def predict(self, texts, text_pairs=None, max_chars=0):
        raise AssertionError("not reached by these requests")


@pytest.fixture()
def stub_service(tmp_path):
    service = DeviceService(parse_config(f'bundle = "{tmp_path}"\n[listen]\nport = 0\n'), _Runtime())
    thread = threading.Thread(target=service.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield service.server_address[1]
    service.shutdown()
    service.server_close()


def _exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return sock.makefile("rb").read()


@pytest.mark.parametrize("blank", [b"\r\n", b"\n", b"\r\n\r\n", b" \t\r\n", b"\x1c\r\n"])
def test_blank_lines_before_the_request_line_are_skipped(stub_service, blank):
    reply = _exchange(stub_service, blank + b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 200 "), reply[:200]  # before the fix: b"" (no answer at all)


def test_blank_lines_then_nothing_and_then_a_long_line(stub_service):
    assert _exchange(stub_service, b"\r\n\r\n") == b""  # no request was sent: nothing to answer
    reply = _exchange(stub_service, b"\r\nGET /" + b"a" * 70_000 + b" HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 414 ") and b'"error"' in reply
    assert _exchange(stub_service, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")


# --- property tests: untrusted bytes and JSON never raise anything but the documented error ---------------

CONFIG = parse_config('bundle = "/b"\n[limits]\nmax_texts = 4\nmax_chars = 40\n')
# text with lone surrogates and control characters, which st.text() leaves out by default
TEXT = st.one_of(st.text(), st.text(st.characters(categories=["Cs", "Cc", "Zs", "Zl", "L", "N", "S"])))
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**4000), 10**4000)  # long, but under the digit limit json.dumps has too
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT,
    lambda children: st.lists(children, max_size=6) | st.dictionaries(TEXT, children, max_size=6),
    max_leaves=30,
)
# bodies close to valid ones, so that the checks past the JSON parser are reached too
BODY = st.one_of(
    JSON,
    st.fixed_dictionaries({"texts": st.lists(TEXT, max_size=6)}),
    st.fixed_dictionaries({"texts": st.lists(TEXT, min_size=1, max_size=3), "text_pairs": JSON}),
    st.dictionaries(st.sampled_from(["texts", "text_pairs", "x"]), JSON, max_size=3),
)
PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(body: bytes):
    try:
        return parse_classify_request(body, CONFIG)
    except RequestError as error:
        assert int(error.status) in (400, 413) and error.message
        return None


@PROPERTY
@given(st.binary(max_size=2000))
def test_classify_request_from_arbitrary_bytes_raises_only_request_error(body):
    _parse(body)


@PROPERTY
@given(BODY, st.booleans())
def test_classify_request_from_arbitrary_json_is_valid_or_a_request_error(value, ascii_only):
    try:
        text = json.dumps(value, ensure_ascii=ascii_only)
    except ValueError:
        return
    body = text.encode("utf-8", "surrogatepass")  # unescaped lone surrogates: bytes that are not UTF-8
    parsed = _parse(body)
    if parsed is None:
        return
    texts, pairs = parsed
    assert 1 <= len(texts) <= CONFIG.max_texts
    assert pairs is None or len(pairs) == len(texts)
    for item in [*texts, *(pairs or [])]:
        assert isinstance(item, str) and item.strip() and len(item) <= CONFIG.max_chars
        item.encode("utf-8")  # the tokenizer can read it


@PROPERTY
@given(st.one_of(TEXT, JSON.map(lambda v: json.dumps(v)), st.integers(1, 20_000).map(lambda n: "[" * n)))
def test_parse_json_raises_only_input_error(text):
    try:
        parse_json(text, "line 1")
    except InputError as error:
        assert str(error).startswith("line 1 ")


@PROPERTY
@given(JSON)
def test_text_problem_never_raises_and_names_each_unreadable_value(value):
    problem = text_problem(value)
    readable = isinstance(value, str) and not any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    assert (problem is None) == readable
    assert problem is None or isinstance(problem, str)


def test_numbers_over_the_digit_limit_and_nan_are_refused_not_raised():
    for body in (
        b'{"texts": [1' + b"0" * 5000 + b"]}",
        b'{"texts": [NaN]}',
        b'{"texts": ["a"], "text_pairs": [-Infinity]}',
    ):
        assert _parse(body) is None
    assert math.isnan(parse_json("NaN", "line 1"))  # a number, refused later as "not a string"
