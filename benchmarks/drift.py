"""Does the promise survive drift? Audit sampling, the live bound and threshold adaptation on a shifted stream.

    cartosplit bench drift --run runs/demo-sst2 --out benchmarks/results/drift

The stream (``--before`` + ``--after`` inputs) comes from the task's training file, outside the run's
training and calibration splits, texts of at least ``--min-words`` words, each used once:
- before the shift: the texts as they are;
- after the shift (input ``--before``): other texts of the same pool with typos, the corruption a phone
  keyboard makes: each word of 3+ letters is hit with probability ``--typo-rate`` by one of an adjacent
  swap, a dropped letter, a doubled letter or a neighbouring key. Labels stay right (a typo does not flip
  sentiment), so the accuracy drop against all-cloud is measured with labels; the kit itself sees none.
  Why typos: the default model is uncased, so casing changes nothing; truncation changes length more than
  meaning; typos split words into rarer word pieces, which the early exits read worst.

Thresholds are calibrated before the shift on ``--calib`` other clean texts of the pool, label-free
(Learn-then-Test, disagreement with the final exit <= epsilon at delta, ``export.risk_control``): the
policy a user would ship after calibrating on in-domain traffic.

Two parts:
1. **Replay** (the statistics): every input's router and exit probabilities are computed once with the
   bundle's int8 graphs (static int8: batch-independent, so each is what the runtime would see), then the
   stream is replayed through ``device_runtime.audit.AuditMonitor``, the object the runtime uses, per audit
   rate and ``--repeats`` seeds (the audit draws are random). The replay records audits at once; live,
   a reply lands a round trip later, which delays detection by a few inputs.
2. **Latency** (the overhead): ``DeviceRuntime`` with live edge and cloud servers on loopback answers
   ``--latency-inputs`` clean inputs per audit rate, rates interleaved over ``--latency-rounds`` rounds;
   p99 with audits over p99 without.

Costs are the bundle's cost profile; an audit of a device or edge answer costs the edge and cloud part of
the cloud-via-edge route, a cloud answer's audit costs nothing (it is the reference).
Heavy (about 25k inputs through the model): the signals are cached in ``--cache`` (resumable).
"""

from __future__ import annotations

import json
import math
import random
import re
import sys
import time
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.machine import describe_machine
from cartosplit.benchmarks.report import bench_command, bench_parser, publish, pyplot
from cartosplit.device_runtime.audit import ALL, AuditMonitor, AuditSettings
from cartosplit.device_runtime.audit_state import AuditLog
from cartosplit.device_runtime.policy import ExitSignals, Policy, answers, route

KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _neighbours() -> dict[str, str]:
    rows, out = KEYBOARD, {}
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            near = [row[i] for i in (c - 1, c + 1) if 0 <= i < len(row)]
            near += [rows[rr][c] for rr in (r - 1, r + 1) if 0 <= rr < len(rows) and c < len(rows[rr])]
            out[ch] = "".join(near)
    return out


NEIGHBOURS = _neighbours()


def typo(word: str, rng: random.Random) -> str:
    """One keyboard typo in ``word``: swap two adjacent letters, drop one, double one, or hit a neighbour key."""
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:
        return word[:i] + word[i + 1 :]
    if kind == 2:
        return word[: i + 1] + word[i] + word[i + 1 :]
    near = NEIGHBOURS.get(word[i].lower())
    return word[:i] + (rng.choice(near) if near else word[i]) + word[i + 1 :]


def corrupt(text: str, rate: float, rng: random.Random) -> str:
    """``text`` with each word of 3+ letters given one typo with probability ``rate``."""
    words = text.split()
    return " ".join(typo(w, rng) if len(w) >= 3 and w.isalpha() and rng.random() < rate else w for w in words)


def pool_texts(run: Path, data_dir: str | None, min_words: int, seed: int) -> tuple[list[str], np.ndarray]:
    """The task's training texts outside the run's training and calibration splits, each once, shuffled."""
    from cartosplit.export.data import load_glue

    config = json.loads((run / "run.json").read_text())["config"]
    data = load_glue(config["task"], "train", data_dir or config.get("data_dir"))
    split = np.load(run / "split.npz")
    used = set(split["train"].tolist()) | set(split["calib"].tolist())
    seen, pool = set(), []
    for i, text in enumerate(data.texts):
        key = text.strip().lower()
        if i in used or key in seen or len(text.split()) < min_words:
            continue
        seen.add(key)
        pool.append(i)
    order = np.random.default_rng(seed).permutation(pool)
    return [data.texts[i].strip() for i in order], np.asarray(data.labels)[order]


