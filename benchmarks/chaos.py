"""Chaos under load on loopback: many simulated devices while the edge and the cloud are killed, frozen, restarted.

    cartosplit bench chaos --bundle bundles/demo-sst2 --clients 32 --seconds 600 \
        --out benchmarks/results/chaos

Starts a cloud and an edge server as subprocesses (the real CLI), then runs ``--clients`` threads, each
with its own DeviceRuntime, sending one sentence at a time for ``--seconds``, as ``bench load`` does. A
chaos loop meanwhile waits a random ``--min-gap``..``--max-gap`` seconds (counted from the end of the
previous fault, so faults never overlap), picks a tier (edge or cloud) and an action with a seeded RNG:

- kill: SIGKILL, a pause of 0.5-3 s, then the server is started again;
- freeze: SIGSTOP for 1-5 s (the port accepts connections, nothing answers), then SIGCONT;
- restart: SIGTERM (a graceful stop: in-flight requests drain), then started again.

A server always comes back on the port it had (an explicit ``--port``), so the device runtimes and the
edge (which dials the cloud's address) reconnect without being told. Every fault is logged with its time.

Every input has an id (client, sequence number). lost = inputs submitted that got no answer (an exception
from ``predict``, or none at the end); duplicates = ids answered more than once. The runtime is designed to
always answer (an earlier exit, marked degraded, when the tiers after it fail): an exception is a finding.
Each answer is labelled by the phase at its submission: steady, edge_down / cloud_down (killed, or being
restarted), edge_frozen / cloud_frozen, recovering (the first ``--recover-s`` seconds after a tier came back).

Exit status 1 if lost > 0, duplicates > 0, or a server is not answering at the end; the other bounds
(RSS drift, labels, restarts) are checked and reported in the Markdown.
"""

from __future__ import annotations

import math
import os
import random
import signal
import sys
import threading
import time
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.load import FORCED_OFFLOAD, _final_checks, latency_stats, load_texts, scrape_metrics
from cartosplit.benchmarks.report import bench_command, bench_parser, bounds_table, check, publish
from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.serving.process import ServerProcess, memory_summary, rss_mib

TIERS = ("edge", "cloud")
ACTIONS = ("kill", "freeze", "restart")
PHASES = ("steady", "edge_down", "cloud_down", "edge_frozen", "cloud_frozen", "recovering")
SKIPPED = "SKIPPED"  # the runtime did not call a tier that failed less than retry_after_s ago


@dataclass(frozen=True)
class ChaosPlan:
    clients: int = 32
    seconds: float = 600.0
    seed: int = 0
    min_gap_s: float = 5.0
    max_gap_s: float = 20.0
    kill_pause_s: tuple[float, float] = (0.5, 3.0)
    freeze_s: tuple[float, float] = (1.0, 5.0)
    recover_s: float = 3.0
    device_format: str = "onnx-int8"
    server_format: str = "onnx-fp32"
    timeout_s: float = 2.0
    retry_after_s: float = 5.0  # the runtime's default: a failed tier is skipped this long
    warmup_s: float = 10.0  # RSS baselines: this long into the run (and into each server incarnation)
    rss_bound_mib: float = 50.0
    device_threads: int = 1
    force_offload: bool = False  # every input to the cloud through the edge: each fault is felt at once
    progress_s: float = 30.0
    start_timeout_s: float = 120.0  # one server start, under load
    final_within_s: float = 30.0  # how long the servers get to answer a fresh runtime at the end


# ------------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Fault:
    gap_s: float  # wait after the previous fault is over
    tier: str
    action: str
    hold_s: float  # kill: pause before the restart; freeze: time stopped; restart: 0


def fault_schedule(plan: ChaosPlan) -> Iterator[Fault]:
    """The faults, endless and fixed by ``plan.seed``: the same seed gives the same sequence on any machine."""
    rng = random.Random(plan.seed)
    while True:
        gap = rng.uniform(plan.min_gap_s, plan.max_gap_s)
        tier, action = rng.choice(TIERS), rng.choice(ACTIONS)
        hold = {"kill": rng.uniform(*plan.kill_pause_s), "freeze": rng.uniform(*plan.freeze_s)}.get(action, 0.0)
        yield Fault(round(gap, 3), tier, action, round(hold, 3))


# ---------------------------------------------------------------------------------------------------- tiers


@dataclass
class Incarnation:
    """One server process of a tier: when it lived, how it ended, its RSS samples and its own counters."""

    index: int
    pid: int
    started_at: float  # time.monotonic(): the first ones start before the run's clock does
    ready_at: float
    ended_at: float | None = None
    stopping: bool = False  # a stop began: no more RSS samples (a server shutting down frees its models)
    end: str | None = None  # killed / restarted / end
    exit_code: int | None = None
    rss: list[tuple[float, float]] = field(default_factory=list)
    metrics: dict | None = None  # scraped before a planned stop; None when killed (its counters died with it)
    error_events: int = 0
    error_samples: list[str] = field(default_factory=list)


