"""Tier servers as subprocesses (start, wait for the ready line, watch the logs, stop) and their memory.

One harness for every process-level user: ``cartosplit demo``, the benchmarks (the torch-free aarch64
check among them, so nothing here may import torch, grpc or a model runtime: the standard library only)
and the tests. A server is the real CLI, ``python -m cartosplit serve-cloud ...``, as deployed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# what `cartosplit serve-cloud|serve-edge|serve-device` (and the netem helpers) print once they listen
READY = re.compile(r"serving .* on (\S+:\d+)\s*$")
TAIL_LINES = 30  # stderr lines kept for an error message
KEPT_LINES = 20  # error events (and non-JSON lines) kept for a report


class ServerProcess:
    """A process that prints a ready line naming its address; ``address`` once it did.

    ``args`` are given to ``python -m MODULE`` (the cartosplit CLI by default); ``module=None`` runs ``args``
    as a command line of its own (a chroot, an installed script). ``prefix``: a command put in front (e.g.
    ``ip netns exec NS``). ``env``: extra environment variables for this process only.

    stderr is read by a thread as it comes (the pipe must never fill): the last lines are kept for error
    messages, and the tiers' JSON log events are watched: error events counted (the first ones kept),
    non-JSON lines kept, the metrics port taken from the "started" event. ``stderr_path``: every stderr line
    is also written there (a benchmark that judges the whole log), complete once ``stop`` returns.
    """

    def __init__(
        self,
        args: Sequence[str],
        name: str,
        timeout_s: float = 120.0,
        prefix: Sequence[str] = (),
        module: str | None = "cartosplit",
        env: Mapping[str, str] | None = None,
        stderr_path: Path | None = None,
    ) -> None:
        self.name = name
        self._stderr_file = open(stderr_path, "w", encoding="utf-8") if stderr_path else None  # noqa: SIM115
        self.stderr_tail: list[str] = []
        self.error_lines: list[str] = []
        self.error_count = 0
        self.other_lines: list[str] = []
        self.metrics_port: int | None = None  # from the "started" log event, when --metrics-port is given
        command = [*prefix, *([sys.executable, "-m", module] if module else []), *args]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **env} if env else None,
        )
        self._ready = threading.Event()
        self._address: str | None = None
        self._stderr_reader = threading.Thread(target=self._read_stderr, name=f"{name}-stderr", daemon=True)
        self._stderr_reader.start()
        threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True).start()
        self.address = self._wait_ready(timeout_s)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def _read_stdout(self) -> None:
        # a thread, not readline() in __init__: a process that prints nothing must not outlast timeout_s
        for line in self.process.stdout:
            match = READY.search(line) if self._address is None else None
            if match:
                self._address = match.group(1)
                self._ready.set()
        self._ready.set()  # stdout closed: the process is gone (or never said it was ready)

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            if self._stderr_file is not None:
                self._stderr_file.write(raw)
                self._stderr_file.flush()
            line = raw.rstrip()
            self.stderr_tail = [*self.stderr_tail[-(TAIL_LINES - 1) :], line[:2000]]
            if '"event": "started"' in line:
                with contextlib.suppress(ValueError):
                    self.metrics_port = json.loads(line).get("metrics_port")
            if is_error_event(line):
                self.error_count += 1
                if len(self.error_lines) < KEPT_LINES:
                    self.error_lines.append(line[:8000])
            elif not line.startswith("{") and len(self.other_lines) < KEPT_LINES:
                self.other_lines.append(line[:2000])

    def _wait_ready(self, timeout_s: float) -> str:
        self._ready.wait(timeout_s)
        if self._address is not None:
            return self._address
        exited = self.process.poll()
        if exited is None and self._ready.is_set():  # stdout closed without a ready line: it is on its way out
            with contextlib.suppress(subprocess.TimeoutExpired):
                exited = self.process.wait(5.0)
        self.stop()
        self._stderr_reader.join(timeout=2.0)  # the last lines, which say why, come after the exit
        why = f"exited with code {exited}" if exited is not None else f"did not start within {timeout_s:.0f} s"
        tail = "\n".join(self.stderr_tail[-15:])
        raise RuntimeError(f"{self.name} {why}:\n{tail}")

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (a server drains in-flight requests, then exits), SIGKILL after ``grace_s``; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._stderr_file is not None and not self._stderr_file.closed:
            self._stderr_reader.join(timeout=2.0)  # its last lines, written after the exit
            self._stderr_file.close()
        return self.process.returncode


def is_error_event(line: str) -> bool:
    """An error-level JSON log event, or a Python traceback printed outside the JSON logs."""
    if line.startswith("{"):  # the JSON formatter's own spacing: no need to parse every request's line
        return '"level": "error"' in line or '"level": "critical"' in line
    return line.startswith("Traceback")


def start_servers(
    bundle: str | Path,
    fmt: str = "onnx-fp32",
    tiers: Sequence[str] = ("cloud", "edge"),
    args: Sequence[str] = (),
    edge_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> dict[str, ServerProcess]:
    """The cloud (always) and the edge (when asked) on free loopback ports, cloud first: the edge needs it.

    ``args``: more options for both servers; ``edge_args``: for the edge only; ``env``: for both processes.
    """
    common = ["--bundle", str(bundle), "--port", "0", "--format", fmt, *args]
    servers: dict[str, ServerProcess] = {}
    try:
        servers["cloud"] = ServerProcess(["serve-cloud", *common], "cloud", env=env)
        if "edge" in tiers:
            edge = ["serve-edge", *common, "--cloud", servers["cloud"].address, *edge_args]
            servers["edge"] = ServerProcess(edge, "edge", env=env)
    except BaseException:
        stop_servers(servers)
        raise
    return servers


def stop_servers(servers: Mapping[str, ServerProcess]) -> None:
    for server in reversed(list(servers.values())):  # the edge first: it forwards to the cloud
        server.stop()


# ---------------------------------------------------------------------------------------------------- memory


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux /proc), None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        return None
    return None


class RssMonitor:
    """Samples the RSS of named processes every ``interval_s`` in a thread: a timeline and each one's peak."""

    def __init__(self, pids: Mapping[str, int], interval_s: float = 1.0) -> None:
        self.pids, self.interval_s = dict(pids), interval_s
        self.started = time.monotonic()
        self.timeline: list[dict[str, float | None]] = []
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-monitor", daemon=True)

    def read(self) -> dict[str, float | None]:
        values = {name: rss_mib(pid) for name, pid in self.pids.items()}
        for name, value in values.items():
            if value is not None:
                self.peak[name] = max(self.peak.get(name, 0.0), value)
        return values

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.timeline.append({"t_s": round(time.monotonic() - self.started, 2), **self.read()})
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def memory_summary(start: float | None, after_warmup: float | None, end: float | None, peak: float | None) -> dict:
    """One process's RSS figures for a report (MiB, rounded), with the growth the benchmarks bound."""
    growth = None if end is None or after_warmup is None else round(end - after_warmup, 1)
    return {
        "start_mib": _round(start),
        "after_warmup_mib": _round(after_warmup),
        "end_mib": _round(end),
        "peak_mib": _round(peak),
        "growth_after_warmup_mib": growth,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
