"""The audit monitor as users reach it: ``cartosplit run --audit-*`` and serve-device's ``[audit]`` table.

Live tests run the tiny ``bundle`` against real edge and cloud server processes on loopback; at rate 1 every
answer is audited (the sampling is then deterministic), so the counts are exact.
"""

from __future__ import annotations

import json
import logging
import re
from types import SimpleNamespace

import pytest

from cartosplit.cli import main
from cartosplit.device_runtime import audit_state
from cartosplit.device_runtime.service import ConfigError, DeviceService, describe_config, parse_config
from cartosplit.serving.process import start_servers, stop_servers
from tests.test_device_service import Running

TEXTS = ["the film was good", "a bad plot", "it is quite dull", "superb actors", "the movie", "nice but boring"] * 3


@pytest.fixture(scope="module")
def servers(bundle):
    servers = start_servers(bundle)
    yield servers["edge"].address, servers["cloud"].address
    stop_servers(servers)


def _inputs(tmp_path) -> str:
    source = tmp_path / "texts.txt"
    source.write_text("\n".join(TEXTS) + "\n")
    return str(source)


# --- cartosplit run -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--audit-rate", "0.5"], "--audit-rate needs --edge"),
        (["--audit-rate", "1.5", "--edge", "127.0.0.1:1"], r"--audit-rate must be a probability in \[0, 1\]"),
        (["--audit-rate", "0.1", "--edge", "127.0.0.1:1", "--audit-epsilon", "0"], "--audit-epsilon is in points"),
        (["--audit-rate", "0.1", "--edge", "127.0.0.1:1", "--audit-alpha", "1"], r"--audit-alpha must be in \(0, 1\)"),
        (["--audit-state", "s.json"], "--audit-state needs --audit-rate > 0"),
        (["--audit-adaptive"], "--audit-adaptive needs --audit-rate > 0"),
    ],
)
def test_bad_audit_flags_exit_2_before_any_work(bundle, tmp_path, capsys, args, message):
    out = tmp_path / "out.jsonl"
    code = main(["run", "--bundle", str(bundle), "--input", _inputs(tmp_path), "--output", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert re.search(message, err), err
    assert not out.exists()  # refused before the bundle was loaded or any input answered


def test_run_audits_every_answer_and_keeps_the_state(bundle, servers, tmp_path, capsys):
    edge, cloud = servers
    summary_file, state = tmp_path / "summary.json", tmp_path / "audit.json"
    args = ["run", "--bundle", str(bundle), "--edge", edge, "--cloud", cloud, "--input", _inputs(tmp_path)]
    args += ["--output", str(tmp_path / "out.jsonl"), "--summary", str(summary_file)]
    args += ["--audit-rate", "1.0", "--audit-state", str(state), "--audit-epsilon", "50"]  # no alarm on a tiny model
    assert main(args) == 0, capsys.readouterr().err
    audit = json.loads(summary_file.read_text())["audit"]
    counters = audit["counters"]
    assert counters["answers"] == counters["sampled"] == len(TEXTS)
    assert counters["recorded"] > 0 and counters["recorded"] == counters["sent"] + counters["free"]
    assert counters["recorded"] + sum(counters["dropped"].values()) == len(TEXTS)  # nothing lost at close
    assert audit["sequences"]["all"]["audits"] == counters["recorded"]
    assert audit["epsilon"] == 0.5 and audit["alpha"] == 0.05 and audit["pending"] == 0
    err = capsys.readouterr().err
    assert f"audit: {counters['recorded']} of {len(TEXTS)} answers audited (sent {counters['sent']}" in err
    assert "% of all-cloud's" in err and "upper bound" in err and "promise 50 pt" in err

    loaded = audit_state.load(state)
    assert loaded.state is not None, loaded.reason
    assert loaded.state.counters["recorded"] == counters["recorded"]

    assert main(args) == 0  # the same state file: the monitor resumes and its counters go on
    again = json.loads(summary_file.read_text())["audit"]
    assert again["counters"]["answers"] == 2 * len(TEXTS)
    assert again["events"][0]["event"] == "resumed" and "audit resumed:" in capsys.readouterr().err


def test_a_run_without_audits_has_no_audit_summary(bundle, tmp_path):
    summary_file = tmp_path / "summary.json"
    args = ["--input", _inputs(tmp_path), "--output", str(tmp_path / "out.jsonl"), "--summary", str(summary_file)]
    assert main(["run", "--bundle", str(bundle), *args]) == 0
    assert "audit" not in json.loads(summary_file.read_text())


# --- serve-device -------------------------------------------------------------------------------------------


def test_audit_table_defaults_round_trip_and_relative_state(tmp_path):
    plain = describe_config(parse_config('bundle = "/b"\n'))
    assert (plain["audit_rate"], plain["audit_epsilon_pt"], plain["audit_alpha"]) == (0.02, 0.5, 0.05)
    assert plain["audit_adaptive"] is False and plain["audit_state"] is None

    text = 'bundle = "/b"\n[servers]\nedge = "h:1"\n[audit]\nrate = 0.1\nepsilon_pt = 1\nalpha = 0.01\n'
    text += 'adaptive = true\nstate = "state/audit.json"\n'
    config = parse_config(text, tmp_path / "device.toml")
    described = describe_config(config)
    assert (described["audit_rate"], described["audit_epsilon_pt"], described["audit_alpha"]) == (0.1, 1.0, 0.01)
    assert described["audit_adaptive"] is True
    assert described["audit_state"] == str(tmp_path / "state" / "audit.json")  # relative to the file
    settings = config.audit_settings()
    assert (settings.rate, settings.epsilon, settings.alpha, settings.adaptive) == (0.1, 0.01, 0.01, True)
    assert parse_config('bundle = "/b"\n[audit]\nrate = 0.5\n').audit_settings() is None  # no edge: off
    assert parse_config('bundle = "/b"\n[servers]\nedge = "h:1"\n[audit]\nrate = 0\n').audit_settings() is None


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("rate = 2", r"audit\.rate must be a probability in \[0, 1\]"),
        ("rate = nan", r"audit\.rate must be a probability"),
        ('rate = "2 %"', r"audit\.rate must be a probability"),
        ("epsilon_pt = 0", r"audit\.epsilon_pt must be a number of percentage points"),
        ("alpha = 1.0", r"audit\.alpha must be a number in \(0, 1\)"),
        ("adaptive = 1", r"audit\.adaptive must be true or false"),
        ("rates = 0.1", r"unknown key 'audit\.rates'"),
        ("rate = 0\nadaptive = true", r"audit\.adaptive needs audit\.rate > 0"),
    ],
)
def test_bad_audit_values_are_refused_naming_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(f'bundle = "/b"\n[audit]\n{table}\n')


