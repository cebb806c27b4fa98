"""Bounded load test on loopback: many simulated devices against one edge and one cloud server.

    cartosplit bench load --bundle bundles/sst2-4k --clients 32 --seconds 60 \
        --out benchmarks/results/load
    cartosplit bench load --bundle bundles/sst2-4k --clients 32 --seconds 60 --force-offload \
        --out benchmarks/results/load-offload

Starts a cloud and an edge server as subprocesses (the real CLI), then runs ``--clients`` threads, each
with its own DeviceRuntime (its own device graphs and gRPC channels), sending one sentence at a time for
``--seconds`` (and at most ``--max-answers`` in all): GLUE dev sentences of the bundle's task when the
data is available, else a built-in list. The policy is the bundle's calibrated one; ``--force-offload``
sends every input up to the cloud through the edge (device and edge never answer), the servers' worst case.

Everything runs on this one machine: the client threads share the cores with both servers, so
throughput and latency are those of the whole system on loopback, not of a server alone.

Bounds (exit status 1 if one fails): no exception from the runtime; every answer carries a label;
both servers alive at the end and answering; each server's RSS at the end minus its RSS after the
warm-up below ``--rss-bound-mib``. Degraded answers (a tier timed out and an earlier exit answered)
are counted and reported, not bounded: the fallback is the designed behaviour under overload.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.report import bench_command, bench_parser, bounds_table, check, publish
from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.device_runtime.policy import Policy
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.serving.process import RssMonitor, ServerProcess, memory_summary, start_servers, stop_servers

# SST-2-like sentences for when the GLUE files are not around (a CI machine, a fresh checkout).
BUILTIN_SENTENCES = (
    "it 's a charming and often affecting journey .",
    "unflinchingly bleak and desperate",
    "the acting , costumes , music , cinematography and sound are all astounding given the production 's "
    "austere locales .",
    "it 's slow -- very , very slow .",
    "a sometimes tedious film .",
    "the movie is a disaster from start to finish , with a plot that makes no sense at all .",
    "one of the most exciting and original films of the year .",
    "a gorgeous , witty , seductive movie .",
    "the story is predictable and the jokes fall flat .",
    "an utterly charming and hilarious film that reminded me of the best of the genre .",
    "it never fails to engage us .",
    "the performances are uniformly excellent , but the script lets them down .",
    "a dull , simple-minded and stereotypical tale of drugs , death and mind-numbing indifference .",
    "the film is strictly routine .",
    "it 's a funny little movie with clever dialogue and likeable characters .",
    "too long , too cloying , and too predictable .",
    "a masterpiece four years in the making .",
    "nothing about this movie works .",
    "the director treats the material with respect and wit , and the result is quietly moving .",
    "what could have been a neat little story is buried under layers of noise .",
    "good",
    "not bad at all , if you like this sort of thing",
    "an overstuffed , overlong mess .",
    "beautifully shot , wonderfully acted , and emotionally devastating .",
)


# ---------------------------------------------------------------------------------------------------- inputs


def load_texts(bundle: Bundle, data_dir: str | None = None) -> tuple[list[str], list[str] | None, str]:
    """The dev sentences of the bundle's GLUE task, or the built-in list; and where they came from."""
    from cartosplit.export.data import load_glue

    task = bundle.manifest.model.task  # None (a data-file model): load_glue refuses, built-in sentences
    try:
        data = load_glue(task, "dev", data_dir)
    except Exception as exc:  # no local GLUE copy and no way to download one: not a reason to stop
        return list(BUILTIN_SENTENCES), None, f"built-in sentences ({type(exc).__name__}: {str(exc)[:120]})"
    return data.texts, data.text_pairs, f"GLUE {task} dev ({len(data.texts)} inputs)"


# --------------------------------------------------------------------------------------------------- clients


@dataclass
class ClientLog:
    """What one simulated device saw: one row per answer, and the exceptions it got instead of answers."""

    routes: list[str] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)
    degraded: int = 0
    fallbacks: int = 0  # answers where a tier failed on the way (the runtime moved on; see Prediction.errors)
    missing_labels: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    fallback_samples: list[str] = field(default_factory=list)