def exit_probs(bundle, texts: list[str], batch: int) -> dict[str, np.ndarray]:
    """Router and exit softmax of every text through the bundle's int8 chain (onnx-int8, else fp32)."""
    from tqdm import tqdm

    from cartosplit.benchmarks.int8_batch import chain_logits
    from cartosplit.device_runtime.manifest import DEVICE_HEAD, DEVICE_TAIL, EDGE, ONNX_FP32, ONNX_INT8, cloud_graph
    from cartosplit.device_runtime.numerics import softmax
    from cartosplit.device_runtime.onnx_backend import OnnxSession
    from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch

    m = bundle.manifest
    fmt = ONNX_INT8 if ONNX_INT8 in m.formats else ONNX_FP32
    e = m.split_points.edge
    sessions = {
        g: OnnxSession(bundle.graph_file(g, fmt), None) for g in (DEVICE_HEAD, DEVICE_TAIL, EDGE, cloud_graph(e))
    }
    encoded = encode(load_tokenizer(bundle.path(m.tokenizer), m.model.max_length), texts, None)
    order = np.argsort([len(x[0]) for x in encoded], kind="stable")  # similar lengths batch with little padding
    out = {
        k: np.zeros((len(texts), 3 if k == "router" else len(m.model.labels)))
        for k in ("router", "device", "edge", "final")
    }
    for start in tqdm(range(0, len(order), batch), desc="exit signals", unit="batch", file=sys.stderr):
        chunk = order[start : start + batch]
        logits = chain_logits(sessions, pad_batch([encoded[i] for i in chunk]), e)
        for k, v in logits.items():
            out[k][chunk] = softmax(v)
    out["format"] = np.array(fmt)
    return out


def cached_probs(bundle, cache: Path, key: str, texts: list[str], batch: int) -> dict[str, np.ndarray]:
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if str(stored["key"]) == key:
            return {k: stored[k] for k in stored.files if k != "key"}
    probs = exit_probs(bundle, texts, batch)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, key=np.array(key), **probs)
    return probs


def signals_of(probs: dict[str, np.ndarray], index: slice | np.ndarray = slice(None)) -> ExitSignals:
    return ExitSignals(probs["device"][index], probs["edge"][index], probs["final"][index], probs["router"][index])


def calibrate_anchor(signals: ExitSignals, tier_costs, all_cloud_cost: float, epsilon: float, delta: float):
    """The label-free LTT policy on the calibration texts (a third shapes the path, the rest certify it)."""
    from cartosplit.export.risk_control import Guarantee, calibrate_along_path

    n = len(signals)
    shape, certify = np.arange(n // 3), np.arange(n // 3, n)
    guarantee = Guarantee("ltt", epsilon, delta, "final")
    result = calibrate_along_path(
        signals.subset(shape), None, signals.subset(certify), None, tier_costs, all_cloud_cost, guarantee, True
    )
    return result


def drop_pt(system: np.ndarray, cloud: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict:
    """All-cloud accuracy minus the system's, in points, with a paired 95 % bootstrap interval."""
    if len(labels) == 0:
        return {"drop_pt": None, "ci95": None, "inputs": 0}
    diff = (cloud == labels).astype(np.float64) - (system == labels)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(1000)])
    return {
        "drop_pt": 100 * float(diff.mean()),
        "ci95": [100 * float(np.quantile(means, 0.025)), 100 * float(np.quantile(means, 0.975))],
        "inputs": len(labels),
        "disagreement_pt": 100 * float((system != cloud).mean()),
    }


