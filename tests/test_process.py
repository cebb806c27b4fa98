"""The process harness (serving/process.py) on stand-in processes: no bundle, no model, a second each."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from cartosplit.serving.process import RssMonitor, ServerProcess, is_error_event, memory_summary, rss_mib


def fake_server(script: str, name: str = "fake", **options) -> ServerProcess:
    """A Python one-off standing in for a tier server: ``script`` prints what a server would."""
    return ServerProcess([sys.executable, "-c", textwrap.dedent(script)], name, module=None, **options)


def test_the_ready_line_gives_the_address_and_stderr_events_are_watched():
    server = fake_server(
        """
        import json, os, sys, time
        assert os.environ["CARTOSPLIT_TEST"] == "1"  # env= reaches the process
        print(json.dumps({"level": "info", "event": "started", "metrics_port": 9101}), file=sys.stderr, flush=True)
        print(json.dumps({"level": "error", "event": "boom"}), file=sys.stderr, flush=True)
        print("a warning outside the JSON logs", file=sys.stderr, flush=True)
        print("edge serving /b on 127.0.0.1:4321", flush=True)
        time.sleep(60)
        """,
        env={"CARTOSPLIT_TEST": "1"},
    )
    try:
        assert server.address == "127.0.0.1:4321" and server.alive()
        deadline = time.monotonic() + 5
        while len(server.stderr_tail) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.metrics_port == 9101
        assert server.error_count == 1 and '"boom"' in server.error_lines[0]
        assert server.other_lines == ["a warning outside the JSON logs"]
    finally:
        code = server.stop(grace_s=5)
    assert code == -15 and not server.alive()  # SIGTERM, and the one-off does not catch it


def test_a_process_that_exits_before_its_ready_line_says_why():
    with pytest.raises(RuntimeError, match=r"(?s)bad exited with code 3:.*no bundle here"):
        fake_server("import sys; print('no bundle here', file=sys.stderr); sys.exit(3)", "bad")


def test_a_silent_process_is_stopped_at_the_timeout():
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="silent did not start within 1 s"):
        fake_server("import time; time.sleep(60)", "silent", timeout_s=1)
    assert time.monotonic() - started < 15


def test_the_cli_module_and_a_prefix_make_the_command_line():
    # `env` as a prefix runs the same interpreter: what `ip netns exec NS` does for the netns benchmarks
    server = ServerProcess(
        ["-c", "print('probe serving probes on 127.0.0.1:1', flush=True); import time; time.sleep(60)"],
        "probe",
        prefix=["env", "CARTOSPLIT_TEST=1", sys.executable],
        module=None,
    )
    assert server.address == "127.0.0.1:1"
    assert server.stop() is not None


def test_error_events_are_error_levels_and_tracebacks():
    assert is_error_event('{"level": "error", "event": "x"}') and is_error_event('{"level": "critical"}')
    assert not is_error_event('{"level": "warning", "event": "x"}') and is_error_event("Traceback (most recent")
    assert not is_error_event("an ordinary line")


def test_rss_of_a_live_and_a_finished_process_and_the_monitor():
    if not os.path.isdir("/proc/self"):
        pytest.skip("no /proc: RSS is read from /proc/PID/status")
    mine = rss_mib(os.getpid())
    assert mine is not None and mine > 1
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert rss_mib(int(done.stdout)) is None  # gone
    with RssMonitor({"me": os.getpid()}, interval_s=0.05) as monitor:
        time.sleep(0.3)
    assert len(monitor.timeline) >= 2 and monitor.peak["me"] >= mine * 0.5
    assert monitor.timeline[0]["t_s"] <= monitor.timeline[-1]["t_s"]


def test_memory_summary_rounds_and_leaves_unknowns_unknown():
    assert memory_summary(100.04, 110.0, 112.36, 115.0) == {
        "start_mib": 100.0,
        "after_warmup_mib": 110.0,
        "end_mib": 112.4,
        "peak_mib": 115.0,
        "growth_after_warmup_mib": 2.4,
    }
    assert memory_summary(None, None, 50.0, None)["growth_after_warmup_mib"] is None