def run_client(
    runtime: DeviceRuntime,
    texts: Sequence[str],
    pairs: Sequence[str] | None,
    labels: Sequence[str],
    seed: int,
    start: threading.Event,
    stop_at: list[float],
    cap: int,
) -> ClientLog:
    """Send one input at a time, a random sentence each, until the deadline or ``cap`` answers."""
    log = ClientLog()
    rng = np.random.default_rng(seed)
    start.wait()
    while time.monotonic() < stop_at[0] and len(log.routes) + log.errors < cap:
        i = int(rng.integers(len(texts)))
        try:
            (answer,) = runtime.predict([texts[i]], [pairs[i]] if pairs else None)
        except Exception as exc:  # counted, never fatal: the test is about what the system does under load
            log.errors += 1
            if len(log.error_samples) < 5:
                log.error_samples.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            continue
        log.routes.append(answer.route)
        log.tiers.append(answer.tier)
        log.latency_ms.append(answer.latency_ms)
        log.degraded += bool(answer.degraded)
        log.missing_labels += answer.label not in labels
        if answer.errors:
            log.fallbacks += 1
            if len(log.fallback_samples) < 5:
                log.fallback_samples.append("; ".join(answer.errors)[:300])
    return log


FORCED_OFFLOAD = Policy(alpha_device=math.inf, alpha_edge=math.inf)  # no router, no device exit: all to the edge


def make_runtimes(
    bundle: Bundle, count: int, addresses: dict[str, str], fmt: str, threads: int, timeout_s: float, force: bool
) -> list[DeviceRuntime]:
    runtimes = []
    for _ in range(count):
        runtime = DeviceRuntime(
            bundle, edge=addresses["edge"], cloud=addresses["cloud"], fmt=fmt, threads=threads, timeout_s=timeout_s
        )
        if force:
            runtime.policy = FORCED_OFFLOAD
        runtimes.append(runtime)
    return runtimes


# --------------------------------------------------------------------------------------------------- metrics


def scrape_metrics(port: int | None) -> dict:
    """The servers' own Prometheus counters: requests by code, mean batch size per graph, forwards."""
    if port is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
            text = page.read().decode()
    except OSError as exc:
        return {"error": str(exc)}
    requests: dict[str, float] = {}
    batch: dict[str, dict[str, float]] = {}
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        fields = dict(part.split("=", 1) for part in labels.rstrip("}").split(",") if "=" in part)
        fields = {k: v.strip('"') for k, v in fields.items()}
        if name == "cartosplit_requests_total":
            requests[fields["code"]] = float(value)
        elif name in ("cartosplit_batch_size_sum", "cartosplit_batch_size_count"):
            batch.setdefault(fields["graph"], {})[name.rsplit("_", 1)[1]] = float(value)
        elif name in ("cartosplit_forwarded_total", "cartosplit_degraded_total"):
            counters[name.removeprefix("cartosplit_").removesuffix("_total")] = float(value)
    mean_batch = {g: round(v["sum"] / v["count"], 2) for g, v in batch.items() if v.get("count")}
    return {"requests": requests, "mean_batch_size": mean_batch, **counters}


# ------------------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class LoadPlan:
    clients: int
    seconds: float
    force_offload: bool = False
    device_format: str = "onnx-int8"
    server_format: str = "onnx-fp32"
    timeout_s: float = 2.0
    warmup_s: float = 10.0
    max_answers: int = 1_000_000
    device_threads: int = 1
    rss_bound_mib: float = 50.0
    seed: int = 0