def replay(
    probs: dict[str, np.ndarray],
    labels: np.ndarray,
    anchor: Policy,
    settings: AuditSettings,
    tier_costs: np.ndarray,
    all_cloud_cost: float,
    shift: int,
    trace_every: int = 250,
) -> dict:
    """The stream through an AuditMonitor as the runtime drives it: the policy in force routes each input,
    a sampled answer is audited; what it answered, cost and saw."""
    signals = signals_of(probs)
    monitor = AuditMonitor(anchor, settings, tier_costs, "drift-bench")
    tiers = np.stack([route(p, signals) for p in monitor.path])  # [M, N]: the route at every path index
    given = np.stack([answers(t, signals) for t in tiers])
    n = len(labels)
    system = np.empty(n, dtype=np.int64)
    cost = np.empty(n)
    index_trace, bound_trace, alpha_trace = [], [], []
    for t in range(n):
        j = monitor.index
        tier, answer = int(tiers[j, t]), int(given[j, t])
        system[t], cost[t] = answer, tier_costs[tier]
        if monitor.sample():
            row = AuditLog.row(probs["router"][t], probs["device"][t], probs["edge"][t], probs["final"][t])
            monitor.record(tier, answer, probs["final"][t], row)
        if t % trace_every == 0 or t == n - 1:
            seq = monitor.sequences[ALL]
            index_trace.append(monitor.index)
            bound_trace.append(round(seq.upper_bound(), 6))  # for the plot: 6 digits keep the JSON small
            alpha_trace.append(round(monitor.policy.alpha_device, 6))
    events = [e for e in monitor.events if e["event"] != "start"]
    alarms = [e["at_answer"] for e in events if e["event"] == "alarm"]
    recals = [e["at_answer"] for e in events if e["event"] == "recalibrated"]
    detected = next((a for a in alarms if a >= shift), None)
    recal = next((r for r in recals if detected is not None and r >= detected), None)
    cloud = signals.probs_final.argmax(1)
    audit_cost = monitor.counters.cost
    return {
        "false_alarm": any(a < shift for a in alarms),
        "detected_at": detected,
        "detected_after_inputs": None if detected is None else detected - shift,
        "recalibrated_at": recal,
        "final_path_index": monitor.index,
        "path_length": len(monitor.path),
        "final_policy": monitor.policy.to_dict(),
        "before": drop_pt(system[:shift], cloud[:shift], labels[:shift]),
        "after_shift": drop_pt(system[shift:], cloud[shift:], labels[shift:]),
        "after_detection": drop_pt(system[detected:], cloud[detected:], labels[detected:]) if detected else None,
        "after_recalibration": drop_pt(system[recal:], cloud[recal:], labels[recal:]) if recal else None,
        "cost_share": float(cost.mean() / all_cloud_cost),
        "audit_cost_share": float(audit_cost / (n * all_cloud_cost)),
        "total_cost_share": float((cost.sum() + audit_cost) / (n * all_cloud_cost)),
        "audits_sent": monitor.counters.sent,
        "audits_free": monitor.counters.free,
        "events": events,
        "trace": {
            "every": trace_every,
            "path_index": index_trace,
            "upper_bound": bound_trace,
            "alpha_device": alpha_trace,
        },
    }


def _quantiles(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"median": float(q[1]), "q10": float(q[0]), "q90": float(q[2]), "runs": len(values)}