class _Monitor:
    def __init__(self) -> None:
        self.events = [{"event": "start", "path_index": 40}]


class _Runtime:
    """What DeviceService reads of a runtime with audits on."""

    def __init__(self) -> None:
        self.monitor = _Monitor()

    def audit_summary(self) -> dict:
        return {"enabled": True, "counters": {"answers": len(self.monitor.events)}}

    def predict(self, texts, text_pairs=None, max_chars=0):
        self.monitor.events.append({"event": "alarm", "at_answer": 7, "path_index": 0})
        return [SimpleNamespace(to_dict=lambda: {"label": "x"}) for _ in texts]


def test_health_has_the_audit_summary_and_each_event_is_one_log_line(caplog):
    runtime = _Runtime()
    service = DeviceService(parse_config('bundle = "/b"\n[listen]\nport = 0\n'), runtime)
    try:
        assert service.health()["audit"] == {"enabled": True, "counters": {"answers": 1}}
        with caplog.at_level(logging.INFO, logger="cartosplit.device_service"):
            service.classify(["a"], None)
            service.classify(["b"], None)
        lines = [json.loads(r.getMessage()) for r in caplog.records if "audit_" in r.getMessage()]
        assert [line["event"] for line in lines] == ["audit_alarm", "audit_alarm"]  # each once, "start" never
        assert lines[0]["path_index"] == 0 and caplog.records[0].levelno == logging.WARNING
    finally:
        service.server_close()


def _metrics(port: int) -> dict:
    """GET /metrics, parsed by prometheus-client's own parser: {family: {labels: value}}."""
    import http.client

    from prometheus_client.parser import text_string_to_metric_families

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("Content-Type").startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    finally:
        connection.close()
    return {
        family.name: {tuple(sorted(s.labels.items())): s.value for s in family.samples}
        for family in text_string_to_metric_families(text)
    }


def test_serve_device_audits_through_the_edge_and_reports_in_healthz(bundle, servers, tmp_path):
    edge, cloud = servers
    text = f'bundle = "{bundle}"\nthreads = 1\n[listen]\nport = 0\n[servers]\nedge = "{edge}"\ncloud = "{cloud}"\n'
    running = Running(parse_config(text + "[audit]\nrate = 1.0\nepsilon_pt = 50\n"))
    try:
        status, _ = running.classify({"texts": TEXTS[:6]})
        assert status == 200
        status, health = running.request("GET", "/healthz")
        assert status == 200 and health["audit"]["enabled"] is True
        assert health["audit"]["counters"]["answers"] == 6 and health["audit"]["epsilon"] == 0.5
        metrics = _metrics(running.port)
        assert metrics["cartosplit_audit_enabled"][()] == 1.0
        assert metrics["cartosplit_audit_answers"][()] == 6.0  # the parser drops a counter's _total
        bounds = metrics["cartosplit_audit_upper_bound"]
        assert set(bounds) == {(("sequence", s),) for s in ("all", "device", "edge")}
        assert all(0.0 <= v <= 1.0 for v in bounds.values())
    finally:
        running.stop()
    off = Running(parse_config(f'bundle = "{bundle}"\nthreads = 1\n[listen]\nport = 0\n'))  # no edge: off
    try:
        assert off.request("GET", "/healthz")[1]["audit"] is None
        assert _metrics(off.port) == {"cartosplit_audit_enabled": {(): 0.0}}
    finally:
        off.stop()