def run_load(
    bundle: str | Path,
    clients: int = 32,
    seconds: float = 60.0,
    force_offload: bool = False,
    texts: Sequence[str] | None = None,
    text_pairs: Sequence[str] | None = None,
    data_dir: str | None = None,
    log: Callable[[str], None] = print,
    **options: object,
) -> dict:
    """Start both servers, run the clients for ``seconds``, stop everything; the report, with ``passed``.

    ``options``: the other :class:`LoadPlan` fields (device_format, server_format, timeout_s, warmup_s, ...).
    """
    plan = LoadPlan(clients, seconds, force_offload, **options)  # type: ignore[arg-type]
    load_before = os.getloadavg()  # other jobs on the machine show here: the figures are shared-CPU ones
    loaded = load_bundle(bundle)  # verified once, shared by every runtime
    if texts is None:
        texts, text_pairs, source = load_texts(loaded, data_dir)
    else:
        source = f"given ({len(texts)} inputs)"
    log(f"inputs: {source}")
    edge_args = ["--alpha-edge", "inf"] if force_offload else []
    servers = start_servers(bundle, plan.server_format, args=["--metrics-port", "0"], edge_args=edge_args)
    try:
        report = _load(servers, loaded, plan, list(texts), list(text_pairs) if text_pairs else None, log)
    finally:
        stop_servers(servers)
    return report | {
        "bundle": str(bundle),
        "bundle_id": loaded.bundle_id[:12],
        "model": loaded.manifest.model.id,
        "policy": "forced offload (every input to the cloud via the edge)" if force_offload else "bundle's calibrated",
        "inputs": source,
        "load_average": {"before": load_before, "end": os.getloadavg()},
    }


def _load(
    servers: dict[str, ServerProcess],
    bundle: Bundle,
    plan: LoadPlan,
    texts: list[str],
    pairs: list[str] | None,
    log: Callable[[str], None],
) -> dict:
    addresses = {name: s.address for name, s in servers.items()}
    log(f"building {plan.clients} device runtimes ({plan.device_format}, {plan.device_threads} thread(s) each)")
    runtimes = make_runtimes(
        bundle, plan.clients, addresses, plan.device_format, plan.device_threads, plan.timeout_s, plan.force_offload
    )
    labels = bundle.manifest.model.labels
    cap = max(1, math.ceil(plan.max_answers / plan.clients))
    start, stop_at, results = threading.Event(), [math.inf], [None] * plan.clients

    def work(k: int) -> None:
        results[k] = run_client(runtimes[k], texts, pairs, labels, plan.seed * 1000 + k, start, stop_at, cap)

    threads = [threading.Thread(target=work, args=(k,), name=f"device-{k}", daemon=True) for k in range(plan.clients)]
    for thread in threads:
        thread.start()
    pids = {name: s.pid for name, s in servers.items()} | {"clients": os.getpid()}
    log(f"load: {plan.clients} clients for {plan.seconds:g} s ({'forced offload' if plan.force_offload else 'policy'})")
    with RssMonitor(pids, interval_s=1.0) as monitor:
        began = time.monotonic()
        stop_at[0] = began + plan.seconds
        start.set()
        _wait_and_log(threads, began, plan.seconds, monitor, log)
        elapsed = time.monotonic() - began
    final = _final_checks(servers, runtimes[0], texts[0])
    for runtime in runtimes:
        runtime.close()
    metrics = {name: scrape_metrics(s.metrics_port) for name, s in servers.items()}
    time.sleep(0.3)  # the servers' last log lines
    return _report(results, servers, monitor, final, metrics, elapsed, plan)


def _wait_and_log(
    threads: list[threading.Thread], began: float, seconds: float, monitor: RssMonitor, log: Callable[[str], None]
) -> None:
    next_log = began + 10.0
    while any(t.is_alive() for t in threads):
        for thread in threads:
            thread.join(timeout=0.5)
            if time.monotonic() >= next_log:
                last = monitor.timeline[-1] if monitor.timeline else {}
                rss = ", ".join(f"{k} {v:.0f}" for k, v in last.items() if k != "t_s" and v is not None)
                log(f"  {time.monotonic() - began:.0f}/{seconds:g} s, RSS MiB: {rss}")
                next_log += 10.0


def _final_checks(servers: dict[str, ServerProcess], runtime: DeviceRuntime, text: str) -> dict:
    """Both servers alive, the edge answering a device request, the cloud a direct one (all-cloud mode)."""
    final = {name: {"alive": s.alive()} for name, s in servers.items()}
    saved = runtime.policy
    runtime.policy = FORCED_OFFLOAD  # to the edge, whatever the sentence
    for tier in (runtime.edge, runtime.cloud):
        tier.down_until = 0.0  # forget failures seen under load: this is a fresh question
    try:
        (answer,) = runtime.predict([text])
        final["edge"]["answer"] = {"route": answer.route, "degraded": answer.degraded, "errors": answer.errors}
        final["edge"]["ok"] = answer.route in ("edge", "cloud_via_edge") and not answer.degraded
    except Exception as exc:
        final["edge"].update(ok=False, answer=f"{type(exc).__name__}: {exc}")
    finally:
        runtime.policy = saved
    try:
        (answer,) = runtime.predict_all_cloud([text])
        final["cloud"].update(ok=True, answer={"route": answer.route, "label": answer.label})
    except Exception as exc:
        final["cloud"].update(ok=False, answer=f"{type(exc).__name__}: {exc}")
    return final