def summarise_rate(rate: float, runs: list[dict], p99_ratio: float | None) -> dict:
    """The issue's keys (medians over the repeats) and their spread."""
    med = sorted(runs, key=lambda r: math.inf if r["detected_at"] is None else r["detected_at"])[len(runs) // 2]

    def median_of(key: str) -> float | None:
        values = [r[key]["drop_pt"] for r in runs if r.get(key) and r[key]["drop_pt"] is not None]
        return float(np.median(values)) if values else None

    after = "after_detection" if rate > 0 else "after_shift"
    return {
        "audit_rate": rate,
        "detected_after_inputs": (_quantiles([r["detected_after_inputs"] for r in runs]) or {}).get("median"),
        "drop_before_pt": median_of("before"),
        "drop_after_adaptation_pt": median_of(after),
        "audit_cost_share": float(np.median([r["audit_cost_share"] for r in runs])),
        "p99_ratio": p99_ratio,
        "detected_after_inputs_spread": _quantiles([r["detected_after_inputs"] for r in runs]),
        "detected_share": float(np.mean([r["detected_at"] is not None for r in runs])),
        "false_alarm_share": float(np.mean([r["false_alarm"] for r in runs])),
        "drop_after_shift_pt": median_of("after_shift"),
        "drop_after_recalibration_pt": median_of("after_recalibration"),
        "cost_share": float(np.median([r["cost_share"] for r in runs])),
        "total_cost_share": float(np.median([r["total_cost_share"] for r in runs])),
        "median_run": {k: v for k, v in med.items() if k != "trace"},
        "median_trace": med["trace"],
    }


def pinning() -> tuple[list[str], set[int] | None]:
    """With 2+ CPUs: the servers on the last CPU (``taskset``), this process (the device) on the others, so an
    audit's edge and cloud work competes with the servers' user work, as on a real edge, and not with the
    device's; otherwise no pinning."""
    import os
    import shutil

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return [], None
    return ["taskset", "-c", str(cpus[-1])], set(cpus[:-1])


def p99_ratio_interval(base: np.ndarray, other: np.ndarray, seed: int, resamples: int = 2000) -> list[float]:
    """95 % bootstrap interval of p99(other) / p99(base), both resampled."""
    rng = np.random.default_rng(seed)
    ratios = [
        np.percentile(rng.choice(other, len(other)), 99) / np.percentile(rng.choice(base, len(base)), 99)
        for _ in range(resamples)
    ]
    return [float(np.quantile(ratios, 0.025)), float(np.quantile(ratios, 0.975))]


def measure_latency(
    bundle_path: str, anchor: Policy, texts: list[str], rates: list[float], rounds: int, seed: int
) -> dict:
    """p50/p99 ms of DeviceRuntime.predict per audit rate against live edge and cloud servers, rates interleaved."""
    import os

    from cartosplit.device_runtime.runtime import DeviceRuntime
    from cartosplit.serving.process import ServerProcess, stop_servers

    prefix, device_cpus = pinning()
    common = ["--bundle", bundle_path, "--host", "127.0.0.1", "--port", "0", "--log-level", "warning"]
    common += ["--threads", "1"]
    own_cpus = os.sched_getaffinity(0) if device_cpus else None
    if device_cpus:
        os.sched_setaffinity(0, device_cpus)
    servers = {}
    latencies: dict[float, list[float]] = {r: [] for r in rates}
    extra: dict[float, dict] = {}
    try:
        servers["cloud"] = ServerProcess(["serve-cloud", *common], "cloud", prefix=prefix)
        # the edge at the shipped policy's own threshold (a device can only make it stricter)
        edge_args = [*common, "--cloud", servers["cloud"].address, "--alpha-edge", repr(anchor.alpha_edge)]
        servers["edge"] = ServerProcess(["serve-edge", *edge_args], "edge", prefix=prefix)
        with DeviceRuntime(bundle_path, edge=servers["edge"].address, cloud=servers["cloud"].address) as warm:
            warm.predict(texts[:200])  # both servers past their first requests before anything is timed
        for round_ in range(rounds):
            for rate in rates[round_ % len(rates) :] + rates[: round_ % len(rates)]:  # each rate first once
                settings = AuditSettings(rate=rate, seed=seed + round_) if rate > 0 else None
                runtime = DeviceRuntime(
                    bundle_path,
                    edge=servers["edge"].address,
                    cloud=servers["cloud"].address,
                    audit=settings,
                    policy=anchor,
                    threads=1,
                )
                with runtime:
                    runtime.predict(texts[:20])  # warm-up, not timed
                    for text in texts:
                        latencies[rate].append(runtime.predict([text])[0].latency_ms)
                    time.sleep(0.5)  # let the last audits land before the summary
                    summary = runtime.audit_summary()
                if summary is not None:
                    counters = summary["counters"]
                    seen = extra.setdefault(
                        rate, {"sent": 0, "free": 0, "dropped": {}, "bytes": 0, "path_index_end": []}
                    )
                    seen["sent"] += counters["sent"]
                    seen["free"] += counters["free"]
                    seen["bytes"] += counters["bytes"]
                    for k, v in counters["dropped"].items():
                        seen["dropped"][k] = seen["dropped"].get(k, 0) + v
                    seen["path_index_end"].append(summary["path_index"])
    finally:
        stop_servers(servers)
        if own_cpus:
            os.sched_setaffinity(0, own_cpus)
    out = {}
    for rate, values in latencies.items():
        arr = np.asarray(values)
        out[str(rate)] = {
            "inputs": len(arr),
            "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99)),
            "mean_ms": float(arr.mean()),
            "audits": extra.get(rate),
        }
    base = out[str(rates[0])]["p99_ms"]
    for rate, v in out.items():
        v["p99_ratio"] = v["p99_ms"] / base
        v["p99_ratio_ci95"] = p99_ratio_interval(
            np.asarray(latencies[rates[0]]), np.asarray(latencies[float(rate)]), seed
        )
    setup = {"servers_pinned": " ".join(prefix) or None, "device_cpus": sorted(device_cpus or []), "threads": 1}
    return out, setup


def _value(v: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def rate_table(rates: list[dict]) -> list[str]:
    lines = [
        "| audit rate | detected after (inputs) [q10, q90] | detected | false alarms | drop before | "
        "drop after shift, no adaptation | drop after detection | drop after recalibration | "
        "audit cost / all-cloud | total cost / all-cloud | p99 ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in rates:
        spread = s["detected_after_inputs_spread"]
        det = "–" if spread is None else f"{spread['median']:.0f} [{spread['q10']:.0f}, {spread['q90']:.0f}]"
        adapted = _value(s["drop_after_adaptation_pt"]) if s["audit_rate"] > 0 else "–"
        lines.append(
            f"| {100 * s['audit_rate']:g} % | {det} | {100 * s['detected_share']:.0f} % | "
            f"{100 * s['false_alarm_share']:.0f} % | {_value(s['drop_before_pt'])} | "
            f"{_value(s['drop_after_shift_pt'])} | {adapted} | {_value(s['drop_after_recalibration_pt'])} | "
            f"{100 * s['audit_cost_share']:.2f} % | {100 * s['total_cost_share']:.1f} % | "
            f"{_value(s['p99_ratio'], '{:.3f}')} |"
        )
    return lines


def median_runs(rates: list[dict]) -> list[str]:
    lines = []
    for s in rates:
        m = s["median_run"]
        parts = []
        for key in ("before", "after_shift", "after_detection", "after_recalibration"):
            d = m.get(key)
            if d and d["drop_pt"] is not None:
                lo, hi = d["ci95"]
                parts.append(f"{key.replace('_', ' ')} {d['drop_pt']:.2f} [{lo:.2f}, {hi:.2f}] pt ({d['inputs']})")
        end = f"path index at the end {m['final_path_index']} of {m['path_length'] - 1}"
        lines.append(f"- {100 * s['audit_rate']:g} %: " + "; ".join(parts) + f"; {end}")
    return lines


def markdown(r: dict) -> list[str]:
    eps, st, cal = r["settings"]["epsilon_pt"], r["stream"], r["calibration"]
    lines = [
        "# Drift: audit sampling, the live bound and threshold adaptation",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}",
        "",
        f"Streams: {st['before']} clean inputs, then {st['after']} shifted ones; texts from the {st['source']} "
        f"({st['min_words']}+ words), exit probabilities from the bundle's {st['graphs']} graphs.",
        f"Promise: disagreement with the full model <= {eps} pt; online bound at alpha {r['settings']['alpha']}, "
        f"recalibration at delta {r['settings']['delta']}. Thresholds calibrated label-free on {cal['inputs']} "
        f"other clean texts ({cal['statement']}): `{cal['policy']}`.",
        f"Medians over {r['settings']['repeats']} replays per rate (seeds of the audit draws). Drops: all-cloud "
        "accuracy minus the system's, on the labels, in points. Costs: the bundle's cost profile "
        f"({r['settings']['cost_unit']}), as a share of all-cloud's.",
    ]
    for name, sc in r["scenarios"].items():
        a = sc["anchor_on_stream"]
        lines += [
            "",
            f"## Shift: {name}",
            "",
            f"{sc['shift']}. The shipped policy answers {100 * a['early_share_before']:.1f} % early before the shift "
            f"and {100 * a['early_share_after']:.1f} % after; its disagreement with the full model is "
            f"{a['disagreement_before_pt']:.2f} pt before and {a['disagreement_after_pt']:.2f} pt after.",
            "",
            *rate_table(sc["rates"]),
            "",
            "Median replay per rate, drops with 95 % paired bootstrap intervals (inputs):",
            "",
            *median_runs(sc["rates"]),
        ]
    lines += [
        "",
        "## Other shifts: the shipped policy alone",
        "",
        "Does a shift raise the disagreement with the full model? (no audits; drops on labels where they exist)",
        "",
        "| shift | inputs | answered early | disagreement pt | drop pt |",
        "|---|---|---|---|---|",
    ]
    for row in r.get("other_shifts", []):
        if "error" in row:
            lines.append(f"| {row['shift']} | not measured: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['shift']} | {row['inputs']} | {100 * row['early_share']:.1f} % | "
            f"{row['disagreement_pt']:.2f} | {_value(row['drop_pt'])} |"
        )
    settings = r["settings"]
    lines += [
        "",
        f"## Latency: live servers on loopback, {settings['latency_inputs']} clean inputs x "
        f"{settings['latency_rounds']} rounds per rate, rates interleaved",
        "",
        f"Setup: {r.get('latency_setup')} (servers on their own CPU: an audit's edge and cloud work competes with "
        "the servers' user work, as on a real edge, not with the device's).",
        "",
        "| audit rate | p50 ms | p99 ms | p99 ratio [95 % bootstrap] | audits sent | free | dropped |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate, v in r["latency"].items():
        a = v["audits"] or {}
        lo, hi = v["p99_ratio_ci95"]
        lines.append(
            f"| {100 * float(rate):g} % | {v['p50_ms']:.2f} | {v['p99_ms']:.2f} | {v['p99_ratio']:.3f} "
            f"[{lo:.3f}, {hi:.3f}] | {a.get('sent', 0)} | {a.get('free', 0)} | {a.get('dropped', {})} |"
        )
    lines += ["", "Typo examples:", ""]
    lines += [f"- `{a}` -> `{b}`" for a, b in st["examples"]]
    if r.get("plot"):
        lines += ["", f"![bound and thresholds]({Path(r['plot']).name})"]
    return lines


def plot(r: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    shift = r["stream"]["before"]
    eps = r["settings"]["epsilon_pt"]
    for name, style in (("misread", "-"), ("typos", ":")):
        for s in r["scenarios"][name]["rates"]:
            if s["audit_rate"] == 0:
                continue
            tr = s["median_trace"]
            x = np.arange(len(tr["upper_bound"])) * tr["every"]
            label = f"{name}, p = {100 * s['audit_rate']:g} %"
            axes[0].plot(x, 100 * np.asarray(tr["upper_bound"]), style, label=label)
            if name == "misread":
                axes[1].plot(x, tr["path_index"], label=label)
                never = [a is None or math.isinf(float(a)) for a in tr["alpha_device"]]  # "never" drawn at 1
                axes[2].plot(
                    x, [1.0 if n else float(a) for n, a in zip(never, tr["alpha_device"], strict=True)], label=label
                )
    axes[0].axhline(eps, color="k", ls="--", lw=0.8, label=f"epsilon {eps} pt")
    axes[0].set_ylim(0, 6 * eps)
    axes[0].set_ylabel("upper bound on\ndisagreement (pt)")
    axes[1].set_ylabel("path index\n(0 = no early exit)")
    axes[2].set_ylabel("device threshold\n(inf shown as 1)")
    axes[2].set_xlabel("input")
    for ax in axes:
        ax.axvline(shift, color="r", ls="--", lw=0.8)
        ax.legend(fontsize=6, loc="upper right")
    axes[0].set_title("median replay per audit rate (misread: solid, typos: dotted); red: the shift")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NEGATION = re.compile(r"\b(not|n't|no|never|nothing|hardly)\b")
OTHER_TASKS = ("cola", "mrpc", "rte")


def probe_shifts(bundle, anchor: Policy, texts, labels, clean, candidates, args, cache: Path) -> list[dict]:
    """Other shifts, the shipped policy alone (no replay): does each raise its disagreement with the full model?
    Subsets of the clean candidates (long texts, negations: their signals are known) and other GLUE tasks'
    texts (no sentiment labels: disagreement only)."""
    from cartosplit.export.data import load_glue

    rows = []

    def measure(name: str, probs: dict, gold: np.ndarray | None) -> None:
        signals = signals_of(probs)
        tiers = route(anchor, signals)
        given, cloud = answers(tiers, signals), signals.probs_final.argmax(1)
        row = {
            "shift": name,
            "inputs": len(tiers),
            "early_share": float(np.isin(tiers, (0, 1)).mean()),
            "disagreement_pt": 100 * float((given != cloud).mean()),
            "drop_pt": None if gold is None else drop_pt(given, cloud, gold)["drop_pt"],
        }
        rows.append(row)

    measure("clean (the stream's candidates)", {k: v[candidates] for k, v in clean.items()}, labels[candidates])
    for name, keep in (
        ("long (20+ words)", lambda t: len(t.split()) >= 20),
        ("short (5-8 words)", lambda t: len(t.split()) <= 8),
        ("negation (not, n't, no, never...)", lambda t: bool(NEGATION.search(t))),
    ):
        chosen = np.array([i for i in candidates if keep(texts[i])])
        measure(name, {k: v[chosen] for k, v in clean.items()}, labels[chosen])
    for task in OTHER_TASKS:
        try:
            other = load_glue(task, "train", args.data_dir)
        except Exception as exc:  # a task the data folder lacks: say so, measure the rest
            rows.append({"shift": f"{task} texts", "error": str(exc)[:200]})
            continue
        other_texts = [t for t in other.texts if t.strip()][: args.probe_inputs]
        key = json.dumps([bundle.bundle_id, task, len(other_texts)])
        probs = cached_probs(bundle, cache / f"drift-{task}.npz", key, other_texts, args.batch)
        probs.pop("format")
        measure(f"{task} texts (another domain, no sentiment labels)", probs, None)
    return rows


def misread_stream(
    anchor_answers: np.ndarray, cloud: np.ndarray, candidates: np.ndarray, after: int, share: float, seed: int
) -> tuple[np.ndarray, int]:
    """``after`` indices from ``candidates``: each, with probability ``share``, one of the candidates the shipped
    policy answers differently from the full model (drawn with replacement), else the next of the others.
    Returns the indices and how many misread texts there are to draw from."""
    misread = candidates[anchor_answers[candidates] != cloud[candidates]]
    others = candidates[anchor_answers[candidates] == cloud[candidates]]
    if len(misread) == 0:
        raise SystemExit("the shipped policy misreads none of the pool: no misread subpopulation to shift to")
    rng = np.random.default_rng(seed)
    picks = rng.random(after) < share
    out = np.empty(after, dtype=np.int64)
    out[picks] = rng.choice(misread, picks.sum())
    out[~picks] = others[np.arange((~picks).sum()) % len(others)]
    return out, len(misread)


def run_scenario(name, probs, labels, order, anchor, rates, args, tier_costs, all_cloud, latency) -> dict:
    """Every audit rate (and ``--repeats`` seeds) replayed on the stream ``order`` (indices into ``probs``)."""
    stream = {k: v[order] for k, v in probs.items()}
    gold = labels[order]
    signals = signals_of(stream)
    anchor_tiers = route(anchor, signals)
    anchor_answers = answers(anchor_tiers, signals)
    cloud = signals.probs_final.argmax(1)
    shift = args.before
    summaries, runs_out = [], {}
    for rate in rates:
        runs = []
        for repeat in range(args.repeats if rate > 0 else 1):
            settings = AuditSettings(
                rate=rate,
                epsilon=args.epsilon,
                alpha=args.alpha,
                delta=args.delta,
                recalibrate_after=args.recalibrate_after,
                seed=1000 * repeat + args.seed,
            )
            runs.append(replay(stream, gold, anchor, settings, tier_costs, all_cloud, shift))
        summary = summarise_rate(rate, runs, latency.get(str(rate), {}).get("p99_ratio"))
        summaries.append(summary)
        runs_out[str(rate)] = [{k: v for k, v in r.items() if k not in ("trace", "events")} for r in runs]
        print(
            f"{name} rate {rate:g}: detected after {summary['detected_after_inputs']} inputs, "
            f"drop after adaptation {summary['drop_after_adaptation_pt']} pt",
            file=sys.stderr,
        )
    return {
        "anchor_on_stream": {
            "early_share_before": float(np.isin(anchor_tiers[:shift], (0, 1)).mean()),
            "early_share_after": float(np.isin(anchor_tiers[shift:], (0, 1)).mean()),
            "disagreement_before_pt": 100 * float((anchor_answers[:shift] != cloud[:shift]).mean()),
            "disagreement_after_pt": 100 * float((anchor_answers[shift:] != cloud[shift:]).mean()),
            "cost_share_before": float(tier_costs[anchor_tiers[:shift]].mean() / all_cloud),
        },
        "rates": summaries,
        "runs": runs_out,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("drift", __doc__)
    parser.add_argument("--run", required=True, help="a run folder (its bundle, split.npz and task)")
    parser.add_argument("--bundle", help="bundle to use (default: RUN/bundle)")
    parser.add_argument("--data-dir", help="GLUE folder (default: the run's, then ../shared/data/glue)")
    parser.add_argument("--calib", type=int, default=3000, help="clean texts to calibrate the thresholds on")
    parser.add_argument("--pool", type=int, default=30000, help="clean texts for the streams (before + candidates)")
    parser.add_argument("--before", type=int, default=10000, help="clean inputs before the shift")
    parser.add_argument("--after", type=int, default=15000, help="inputs after the shift")
    parser.add_argument("--typo-rate", type=float, default=0.4, help="typos: share of words of 3+ letters hit")
    parser.add_argument("--misread-share", type=float, default=0.03, help="misread: share of inputs from it")
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--rates", default="0,0.01,0.02,0.05", help="audit rates, comma-separated, 0 first")
    parser.add_argument("--epsilon", type=float, default=0.005)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--recalibrate-after", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=20, help="replays per rate (seeds of the audit draws)")
    parser.add_argument("--latency-inputs", type=int, default=600, help="clean inputs per rate and round (0: skip)")
    parser.add_argument("--latency-rounds", type=int, default=4, help="rounds; the rates' order rotates")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--probe-inputs", type=int, default=1500, help="texts per other GLUE task probed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", help="signals cache folder (default: RUN/cache)")
    parser.add_argument("--out", default="benchmarks/results/drift")
    args = parser.parse_args(argv)
    rates = [float(x) for x in args.rates.split(",")]
    if rates[0] != 0.0:
        parser.error("--rates must start with 0 (no audit: the baseline)")
    if args.before + args.after > args.pool:
        parser.error("--pool must hold --before + --after clean texts")

    from cartosplit.device_runtime.bundle import load_bundle

    run = Path(args.run)
    bundle_path = args.bundle or str(run / "bundle")
    bundle = load_bundle(bundle_path)
    m = bundle.manifest
    tier_costs = m.cost_profile.tier_costs(m.split_points)
    all_cloud = m.cost_profile.all_cloud_cost(m.split_points)
    texts, labels = pool_texts(run, args.data_dir, args.min_words, args.seed)
    needed = args.calib + args.pool
    if len(texts) < needed:
        parser.error(f"the pool holds {len(texts)} texts outside the run's splits; --calib + --pool = {needed}")
    texts, labels = texts[:needed], labels[:needed]
    rng = random.Random(args.seed)
    clean_after = texts[args.calib + args.before : args.calib + args.before + args.after]
    typos = [corrupt(t, args.typo_rate, rng) for t in clean_after]
    cache = Path(args.cache or run / "cache")
    key = json.dumps([bundle.bundle_id, args.calib, args.pool, args.min_words, args.seed])
    clean = cached_probs(bundle, cache / "drift-clean.npz", key, texts, args.batch)
    typo_key = json.dumps([key, args.before, args.after, args.typo_rate])
    typoed = cached_probs(bundle, cache / "drift-typos.npz", typo_key, typos, args.batch)
    fmt = str(clean.pop("format"))
    typoed.pop("format")

    calibration = calibrate_anchor(
        signals_of({k: v[: args.calib] for k, v in clean.items()}), tier_costs, all_cloud, args.epsilon, args.delta
    )
    if calibration.policy is None:
        print("calibration certified no policy cheaper than all-cloud: nothing to keep online", file=sys.stderr)
        return 1
    anchor = calibration.policy
    all_signals = signals_of(clean)
    anchor_answers = answers(route(anchor, all_signals), all_signals)
    cloud = all_signals.probs_final.argmax(1)

    latency, latency_setup = {}, None
    if args.latency_inputs > 0:
        clean_stream = texts[args.calib : args.calib + args.latency_inputs]
        latency, latency_setup = measure_latency(
            bundle_path, anchor, clean_stream, rates, args.latency_rounds, args.seed
        )

    first = args.calib
    before = np.arange(first, first + args.before)
    n_clean = len(texts)
    # typos: the corrupted texts follow the clean ones in one probability table
    both = {k: np.concatenate([clean[k], typoed[k]]) for k in clean}
    both_labels = np.concatenate([labels, labels[first + args.before : first + args.before + args.after]])
    typo_order = np.concatenate([before, n_clean + np.arange(args.after)])
    candidates = np.arange(first + args.before, n_clean)
    after, misread_pool = misread_stream(anchor_answers, cloud, candidates, args.after, args.misread_share, args.seed)
    misread_order = np.concatenate([before, after])
    scenarios = {
        "typos": run_scenario(
            "typos", both, both_labels, typo_order, anchor, rates, args, tier_costs, all_cloud, latency
        ),
        "misread": run_scenario(
            "misread", clean, labels, misread_order, anchor, rates, args, tier_costs, all_cloud, latency
        ),
    }
    scenarios["typos"]["shift"] = f"every word of 3+ letters hit by one typo with probability {args.typo_rate}"
    scenarios["misread"]["shift"] = (
        f"{100 * args.misread_share:g} % of inputs drawn from the {misread_pool} clean texts (of "
        f"{len(candidates)}) that the shipped policy answers differently from the full model, with replacement; "
        "the rest clean texts it agrees on"
    )
    scenarios["misread"]["misread_pool"] = misread_pool
    probes = probe_shifts(bundle, anchor, texts, labels, clean, candidates, args, cache)
    report = {
        "machine": describe_machine(),
        "stream": {
            "before": args.before,
            "after": args.after,
            "typo_rate": args.typo_rate,
            "misread_share": args.misread_share,
            "min_words": args.min_words,
            "source": f"{m.model.task} training file outside the run's splits",
            "examples": list(zip(clean_after[:3], typos[:3], strict=True)),
            "graphs": fmt,
        },
        "settings": {
            "epsilon_pt": 100 * args.epsilon,
            "alpha": args.alpha,
            "delta": args.delta,
            "repeats": args.repeats,
            "recalibrate_after": args.recalibrate_after,
            "latency_inputs": args.latency_inputs,
            "latency_rounds": args.latency_rounds,
            "cost_unit": m.cost_profile.unit,
        },
        "calibration": {
            "inputs": args.calib,
            "statement": (
                f"LTT, disagreement with the final exit <= {100 * args.epsilon:g} pt at delta {args.delta}, "
                f"bound {100 * calibration.certification.bound:.2f} pt on {calibration.certification.n} samples"
            ),
            "policy": anchor.to_dict(),
        },
        # the keys, per audit rate, for the scenario that breaks the promise (misread)
        "rates": scenarios["misread"]["rates"],
        "scenarios": scenarios,
        "other_shifts": probes,
        "latency": latency,
        "latency_setup": latency_setup,
    }
    publish(report, args.out, bench_command("drift", argv), markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