class ChaosTier:
    """One tier's server, which can be killed, frozen and restarted on the same port; its incarnations."""

    def __init__(self, name: str, args: Sequence[str], start_timeout_s: float) -> None:
        self.name, self.args, self.start_timeout_s = name, list(args), start_timeout_s
        self.port = 0  # 0 until the first start: any free port, kept from then on
        self.address: str | None = None
        self.server: ServerProcess | None = None
        self.incarnations: list[Incarnation] = []
        self.lock = threading.Lock()  # the RSS sampler reads server and incarnations while faults change them
        self._closed = False

    @property
    def current(self) -> Incarnation | None:
        last = self.incarnations[-1] if self.incarnations else None
        return last if last is not None and last.ended_at is None else None

    def start(self, attempts: int = 5) -> int:
        """Start the server on its port (retried: a just-killed port can be slow to free); the attempts it took."""
        for attempt in range(1, attempts + 1):
            started = time.monotonic()
            try:
                server = ServerProcess([*self.args, "--port", str(self.port)], self.name, self.start_timeout_s)
            except RuntimeError:
                if attempt == attempts:
                    raise
                time.sleep(1.0)
                continue
            with self.lock:
                if self._closed:  # closed while it was starting (Ctrl-C): it must not outlive the benchmark
                    server.stop()
                    raise RuntimeError(f"{self.name}: closed while starting")
                self.server, self.address = server, server.address
                self.port = int(server.address.rsplit(":", 1)[1])
                self.incarnations.append(Incarnation(len(self.incarnations), server.pid, started, time.monotonic()))
            return attempt
        raise AssertionError("unreachable")

    def kill(self) -> None:
        self._stopping()
        self.server.process.kill()
        self.server.process.wait()
        self._ended("killed")

    def freeze(self) -> None:
        os.kill(self.server.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.server is not None and self.server.alive():
            os.kill(self.server.pid, signal.SIGCONT)

    def stop(self, reason: str) -> None:
        """A planned stop: its counters scraped first, then SIGTERM (SIGCONT before: a stopped process ignores it)."""
        if self.server is None or self.current is None:
            return
        self._stopping()
        self.thaw()
        metrics = scrape_metrics(self.server.metrics_port) if self.server.alive() else None
        self.server.stop()
        self._ended(reason, metrics)

    def close(self) -> None:
        """Never leave a process behind, stopped or running: also after an exception or Ctrl-C."""
        with self.lock:
            self._closed = True
        self.stop("end")

    def _stopping(self) -> None:
        with self.lock:
            if self.current is not None:
                self.current.stopping = True

    def _ended(self, reason: str, metrics: dict | None = None) -> None:
        with self.lock:
            incarnation = self.current
            if incarnation is None:
                return
            incarnation.ended_at, incarnation.end = time.monotonic(), reason
            incarnation.exit_code, incarnation.metrics = self.server.process.returncode, metrics
            incarnation.error_events = self.server.error_count
            incarnation.error_samples = self.server.error_lines[:3]


# ---------------------------------------------------------------------------------------------------- chaos


@dataclass
class Disruption:
    tier: str
    kind: str  # down / frozen
    start_s: float
    end_s: float | None = None  # None: the tier never came back


class ChaosLoop(threading.Thread):
    """Applies :func:`fault_schedule` to the tiers until stopped; one event per fault, one disruption each."""

    def __init__(
        self, tiers: dict[str, ChaosTier], plan: ChaosPlan, clock: Callable[[], float], log: Callable[[str], None]
    ) -> None:
        super().__init__(name="chaos", daemon=True)
        self.tiers, self.plan, self.clock, self.log = tiers, plan, clock, log
        self.events: list[dict] = []
        self.disruptions: list[Disruption] = []
        self.error: str | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        try:
            for fault in fault_schedule(self.plan):
                if self.halt.wait(fault.gap_s):
                    return
                self._apply(fault)
        except Exception as exc:  # recorded, and the run goes on: the clients must still be answered
            self.error = f"{type(exc).__name__}: {str(exc)[:500]}"
            self.log(f"  chaos loop stopped: {self.error}")

    def _apply(self, fault: Fault) -> None:
        tier = self.tiers[fault.tier]
        event = {"t_s": round(self.clock(), 3), **asdict(fault), "pid_before": tier.server.pid, "port": tier.port}
        self.events.append(event)
        disruption = Disruption(fault.tier, "frozen" if fault.action == "freeze" else "down", self.clock())
        self.disruptions.append(disruption)
        if fault.action == "freeze":
            tier.freeze()
            try:
                self.halt.wait(fault.hold_s)  # cut short at the end of the run
            finally:
                tier.thaw()
        else:
            if fault.action == "kill":
                tier.kill()
                self.halt.wait(fault.hold_s)
            else:
                tier.stop("restarted")
            event["exit_code"] = tier.incarnations[-1].exit_code
            event["start_attempts"] = tier.start()
        disruption.end_s = self.clock()
        event |= {"back_s": round(disruption.end_s, 3), "pid_after": tier.server.pid}
        event["out_s"] = round(disruption.end_s - disruption.start_s, 3)
        self.log(f"  {event['t_s']:7.1f} s  {fault.action} {fault.tier}: back after {event['out_s']:.1f} s")


# --------------------------------------------------------------------------------------------------- phases


def phase_segments(disruptions: Sequence[Disruption], recover_s: float) -> list[tuple[float, float, str]]:
    """Non-overlapping (start, end, phase) spans, in order; any time outside them is steady.

    A disruption lasts until its tier is back (forever if it never is); recovering follows it for
    ``recover_s`` seconds, cut short by the next disruption."""
    segments: list[tuple[float, float, str]] = []
    ordered = sorted(disruptions, key=lambda d: d.start_s)
    for i, d in enumerate(ordered):
        end = math.inf if d.end_s is None else d.end_s
        segments.append((d.start_s, end, f"{d.tier}_{d.kind}"))
        following = ordered[i + 1].start_s if i + 1 < len(ordered) else math.inf
        if end < following:
            segments.append((end, min(end + recover_s, following), "recovering"))
    return segments


def label_phases(times: Sequence[float], segments: list[tuple[float, float, str]]) -> list[str]:
    """The phase of each time (seconds into the run)."""
    starts = [s for s, _, _ in segments]
    labels = []
    for t in times:
        i = bisect_right(starts, t) - 1
        labels.append(segments[i][2] if i >= 0 and t < segments[i][1] else "steady")
    return labels


# -------------------------------------------------------------------------------------------------- clients


def parse_status(entry: str, tier_of: dict[str, str]) -> tuple[str, str]:
    """(tier, gRPC status code) of one ``Prediction.errors`` entry: ``"HOST:PORT: CODE"``, or
    ``"HOST:PORT skipped: ..."`` for a tier the runtime did not call because it failed recently."""
    address, skipped, _ = entry.partition(" skipped: ")
    if skipped:
        return tier_of.get(address, address), SKIPPED
    address, _, code = entry.rpartition(": ")
    return tier_of.get(address, address), code or entry


class ClientRecord:
    """One simulated device's inputs, by sequence number: compact arrays, since the benchmark's own RSS is measured.

    ``answered`` counts the answers an input got: 0 is lost, 2 or more a duplicate."""

    def __init__(self) -> None:
        self.submitted_s = array("d")
        self.latency_ms = array("d")
        self.answered = array("H")
        self.degraded = array("b")
        self.labelled = array("b")
        self.routes: list[str | None] = []
        self.statuses: dict[int, tuple[tuple[str, str], ...]] = {}  # seq -> what the tiers said, where they failed
        self.exceptions: list[tuple[int, str]] = []

    def submit(self, t_s: float) -> int:
        self.submitted_s.append(t_s)
        self.latency_ms.append(math.nan)
        for column in (self.answered, self.degraded, self.labelled):
            column.append(0)
        self.routes.append(None)
        return len(self.routes) - 1

    def answer(self, seq: int, answers: list, latency_ms: float, labels: Sequence[str], tier_of: dict) -> None:
        self.answered[seq] = min(len(answers), 65535)
        self.latency_ms[seq] = latency_ms
        if answers:
            first = answers[0]
            self.routes[seq] = sys.intern(first.route)
            self.degraded[seq] = bool(first.degraded)
            self.labelled[seq] = all(a.label in labels for a in answers)
            if first.errors:
                self.statuses[seq] = tuple(parse_status(e, tier_of) for e in first.errors)

    def nbytes(self) -> int:
        columns = (self.submitted_s, self.latency_ms, self.answered, self.degraded, self.labelled)
        return sum(c.itemsize * len(c) for c in columns) + 8 * len(self.routes)


def run_client(
    runtime: DeviceRuntime,
    record: ClientRecord,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    labels: Sequence[str],
    seed: int,
    clock: Callable[[], float],
    start: threading.Event,
    stop_at: list[float],
    tier_of: dict[str, str],
) -> None:
    """One input at a time, a random sentence each, until the deadline; every one recorded before it is sent."""
    rng = np.random.default_rng(seed)
    start.wait()
    while clock() < stop_at[0]:
        i = int(rng.integers(len(texts)))
        seq = record.submit(clock())
        began = time.perf_counter()
        try:
            answers = runtime.predict([texts[i]], [pairs[i]] if pairs else None)
        except Exception as exc:  # a finding: the runtime is meant to always answer
            record.exceptions.append((seq, f"{type(exc).__name__}: {str(exc)[:300]}"))
            continue
        record.answer(seq, answers, 1000 * (time.perf_counter() - began), labels, tier_of)


# ------------------------------------------------------------------------------------------------------ rss


class RssSampler(threading.Thread):
    """Every ``interval_s``: the RSS of each tier's current incarnation, and of this process (the clients)."""

    def __init__(self, tiers: dict[str, ChaosTier], clock: Callable[[], float], interval_s: float = 1.0) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.tiers, self.clock, self.interval_s = tiers, clock, interval_s
        self.own: list[tuple[float, float]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval_s)

    def sample(self) -> None:
        t = round(self.clock(), 2)
        for tier in self.tiers.values():
            with tier.lock:
                incarnation = tier.current
                serving = incarnation is not None and not incarnation.stopping
                rss = rss_mib(incarnation.pid) if serving else None
                if rss is not None:
                    incarnation.rss.append((t, round(rss, 1)))
        own = rss_mib(os.getpid())
        if own is not None:
            self.own.append((t, round(own, 1)))


def rss_drift(samples: Sequence[tuple[float, float]], warm_from_s: float) -> dict:
    """memory_summary of (t, MiB) samples: the first, the first at or after ``warm_from_s``, the last, the peak."""
    if not samples:
        return memory_summary(None, None, None, None)
    warm = next((v for t, v in samples if t >= warm_from_s), None)
    return memory_summary(samples[0][1], warm, samples[-1][1], max(v for _, v in samples))


# ------------------------------------------------------------------------------------------------------ run


def run_chaos(
    bundle: str | Path,
    clients: int = 32,
    seconds: float = 600.0,
    texts: Sequence[str] | None = None,
    text_pairs: Sequence[str] | None = None,
    data_dir: str | None = None,
    log: Callable[[str], None] = print,
    **options: object,
) -> dict:
    """Start both servers, run the clients and the chaos loop for ``seconds``, stop everything; the report.

    ``options``: the other :class:`ChaosPlan` fields (seed, min_gap_s, max_gap_s, timeout_s, recover_s, ...).
    The report's ``passed`` is the exit-status verdict: nothing lost, nothing duplicated, both servers answering.
    """
    plan = ChaosPlan(clients, seconds, **options)  # type: ignore[arg-type]
    if not 0 < plan.min_gap_s <= plan.max_gap_s:
        raise ValueError(f"gaps: need 0 < min_gap_s <= max_gap_s, got {plan.min_gap_s} and {plan.max_gap_s}")
    load_before = os.getloadavg()
    loaded = load_bundle(bundle)
    if texts is None:
        texts, text_pairs, source = load_texts(loaded, data_dir)
    else:
        source = f"given ({len(texts)} inputs)"
    log(f"inputs: {source}")
    common = ["--bundle", str(bundle), "--format", plan.server_format, "--metrics-port", "0"]
    tiers = {"cloud": ChaosTier("cloud", ["serve-cloud", *common], plan.start_timeout_s)}
    clock = RunClock()
    try:
        tiers["cloud"].start()
        edge_args = ["serve-edge", *common, "--cloud", tiers["cloud"].address]
        edge_args += ["--alpha-edge", "inf"] if plan.force_offload else []
        tiers["edge"] = ChaosTier("edge", edge_args, plan.start_timeout_s)
        tiers["edge"].start()
        run = _run(tiers, loaded, plan, list(texts), list(text_pairs) if text_pairs else None, log, clock)
    finally:
        for name in ("edge", "cloud"):  # the edge first: it forwards to the cloud
            if name in tiers:
                tiers[name].close()
    report = _report(run, tiers, plan, clock.t0)
    return report | {
        "bundle": str(bundle),
        "bundle_id": loaded.bundle_id[:12],
        "model": loaded.manifest.model.id,
        "inputs": source,
        "load_average": {"before": load_before, "end": os.getloadavg()},
    }


class RunClock:
    """Seconds since the run began: :meth:`reset` at the moment the clients are released."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


@dataclass
class _Run:
    records: list[ClientRecord]
    chaos: ChaosLoop
    sampler: RssSampler
    final: dict
    seconds: float
    stuck_clients: int
    tier_of: dict[str, str]


def _run(
    tiers: dict[str, ChaosTier],
    bundle: Bundle,
    plan: ChaosPlan,
    texts: list[str],
    pairs: list[str] | None,
    log: Callable[[str], None],
    clock: RunClock,
) -> _Run:
    addresses = {name: tier.address for name, tier in tiers.items()}
    tier_of = {address: name for name, address in addresses.items()}
    log(
        f"building {plan.clients} device runtimes ({plan.device_format}); edge {addresses['edge']}, "
        f"cloud {addresses['cloud']}"
    )
    runtimes = [
        DeviceRuntime(
            bundle,
            edge=addresses["edge"],
            cloud=addresses["cloud"],
            fmt=plan.device_format,
            threads=plan.device_threads,
            timeout_s=plan.timeout_s,
            retry_after_s=plan.retry_after_s,
        )
        for _ in range(plan.clients)
    ]
    if plan.force_offload:
        for runtime in runtimes:
            runtime.policy = FORCED_OFFLOAD
    records = [ClientRecord() for _ in range(plan.clients)]
    start, stop_at = threading.Event(), [math.inf]
    labels = bundle.manifest.model.labels
    threads = [
        threading.Thread(
            target=run_client,
            args=(runtimes[k], records[k], texts, pairs, labels, plan.seed * 1000 + k, clock, start, stop_at, tier_of),
            name=f"device-{k}",
            daemon=True,
        )
        for k in range(plan.clients)
    ]
    for thread in threads:
        thread.start()
    chaos, sampler = ChaosLoop(tiers, plan, clock, log), RssSampler(tiers, clock)
    log(f"chaos: {plan.clients} clients for {plan.seconds:g} s, a fault every {plan.min_gap_s:g}-{plan.max_gap_s:g} s")
    try:
        clock.reset()
        stop_at[0] = plan.seconds
        sampler.start()
        start.set()
        chaos.start()
        _wait_and_log(threads, records, chaos, plan, clock, log)
    finally:  # Ctrl-C or an error: stop the clients and the faults; the tiers are closed by the caller
        stop_at[0] = -math.inf
        chaos.halt.set()
        chaos.join(plan.start_timeout_s + 15)  # it may be bringing a tier back
    elapsed = clock()
    for thread in threads:  # every call has a deadline: a client still busy after this is stuck
        thread.join(timeout=3 * plan.timeout_s + 10)
    stuck = sum(t.is_alive() for t in threads)
    sampler.sample()
    sampler.halt.set()
    sampler.join()
    final = _final_checks_polled(tiers, bundle, plan, texts[0])
    for runtime in runtimes:
        runtime.close()
    return _Run(records, chaos, sampler, final, elapsed, stuck, tier_of)


def _wait_and_log(
    threads: list[threading.Thread],
    records: list[ClientRecord],
    chaos: ChaosLoop,
    plan: ChaosPlan,
    clock: RunClock,
    log: Callable[[str], None],
) -> None:
    next_log = plan.progress_s
    while any(t.is_alive() for t in threads) and clock() < plan.seconds + 3 * plan.timeout_s + 10:
        time.sleep(0.5)
        if clock() >= next_log:
            answered = sum(len(r.routes) - len(r.exceptions) for r in records)
            degraded = sum(sum(r.degraded) for r in records)
            exceptions = sum(len(r.exceptions) for r in records)
            log(
                f"  {clock():.0f}/{plan.seconds:g} s: {answered:,} answered, {degraded:,} degraded, "
                f"{exceptions} exceptions, {len(chaos.events)} faults"
            )
            next_log += plan.progress_s


def _final_checks_polled(tiers: dict[str, ChaosTier], bundle: Bundle, plan: ChaosPlan, text: str) -> dict:
    """load's final checks from a fresh runtime (its own channels, no reconnect back-off), repeated until both
    servers answer or ``final_within_s`` is over: a tier brought back at the last moment may still be loading."""
    servers = {name: tier.server for name, tier in tiers.items()}
    began = time.monotonic()
    with DeviceRuntime(
        bundle, edge=tiers["edge"].address, cloud=tiers["cloud"].address, fmt=plan.device_format, timeout_s=5.0
    ) as runtime:
        runtime.policy = FORCED_OFFLOAD
        attempts = 0
        while True:
            attempts += 1
            final = _final_checks(servers, runtime, text)
            ok = all(final[n]["alive"] and final[n].get("ok", False) for n in tiers)
            if ok or time.monotonic() - began > plan.final_within_s:
                break
            time.sleep(1.0)
    return final | {"attempts": attempts, "seconds": round(time.monotonic() - began, 2)}


# --------------------------------------------------------------------------------------------------- report


def _columns(records: list[ClientRecord]) -> dict:
    return {
        "t": np.concatenate([np.frombuffer(r.submitted_s, dtype=np.float64) for r in records]),
        "latency": np.concatenate([np.frombuffer(r.latency_ms, dtype=np.float64) for r in records]),
        "answered": np.concatenate([np.frombuffer(r.answered, dtype=np.uint16) for r in records]).astype(int),
        "degraded": np.concatenate([np.frombuffer(r.degraded, dtype=np.int8) for r in records]).astype(bool),
        "labelled": np.concatenate([np.frombuffer(r.labelled, dtype=np.int8) for r in records]).astype(bool),
        "routes": [x for r in records for x in r.routes],
    }


def _statuses(records: list[ClientRecord], phase_of: Callable[[int, int], str]) -> tuple[dict, dict]:
    """Codes the runtime saw, per tier, in all and per phase (OK: the answers a tier gave; see the md)."""
    total: dict[str, Counter] = {tier: Counter() for tier in TIERS}
    by_phase: dict[str, Counter] = {}
    for k, record in enumerate(records):
        for seq, statuses in record.statuses.items():
            for tier, code in statuses:
                total.setdefault(tier, Counter())[code] += 1
                by_phase.setdefault(phase_of(k, seq), Counter())[f"{tier} {code}"] += 1
        for route in record.routes:
            if route in ("edge", "cloud_via_edge"):
                total["edge"]["OK"] += 1
            elif route == "cloud_direct":
                total["cloud"]["OK"] += 1
    return {t: dict(c.most_common()) for t, c in total.items()}, {p: dict(c.most_common()) for p, c in by_phase.items()}


def caught_by_a_fault(t_s: np.ndarray, latency_ms: np.ndarray, fault_starts: Sequence[float]) -> np.ndarray:
    """Inputs in flight when a fault began (submitted before it, answered after): a phase is the one at
    submission, so these carry a fault's cost into the phase before it (a freeze shorter than the runtime's
    timeout shows only here: every client is waiting on the frozen tier, none submits during it)."""
    starts = np.sort(np.asarray(fault_starts, dtype=np.float64))
    following = np.searchsorted(starts, t_s, side="right")  # the first fault after each submission
    next_start = np.append(starts, np.inf)[following]
    return next_start < t_s + np.nan_to_num(latency_ms, nan=np.inf) / 1000.0


def _phase_stats(columns: dict, phases: list[str], fault_starts: Sequence[float]) -> dict:
    phases_arr = np.asarray(phases)
    caught = caught_by_a_fault(columns["t"], columns["latency"], fault_starts)
    out = {}
    for phase in [p for p in PHASES if p in set(phases)]:
        rows = phases_arr == phase
        answered = rows & (columns["answered"] > 0)
        routes = Counter(r for r, keep in zip(columns["routes"], answered, strict=True) if keep)
        n = int(answered.sum())
        out[phase] = {
            "submitted": int(rows.sum()),
            "answers": n,
            "lost": int((rows & (columns["answered"] == 0)).sum()),
            "degraded_share": round(float(columns["degraded"][answered].mean()), 4) if n else None,
            "latency_ms": latency_stats(columns["latency"][answered].tolist()),
            "caught_by_a_fault": int((answered & caught).sum()),
            "latency_ms_not_caught": latency_stats(columns["latency"][answered & ~caught].tolist()),
            "share_by_route": {r: round(c / n, 4) for r, c in sorted(routes.items())},
        }
    return out


def _incarnations(tiers: dict[str, ChaosTier], plan: ChaosPlan, t0: float) -> dict:
    """Each server process, its times in seconds of the run (negative: started before the clients)."""
    out = {}
    for name, tier in tiers.items():
        rows = []
        for inc in tier.incarnations:
            ready_s = inc.ready_at - t0
            memory = rss_drift(inc.rss, max(ready_s, 0.0) + plan.warmup_s)
            rows.append(
                {
                    "index": inc.index,
                    "pid": inc.pid,
                    "started_s": round(inc.started_at - t0, 2),
                    "ready_s": round(ready_s, 2),
                    "start_s": round(inc.ready_at - inc.started_at, 2),
                    "ended_s": None if inc.ended_at is None else round(inc.ended_at - t0, 2),
                    "end": inc.end,
                    "exit_code": inc.exit_code,
                    "memory": memory,
                    "metrics": inc.metrics if inc.metrics is not None else "lost: killed (SIGKILL)",
                    "error_events": inc.error_events,
                    "error_samples": inc.error_samples,
                }
            )
        out[name] = rows
    return out


def _server_requests(incarnations: dict) -> dict:
    """cartosplit_requests_total by code, summed over the incarnations whose counters were scraped."""
    out = {}
    for name, rows in incarnations.items():
        total, scraped = Counter(), 0
        for row in rows:
            if isinstance(row["metrics"], dict) and "requests" in row["metrics"]:
                scraped += 1
                total.update(row["metrics"]["requests"])
        out[name] = {
            "requests_by_code": {k: int(v) for k, v in total.most_common()},
            "incarnations_scraped": scraped,
            "incarnations_killed": sum(row["end"] == "killed" for row in rows),
        }
    return out


def _report(run: _Run, tiers: dict[str, ChaosTier], plan: ChaosPlan, t0: float) -> dict:
    columns = _columns(run.records)
    segments = phase_segments(run.chaos.disruptions, plan.recover_s)
    phases = label_phases(columns["t"].tolist(), segments)
    offsets = np.cumsum([0, *[len(r.routes) for r in run.records]])
    answered = columns["answered"]
    submitted, answers = len(answered), int(answered.sum())
    lost, duplicates = int((answered == 0).sum()), int((answered > 1).sum())
    unlabelled = int(((answered > 0) & ~columns["labelled"]).sum())
    with_answer = answered > 0
    degraded_share = round(float(columns["degraded"][with_answer].mean()), 4) if with_answer.any() else None
    device_codes, codes_by_phase = _statuses(run.records, lambda k, seq: phases[offsets[k] + seq])
    incarnations = _incarnations(tiers, plan, t0)
    own = rss_drift(run.sampler.own, plan.warmup_s)
    events = run.chaos.events
    actions = Counter(e["action"] for e in events)
    failed_restarts = sum(1 for e in events if e["action"] != "freeze" and "back_s" not in e)
    exceptions = [(k, seq, text) for k, r in enumerate(run.records) for seq, text in r.exceptions]
    gates = [
        check("lost inputs (no answer)", lost, "== 0", lost == 0),
        check("duplicates (ids answered more than once)", duplicates, "== 0", duplicates == 0),
    ]
    for name in TIERS:
        value = run.final[name]
        gates.append(check(f"{name} alive and answering at the end", value, "alive, OK", bool(value.get("ok"))))
    growths = {
        name: [
            r["memory"]["growth_after_warmup_mib"] for r in rows if r["memory"]["growth_after_warmup_mib"] is not None
        ]
        for name, rows in incarnations.items()
    }
    others = [
        check("exceptions from the device runtime", len(exceptions), "== 0", not exceptions),
        check("answers without a label", unlabelled, "== 0", unlabelled == 0),
        check("client threads stuck at the end", run.stuck_clients, "== 0", run.stuck_clients == 0),
        check("faults injected", len(events), "> 0", len(events) > 0),
        check("tiers not brought back (chaos loop errors)", failed_restarts, "== 0", failed_restarts == 0),
        check(
            f"benchmark process (clients) RSS end - RSS at {plan.warmup_s:g} s, MiB",
            own["growth_after_warmup_mib"],
            f"< {plan.rss_bound_mib:g}",
            own["growth_after_warmup_mib"] is not None and own["growth_after_warmup_mib"] < plan.rss_bound_mib,
        ),
    ]
    for name, values in growths.items():
        worst = max(values) if values else None
        others.append(
            check(
                f"{name} RSS drift, worst incarnation (end - after {plan.warmup_s:g} s warm-up), MiB",
                worst,
                f"< {plan.rss_bound_mib:g}",
                worst is not None and worst < plan.rss_bound_mib,
            )
        )
    return {
        "answers": answers,
        "lost": lost,
        "duplicates": duplicates,
        "degraded_share": degraded_share,
        "seconds": round(run.seconds, 1),
        "clients": plan.clients,
        "plan": asdict(plan),
        "submitted": submitted,
        "throughput_per_s": round(answers / run.seconds, 1) if run.seconds > 0 else 0.0,
        "exceptions": len(exceptions),
        "exception_samples": [f"client {k} input {seq}: {text}" for k, seq, text in exceptions[:10]],
        "missing_labels": unlabelled,
        "latency_ms": latency_stats(columns["latency"][with_answer].tolist()),
        "phases": _phase_stats(columns, phases, [d.start_s for d in run.chaos.disruptions]),
        "phase_segments": [[round(s, 3), None if math.isinf(e) else round(e, 3), p] for s, e, p in segments],
        "events": events,
        "faults_by_action": {a: actions.get(a, 0) for a in ACTIONS},
        "faults_by_tier_action": dict(Counter(f"{e['tier']} {e['action']}" for e in events)),
        "chaos_error": run.chaos.error,
        "status_codes_device": device_codes,
        "status_codes_device_by_phase": codes_by_phase,
        "server_requests": _server_requests(incarnations),
        "incarnations": incarnations,
        "memory_clients": own | {"client_records_mib": round(sum(r.nbytes() for r in run.records) / 2**20, 1)},
        "rss_clients_timeline": run.sampler.own,
        "final": run.final,
        "stuck_clients": run.stuck_clients,
        "gates": gates,
        "checks": gates + others,
        "passed": all(c["held"] for c in gates),
    }


# ------------------------------------------------------------------------------------------------- markdown


def _show(value: object) -> object:
    if isinstance(value, dict) and "alive" in value:
        return f"alive={value['alive']}, answering={value.get('ok')}"
    return value


def markdown(r: dict) -> list[str]:
    p = r["plan"]
    policy = "forced offload (every input to the cloud via the edge)" if p["force_offload"] else "the bundle's"
    lines = [
        "# Chaos under load on loopback",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Load average (1 min) before the run {r['load_average']['before'][0]:.2f}, at its end "
        f"{r['load_average']['end'][0]:.2f} (this run's own processes included).  ",
        f"Bundle: {r['bundle']} (id {r['bundle_id']}, {r['model']}); devices {p['device_format']}, servers "
        f"{p['server_format']}; runtime timeout {p['timeout_s']} s, a failed tier skipped for "
        f"{p['retry_after_s']} s; policy: {policy}; inputs: {r['inputs']}.  ",
        f"Chaos: seed {p['seed']}, a fault every {p['min_gap_s']:g}-{p['max_gap_s']:g} s after the previous one "
        f"ended; kill pause {p['kill_pause_s'][0]:g}-{p['kill_pause_s'][1]:g} s, freeze "
        f"{p['freeze_s'][0]:g}-{p['freeze_s'][1]:g} s; recovering = the first {p['recover_s']:g} s after a tier "
        "came back.",
        "",
        f"**{r['clients']} clients for {r['seconds']} s: {r['submitted']:,} inputs, {r['answers']:,} answers "
        f"({r['throughput_per_s']}/s), lost {r['lost']}, duplicates {r['duplicates']}, degraded share "
        f"{_pct(r['degraded_share'])}; {len(r['events'])} faults** "
        f"({', '.join(f'{k} {v}' for k, v in r['faults_by_action'].items())}). "
        f"Result: **{'PASSED' if r['passed'] else 'FAILED'}** (exit status: lost, duplicates, servers answering; "
        "the other bounds are reported).",
        "",
        *bounds_table(r["checks"], _show),
        "",
        "## By phase (at each input's submission; latency in ms, submit to answer, on the client's clock)",
        "",
        "| phase | inputs | answers | lost | degraded | p50 | p99 | max | caught by a fault | p99 of the others "
        "| routes |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, s in r["phases"].items():
        lat, rest = s["latency_ms"], s["latency_ms_not_caught"]
        routes = ", ".join(f"{k} {v:.0%}" for k, v in s["share_by_route"].items())
        lines.append(
            f"| {phase} | {s['submitted']:,} | {s['answers']:,} | {s['lost']} | {_pct(s['degraded_share'])} "
            f"| {lat.get('p50', '')} | {lat.get('p99', '')} | {lat.get('max', '')} | {s['caught_by_a_fault']:,} "
            f"| {rest.get('p99', '')} | {routes} |"
        )
    lines += [
        "",
        "Caught by a fault: submitted before a fault began, answered after it (in flight when it struck); their "
        "latency counts in the phase they were submitted in. A freeze shorter than the runtime timeout mostly "
        "shows there: every client waits on the frozen tier, so few inputs are submitted during it.",
    ]
    lines += _status_lines(r) + _memory_lines(r) + _event_lines(r)
    if r["exception_samples"] or r["chaos_error"]:
        lines += ["", "## Findings", ""]
        lines += [f"- exception: `{s}`" for s in r["exception_samples"]]
        lines += [f"- chaos loop: `{r['chaos_error']}`"] if r["chaos_error"] else []
    return lines


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _status_lines(r: dict) -> list[str]:
    lines = [
        "",
        "## Status codes",
        "",
        "What the device runtimes saw, per tier (from `Prediction.errors`; OK = answers that came from that "
        "tier's call; SKIPPED = not called, the tier failed less than the skip time ago; an UNAVAILABLE the "
        "runtime retried once and then got answered does not show):",
        "",
    ]
    lines += [f"- {tier}: {codes}" for tier, codes in r["status_codes_device"].items()]
    lines += ["", "By phase:", ""]
    lines += [f"- {phase}: {codes}" for phase, codes in r["status_codes_device_by_phase"].items()]
    lines += [
        "",
        "The servers' own `cartosplit_requests_total` by code, summed over the incarnations scraped before a "
        "planned stop (restart, end). **A killed incarnation's counters are lost with it** (SIGKILL: nothing "
        "can be scraped), so these sums undercount:",
        "",
    ]
    for tier, s in r["server_requests"].items():
        lines.append(
            f"- {tier}: {s['requests_by_code']} ({s['incarnations_scraped']} incarnations scraped, "
            f"{s['incarnations_killed']} killed)"
        )
    lines += [
        "",
        "No message in this run comes near the servers' size limit, so a server's RESOURCE_EXHAUSTED here is "
        "what `serving/metrics.py` (RefusalCounter) says it also counts that way: a call that ended before its "
        "message arrived, i.e. a caller that gave up or died mid-call (the edge killed or restarted while "
        "forwarding), not an oversize request.",
    ]
    return lines


def _memory_lines(r: dict) -> list[str]:
    m = r["memory_clients"]
    lines = [
        "",
        "## Memory (RSS, MiB, sampled each second)",
        "",
        f"Benchmark process (all {r['clients']} device runtimes live in it): start {m['start_mib']}, at "
        f"{r['plan']['warmup_s']:g} s {m['after_warmup_mib']}, end {m['end_mib']}, peak {m['peak_mib']}: drift "
        f"**{m['growth_after_warmup_mib']}** (of which the run's own records of every input: "
        f"{m['client_records_mib']} MiB).",
        "",
        "Servers, per incarnation (after warm-up = the first sample "
        f"{r['plan']['warmup_s']:g} s after it was ready or the run started):",
        "",
        "| tier | # | ready at s | start took s | ended at s | how | after warm-up | end | peak | drift |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tier, rows in r["incarnations"].items():
        for x in rows:
            mem = x["memory"]
            lines.append(
                f"| {tier} | {x['index']} | {x['ready_s']} | {x['start_s']} | {x['ended_s']} | {x['end']} "
                f"| {mem['after_warmup_mib']} | {mem['end_mib']} | {mem['peak_mib']} "
                f"| {mem['growth_after_warmup_mib']} |"
            )
    return lines


def _event_lines(r: dict) -> list[str]:
    lines = [
        "",
        "## Faults",
        "",
        "| t s | tier | action | hold s | out s | pid before -> after |",
        "|---|---|---|---|---|---|",
    ]
    for e in r["events"]:
        lines.append(
            f"| {e['t_s']} | {e['tier']} | {e['action']} | {e['hold_s']} | {e.get('out_s', 'never back')} "
            f"| {e['pid_before']} -> {e.get('pid_after', '-')} |"
        )
    return lines


# ----------------------------------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (a CI timeout) unwinds like Ctrl-C: the finally blocks leave no server running, or stopped."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("chaos", __doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0, help="the chaos loop's and the clients' RNG")
    parser.add_argument("--min-gap", type=float, default=5.0, help="least seconds between two faults")
    parser.add_argument("--max-gap", type=float, default=20.0, help="most seconds between two faults")
    parser.add_argument("--device-format", default="onnx-int8", choices=("onnx-int8", "onnx-fp32"))
    parser.add_argument("--server-format", default="onnx-fp32", choices=("onnx-int8", "onnx-fp32"))
    parser.add_argument("--timeout", type=float, default=2.0, help="the device runtime's timeout per tier call, s")
    parser.add_argument("--retry-after", type=float, default=5.0, help="seconds the runtime skips a failed tier")
    parser.add_argument("--recover-s", type=float, default=3.0, help="'recovering': this long after a tier is back")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="RSS baselines this long into the run")
    parser.add_argument("--rss-bound-mib", type=float, default=50.0)
    parser.add_argument("--force-offload", action="store_true", help="every input to the cloud via the edge")
    parser.add_argument("--data-dir", help="GLUE folder (default: the usual resolution)")
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be >= 1 and --seconds > 0")
    if not 0 < args.min_gap <= args.max_gap:
        parser.error(f"need 0 < --min-gap <= --max-gap, got {args.min_gap} and {args.max_gap}")
    signal.signal(signal.SIGTERM, _interrupt)
    report = run_chaos(
        args.bundle,
        args.clients,
        args.seconds,
        data_dir=args.data_dir,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        seed=args.seed,
        min_gap_s=args.min_gap,
        max_gap_s=args.max_gap,
        device_format=args.device_format,
        server_format=args.server_format,
        timeout_s=args.timeout,
        retry_after_s=args.retry_after,
        recover_s=args.recover_s,
        warmup_s=args.warmup_s,
        rss_bound_mib=args.rss_bound_mib,
        force_offload=args.force_offload,
    )
    publish(report, args.out, bench_command("chaos", argv), markdown)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