def latency_stats(values: Sequence[float]) -> dict:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    stats = {"count": len(array), "mean": float(array.mean()), "max": float(array.max())}
    stats |= {f"p{q}": float(np.percentile(array, q)) for q in (50, 95, 99)}
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in stats.items()}


def _rss_at(timeline: list[dict], name: str, t_s: float) -> float | None:
    return next((s[name] for s in timeline if s["t_s"] >= t_s and s.get(name) is not None), None)


def _report(
    results: list[ClientLog | None],
    servers: dict[str, ServerProcess],
    monitor: RssMonitor,
    final: dict,
    metrics: dict,
    elapsed: float,
    plan: LoadPlan,
) -> dict:
    logs = [r for r in results if r is not None]
    routes = [x for r in logs for x in r.routes]
    tiers = [x for r in logs for x in r.tiers]
    latency = [x for r in logs for x in r.latency_ms]
    answers, errors = len(routes), sum(r.errors for r in logs)
    missing = sum(r.missing_labels for r in logs)
    by_route = {
        route: latency_stats([v for v, r in zip(latency, routes, strict=True) if r == route])
        for route in sorted(set(routes))
    }
    timeline = monitor.timeline
    memory = {
        name: memory_summary(
            timeline[0][name] if timeline else None,
            _rss_at(timeline, name, plan.warmup_s),
            timeline[-1][name] if timeline else None,
            monitor.peak.get(name),
        )
        for name in (*servers, "clients")
    }
    checks = [
        check("exceptions from the device runtime", errors, "== 0", errors == 0),
        check("answers without a label", missing, "== 0", missing == 0),
        check("answers", answers, "> 0", answers > 0),
    ]
    for name in servers:
        checks.append(
            check(
                f"{name} alive and answering at the end",
                final[name],
                "alive, OK",
                final[name]["alive"] and final[name].get("ok", False),
            )
        )
        growth = memory[name]["growth_after_warmup_mib"]
        checks.append(
            check(
                f"{name} RSS end - RSS at {plan.warmup_s:g} s, MiB",
                growth,
                f"< {plan.rss_bound_mib:g}",
                growth is not None and growth < plan.rss_bound_mib,
            )
        )
    return {
        "plan": plan.__dict__,
        "seconds": round(elapsed, 1),
        "answers": answers,
        "errors": errors,
        "error_samples": [s for r in logs for s in r.error_samples][:10],
        "missing_labels": missing,
        "degraded": sum(r.degraded for r in logs),
        "fallbacks": sum(r.fallbacks for r in logs),
        "fallback_samples": [s for r in logs for s in r.fallback_samples][:10],
        "throughput_per_s": round(answers / elapsed, 1) if elapsed else 0.0,
        "per_client_answers": {
            "min": min((len(r.routes) for r in logs), default=0),
            "max": max((len(r.routes) for r in logs), default=0),
        },
        "latency_ms": {"overall": latency_stats(latency), **by_route},
        "share_by_tier": _shares(tiers),
        "share_by_route": _shares(routes),
        "memory": memory,
        "rss_timeline": timeline,
        "server_metrics": metrics,
        "server_error_events": {n: s.error_lines for n, s in servers.items()},
        "final": final,
        "checks": checks,
        "passed": all(c["held"] for c in checks),
    }


def _shares(values: list[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: round(v / len(values), 4) for k, v in sorted(counts.items())} if values else {}


def _show_liveness(value: object) -> object:
    if isinstance(value, dict) and "alive" in value:
        return f"alive={value['alive']}, answering={value.get('ok')}"
    return value


# ---------------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> list[str]:
    p = r["plan"]
    lines = [
        "# Load test on loopback",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Load average (1 min) before the run {r['load_average']['before'][0]:.2f}, at its end "
        f"{r['load_average']['end'][0]:.2f} (this run's own processes included).  ",
        f"Bundle: {r['bundle']} (id {r['bundle_id']}, {r['model']}); devices {p['device_format']} "
        f"({p['device_threads']} thread each), servers {p['server_format']}; policy: {r['policy']}; "
        f"runtime timeout {p['timeout_s']} s; inputs: {r['inputs']}.",
        "",
        f"**{p['clients']} clients for {r['seconds']} s: {r['answers']:,} answers, "
        f"{r['throughput_per_s']} answers/s**, "
        f"{r['errors']} errors, {r['degraded']} degraded, {r['fallbacks']} with a tier failure on the way. "
        f"Result: **{'PASSED' if r['passed'] else 'FAILED'}**.",
        "",
        *bounds_table(r["checks"], _show_liveness),
    ]
    lines += [
        "",
        "## Latency (ms, per input, as the device sees it)",
        "",
        "| route | answers | p50 | p95 | p99 | mean | max |",
    ]
    lines.append("|---|---|---|---|---|---|---|")
    for route, s in r["latency_ms"].items():
        if s["count"]:
            lines.append(
                f"| {route} | {s['count']:,} | {s['p50']} | {s['p95']} | {s['p99']} | {s['mean']} | {s['max']} |"
            )
    shares = ", ".join(f"{k} {v:.1%}" for k, v in r["share_by_tier"].items())
    routes = ", ".join(f"{k} {v:.1%}" for k, v in r["share_by_route"].items())
    lines += ["", f"Share by tier: {shares}. By route: {routes}.", "", "## Memory (RSS, MiB; sampled each second)", ""]
    lines += ["| process | start | after warm-up | end | peak | end - after warm-up |", "|---|---|---|---|---|---|"]
    for name, m in r["memory"].items():
        lines.append(
            f"| {name} | {m['start_mib']} | {m['after_warmup_mib']} | {m['end_mib']} | {m['peak_mib']} "
            f"| {m['growth_after_warmup_mib']} |"
        )
    lines += ["", "## Server-side counters (Prometheus)", ""]
    for name, m in r["server_metrics"].items():
        lines.append(
            f"- {name}: requests {m.get('requests')}, mean batch size {m.get('mean_batch_size')}"
            + (f", forwarded {m['forwarded']:.0f}, degraded {m.get('degraded', 0):.0f}" if "forwarded" in m else "")
        )
    if r["error_samples"] or r["fallback_samples"]:
        lines += ["", "## Samples", ""]
        lines += [f"- error: `{s}`" for s in r["error_samples"]]
        lines += [f"- tier failure: `{s}`" for s in r["fallback_samples"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("load", __doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--force-offload", action="store_true", help="every input to the cloud via the edge")
    parser.add_argument("--device-format", default="onnx-int8", choices=("onnx-int8", "onnx-fp32"))
    parser.add_argument("--server-format", default="onnx-fp32", choices=("onnx-int8", "onnx-fp32"))
    parser.add_argument("--timeout-s", type=float, default=2.0, help="the device runtime's timeout per tier call")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="RSS baseline taken this long into the load")
    parser.add_argument("--max-answers", type=int, default=1_000_000, help="stop after this many answers in all")
    parser.add_argument("--device-threads", type=int, default=1, help="onnxruntime threads per device runtime")
    parser.add_argument("--rss-bound-mib", type=float, default=50.0)
    parser.add_argument("--data-dir", help="GLUE folder (default: the usual resolution)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0 or args.max_answers < 1:
        parser.error("--clients and --max-answers must be >= 1 and --seconds > 0")
    report = run_load(
        args.bundle,
        args.clients,
        args.seconds,
        args.force_offload,
        data_dir=args.data_dir,
        device_format=args.device_format,
        server_format=args.server_format,
        timeout_s=args.timeout_s,
        warmup_s=args.warmup_s,
        max_answers=args.max_answers,
        device_threads=args.device_threads,
        rss_bound_mib=args.rss_bound_mib,
        seed=args.seed,
    )
    publish(report, args.out, bench_command("load", argv), markdown)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
