"""Accuracy vs cost on a GLUE task: cartosplit against every baseline, with the same model and costs.

``cartosplit bench tradeoff --task sst2`` trains the default model on the task if its run folder does
not hold a finished run yet (resumable: an interrupted run continues from its last epoch), then:

1. forward passes over the trained subset, the calibration split and dev (cached in the run);
2. fits the router at every depth r in 0..d for each kind (classifier: logreg and mlp; nearest
   centroid), and chooses each variant's thresholds on the calibration split;
3. chooses every baseline's thresholds on the calibration split with the same objective;
4. evaluates all of them on dev, draws the accuracy-vs-cost frontier (each method calibrated for a
   series of allowed drops, then evaluated on dev) and merges the task into
   ``benchmarks/results/tradeoff.{json,md}``, with ``tradeoff-<task>.{json,png}`` beside them.

5. measures the accuracy promise (``benchmarks/promise.py``): cartosplit's headline variant, the
   cascade and the confidence / entropy exits, each calibrated with LTT, CRC and the plain search,
   under three protocols (the training-file split; cross-fit on random dev halves, both ways, 50 cuts;
   the same with the calibration half's labels hidden), at ``--max-drop`` and ``--frontier-eps``,
   with 95 % intervals; ``promise.<guarantee>.<protocol>`` per task in ``tradeoff.json``.

Every row on dev also carries a 95 % paired bootstrap interval of its drop and cut
(``acc_drop_pt_ci95``, ``cost_reduction_ci95``; 1,000 resamples of dev).

Which cartosplit variant is the headline row is also decided on the calibration split, never on dev:
each variant's thresholds are tuned on one half of it and judged on the other half; the cheapest
variant within the allowed drop there wins.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.baselines import (
    exit_scores,
    patience_tiers,
    random_tiers,
    search_shared_threshold,
    shared_threshold_tiers,
)
from cartosplit.benchmarks.promise import (
    GUARANTEE_KINDS,
    PROTOCOLS,
    Candidate,
    best_under_guarantee,
    headline,
    headline_markdown,
    plot_promise,
    promise_markdown,
    run_protocols,
)
from cartosplit.benchmarks.report import bench_command, bench_parser, pyplot, write_report
from cartosplit.cli_args import comma_list
from cartosplit.device_runtime.costs import TIER_CLOUD_DIRECT, TIER_DEVICE, TIER_EDGE, TIER_NAMES, CostProfile
from cartosplit.device_runtime.metrics import metric_from_counts, set_metric
from cartosplit.device_runtime.policy import (
    ExitSignals,
    Objective,
    Policy,
    answers,
    oracle_tiers,
    route,
    search_policy,
)

TASKS = ("sst2", "mrpc", "rte", "cola")
# Every task trains on its whole training file minus the calibration split. SST-2 holds out 5,000
# sentences: certifying a 0.5 pt bound at delta = 0.1 needs at least ~460 calibration samples even
# with no sample lost, and every further loss allowed costs ~30 more (docs/method.md).
# RTE (2,090 pairs) gets 8 epochs: after 3 its final exit was still at 0.76 training accuracy and
# cartography found no easy sample at all (99 % hard), which leaves a router nothing to route.
TASK_SETTINGS = {
    "sst2": {"train_size": None, "calib_size": 5000, "epochs": 3, "batch_size": 32},
    "mrpc": {"train_size": None, "calib_size": 600, "epochs": 3, "batch_size": 16},
    "rte": {"train_size": None, "calib_size": 400, "epochs": 8, "batch_size": 16},
    "cola": {"train_size": None, "calib_size": 1500, "epochs": 3, "batch_size": 32},
}
# GLUE's metrics: MCC for CoLA, F1 (with accuracy beside it) for MRPC, accuracy otherwise
METRIC = {"sst2": "accuracy", "mrpc": "f1", "rte": "accuracy", "cola": "mcc"}
FRONTIER_DROPS = (0.0, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 100.0)
TRAINING_KEYS = ("model", "train_size", "calib_size", "epochs", "batch_size", "lr", "max_length", "seed")


def ensure_trained(task: str, run: Path, args: argparse.Namespace) -> None:
    """Train the task's run unless it has finished; continue an interrupted one."""
    from cartosplit.export.train import RUN_FILE, TrainConfig, train

    info = json.loads((run / RUN_FILE).read_text()) if (run / RUN_FILE).is_file() else {}
    if info.get("status") in ("trained", "calibrated"):
        return
    if args.no_train:
        raise SystemExit(f"{run} holds no finished run and --no-train was given")
    settings = dict(TASK_SETTINGS[task])
    if args.train_size is not None:
        settings["train_size"] = None if args.train_size == "all" else int(args.train_size)
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    cfg = TrainConfig(
        task=task,
        out=str(run),
        data_dir=args.data_dir,
        threads=args.threads,
        **({"model": args.model} if args.model else {}),
        **settings,
    )
    print(f"training {task} into {run} ({settings})", file=sys.stderr)
    train(cfg, resume=bool(info), log=lambda m: print(m, file=sys.stderr))


BOOTSTRAP_DRAWS = 1000


def _bootstrap_index(n: int, draws: int = BOOTSTRAP_DRAWS) -> np.ndarray:
    """Resampled dev indices, the same for every method of a task (seeded): intervals are paired."""
    return np.random.default_rng(12345).integers(0, n, (draws, n))


def score_tiers(
    tiers: np.ndarray, predictions: np.ndarray, labels: np.ndarray, tier_costs: np.ndarray, metric: str
) -> dict:
    """Accuracy (and the task metric), mean cost and shares of one routing of the dev set.

    ``_boot`` keeps the metric and cost of each bootstrap resample until ``relative_to`` turns them
    into 95 % intervals of the drop and the cut against all-cloud."""
    n = len(labels)
    counts = np.bincount(tiers, minlength=4) / n
    row = {
        "accuracy": float((predictions == labels).mean()),
        "cost": float(tier_costs[tiers].mean()),
        "share": {
            "device": float(counts[TIER_DEVICE]),
            "edge": float(counts[TIER_EDGE]),
            "cloud": float(counts[2] + counts[TIER_CLOUD_DIRECT]),
            "cloud_direct": float(counts[TIER_CLOUD_DIRECT]),
        },
    }
    if metric != "accuracy":
        row[metric] = set_metric(metric, predictions, labels)
    idx = _bootstrap_index(n)
    if metric == "accuracy":
        boot_value = (predictions == labels)[idx].mean(axis=1)
    else:
        p, y = predictions == 1, labels == 1
        tp, fp, fn = ((a & b)[idx].sum(axis=1) for a, b in ((p, y), (p, ~y), (~p, y)))
        boot_value = metric_from_counts(metric, tp, fp, fn, n - tp - fp - fn)
    row["_boot"] = {"value": boot_value, "cost": tier_costs[tiers][idx].mean(axis=1)}
    return row


def relative_to(row: dict, reference: dict, metric: str) -> dict:
    row["cost_reduction"] = 1.0 - row["cost"] / reference["cost"]
    row["acc_drop_pt"] = 100.0 * (reference[metric] - row[metric])
    boot, ref_boot = row.pop("_boot", None), reference.get("_boot")
    if boot is not None and ref_boot is not None:
        drop = 100.0 * (ref_boot["value"] - boot["value"])
        cut = 1.0 - boot["cost"] / reference["cost"]  # all-cloud's cost per sample is a constant
        row["acc_drop_pt_ci95"] = [float(np.quantile(drop, 0.025)), float(np.quantile(drop, 0.975))]
        row["cost_reduction_ci95"] = [float(np.quantile(cut, 0.025)), float(np.quantile(cut, 0.975))]
    return row


def _routed(tiers: np.ndarray, signals: ExitSignals, labels, tier_costs, metric: str) -> dict:
    return score_tiers(tiers, answers(tiers, signals), labels, tier_costs, metric)


def selection_score(signals: ExitSignals, labels: np.ndarray, costs: np.ndarray, objective: Objective) -> dict:
    """Thresholds tuned on half of the calibration split, scored on the other half.

    Choosing the variant by the same samples its thresholds were tuned on favours the variant that
    overfits them most; the held-out half does not.
    """
    order = np.random.default_rng(0).permutation(len(labels))
    tune, judge = order[: len(order) // 2], order[len(order) // 2 :]
    found = search_policy(signals.subset(tune), labels[tune], costs, objective, use_router=True)
    judged = signals.subset(judge)
    tiers = route(found.policy, judged)
    value = set_metric(objective.metric, answers(tiers, judged), labels[judge])
    reference = set_metric(objective.metric, judged.predictions()[2], labels[judge])
    feasible = value >= reference - objective.max_drop / 100.0 - 1e-12
    cost = float(costs[tiers].mean())
    return {"metric": objective.metric, "value": value, "cost": cost, "reference": reference, "feasible": feasible}


def selection_key(selection: dict) -> tuple:
    """Feasible first, then cheapest, then the best metric."""
    return (not selection["feasible"], selection["cost"], -selection["value"])


def _policy_row(policy: Policy, signals: ExitSignals, labels, tier_costs, metric: str) -> dict:
    return _routed(route(policy, signals), signals, labels, tier_costs, metric)


def evaluate_task(task: str, run: Path, profile: CostProfile, args: argparse.Namespace) -> dict:
    """Every method on the task's dev set, thresholds from the calibration split."""
    from cartosplit.export.calibrate import load_calibration_data
    from cartosplit.export.router import RouterConfig, fit_router, router_probs

    data = load_calibration_data(run)
    metric = METRIC.get(task, "accuracy")
    labels = {name: data.sets[name].labels for name in ("calib", "dev")}
    probs = {name: data.forward[name][0] for name in ("calib", "dev")}
    plain = {name: ExitSignals(*probs[name]) for name in ("calib", "dev")}
    objective = Objective("max-drop", args.max_drop, metric=metric)
    split0 = data.model_config.split_points(0)
    all_cloud_cost = profile.all_cloud_cost(split0)
    n_dev = len(labels["dev"])
    dev_preds = plain["dev"].predictions()
    # device/edge/cloud-via-edge costs do not depend on the router depth; cloud-direct does
    costs_r0 = profile.tier_costs(split0)

    all_cloud = score_tiers(np.full(n_dev, TIER_CLOUD_DIRECT), dev_preds[2], labels["dev"], costs_r0, metric)
    all_cloud["cost"] = all_cloud_cost  # raw tokens to the cloud: nothing runs on the device
    methods: dict[str, dict] = {}
    methods["all_edge"] = _routed(np.full(n_dev, TIER_EDGE), plain["dev"], labels["dev"], costs_r0, metric)
    methods["all_device"] = _routed(np.full(n_dev, TIER_DEVICE), plain["dev"], labels["dev"], costs_r0, metric)

    for kind in ("confidence", "entropy"):
        threshold, _ = search_shared_threshold(plain["calib"], labels["calib"], costs_r0, objective, kind)
        tiers = shared_threshold_tiers(*exit_scores(plain["dev"], kind), threshold)
        methods[f"{kind}_exit"] = _routed(tiers, plain["dev"], labels["dev"], costs_r0, metric)
        methods[f"{kind}_exit"]["threshold"] = threshold
    methods["patience"] = _routed(patience_tiers(plain["dev"], 1), plain["dev"], labels["dev"], costs_r0, metric)
    methods["patience"]["patience"] = 1
    cascade = search_policy(plain["calib"], labels["calib"], costs_r0, objective, use_router=False)
    methods["dimee_thresholds"] = _policy_row(cascade.policy, plain["dev"], labels["dev"], costs_r0, metric)
    methods["dimee_thresholds"]["policy"] = cascade.policy.to_dict()

    variants, routed_signals = {}, {}
    for kind in args.routers:
        for depth in args.depths:
            if depth > data.model_config.device_split:
                continue
            name = f"cartosplit_{kind}_r{depth}"
            started = time.time()
            router, report = fit_router(data.forward["train"][1][depth], data.groups, RouterConfig(kind, depth))
            signals = {
                s: ExitSignals(*probs[s], router_probs(router, data.forward[s][1][depth])) for s in ("calib", "dev")
            }
            costs = profile.tier_costs(data.model_config.split_points(depth))
            found = search_policy(signals["calib"], labels["calib"], costs, objective, use_router=True)
            row = _policy_row(found.policy, signals["dev"], labels["dev"], costs, metric)
            row["selection"] = selection_score(signals["calib"], labels["calib"], costs, objective)
            row.update(
                router={
                    "kind": kind,
                    "depth": depth,
                    "holdout_accuracy": report.holdout_accuracy,
                    "majority_accuracy": report.majority_accuracy,
                },
                policy=found.policy.to_dict(),
                uses_router=found.policy.uses_router,
                calib={"accuracy": found.outcome.accuracy, "cost": found.outcome.mean_cost},
                seconds=round(time.time() - started, 1),
            )
            variants[name] = row
            routed_signals[name] = (signals, costs)
    # the headline variant: tuned on one half of the calibration split, judged on the other (never dev)
    headline = min(variants, key=lambda v: selection_key(variants[v]["selection"]))
    methods["cartosplit"] = {**variants[headline], "variant": headline}
    methods.update(variants)

    draws = random_tiers(_route_shares(methods[headline]["policy"], routed_signals[headline][0]["dev"]), n_dev)
    head_costs = routed_signals[headline][1]
    rows = [_routed(t, plain["dev"], labels["dev"], head_costs, metric) for t in draws]
    methods["random_routing"] = {
        "accuracy": float(np.mean([r["accuracy"] for r in rows])),
        "accuracy_std": float(np.std([r["accuracy"] for r in rows])),
        "cost": float(np.mean([r["cost"] for r in rows])),
        "share": {k: float(np.mean([r["share"][k] for r in rows])) for k in rows[0]["share"]},
        "draws": len(rows),
        "same_shares_as": headline,
    }
    if metric != "accuracy":
        methods["random_routing"][metric] = float(np.mean([r[metric] for r in rows]))
    oracle_t, oracle_answer = oracle_tiers(plain["dev"], labels["dev"])
    methods["oracle"] = score_tiers(oracle_t, oracle_answer, labels["dev"], costs_r0, metric)
    methods["oracle"]["upper_bound"] = True
    for row in methods.values():
        relative_to(row, all_cloud, metric)

    frontier = frontier_points(plain, labels, routed_signals[headline], costs_r0, all_cloud, metric)
    all_cloud.pop("_boot")
    head_signals, head_costs = routed_signals[headline]
    candidates = [
        Candidate("cartosplit", head_signals, head_costs, "policy", use_router=True),
        Candidate("dimee_thresholds", plain, costs_r0, "policy"),
        Candidate("confidence_exit", plain, costs_r0, "confidence"),
        Candidate("entropy_exit", plain, costs_r0, "entropy"),
    ]
    epsilons = tuple(dict.fromkeys((args.max_drop, *args.frontier_eps)))
    print(f"{task}: the promise under three protocols (epsilon {epsilons} pt, delta {args.delta})", file=sys.stderr)
    promise_methods = run_protocols(
        candidates,
        labels,
        all_cloud_cost,
        metric,
        epsilons,
        args.delta,
        splits=args.splits,
        fits_a=args.fits_a,
        log=lambda m: print(m, file=sys.stderr),
    )
    baselines = [c.name for c in candidates[1:]]
    promise = {kind: dict(promise_methods["cartosplit"][args.max_drop][kind]) for kind in GUARANTEE_KINDS}
    best = {
        kind: {p: best_under_guarantee(promise_methods, baselines, args.max_drop, kind, p) for p in PROTOCOLS}
        for kind in GUARANTEE_KINDS
    }
    return {
        "promise": promise,
        "promise_best_baseline": best,
        "promise_methods": {
            name: {f"{eps:g}": by_eps for eps, by_eps in rows.items()} for name, rows in promise_methods.items()
        },
        "metric": metric,
        "all_cloud": all_cloud,
        "methods": methods,
        "headline_variant": headline,
        "split": [data.model_config.device_split, data.model_config.edge_split, data.model_config.num_layers],
        "frontier": frontier,
        "samples": {
            "train": data.trained_samples,
            "router_fit": len(data.groups),
            "calib": len(labels["calib"]),
            "dev": n_dev,
        },
        "dev_exit_accuracy": {
            name: float((dev_preds[k] == labels["dev"]).mean()) for k, name in enumerate(("device", "edge", "final"))
        },
        "groups": {g: float((data.groups == i).mean()) for i, g in enumerate(("easy", "medium", "hard"))},
        "training": {k: v for k, v in asdict(data.train_config).items() if k in TRAINING_KEYS},
        "objective": asdict(objective),
        "cost_profile": profile.to_dict(),
    }


def _route_shares(policy: dict, signals: ExitSignals) -> dict[str, float]:
    """Dev shares per route of a policy (cloud direct and cloud via edge kept apart)."""
    tiers = route(Policy.from_dict(policy), signals)
    counts = np.bincount(tiers, minlength=len(TIER_NAMES)) / len(tiers)
    return dict(zip(TIER_NAMES, counts.tolist(), strict=True))


def frontier_points(plain, labels, headline, costs_r0, all_cloud, metric) -> dict[str, list[dict]]:
    """Dev (cost, metric) of each tunable method calibrated for each allowed drop in FRONTIER_DROPS."""
    signals, head_costs = headline
    curves: dict[str, list[dict]] = {"confidence_exit": [], "dimee_thresholds": [], "cartosplit": []}
    for drop in FRONTIER_DROPS:
        objective = Objective("max-drop", drop, metric=metric)
        threshold, _ = search_shared_threshold(plain["calib"], labels["calib"], costs_r0, objective, "confidence")
        tiers = shared_threshold_tiers(*exit_scores(plain["dev"], "confidence"), threshold)
        points = {"confidence_exit": _routed(tiers, plain["dev"], labels["dev"], costs_r0, metric)}
        cascade = search_policy(plain["calib"], labels["calib"], costs_r0, objective, use_router=False)
        points["dimee_thresholds"] = _policy_row(cascade.policy, plain["dev"], labels["dev"], costs_r0, metric)
        found = search_policy(signals["calib"], labels["calib"], head_costs, objective, use_router=True)
        points["cartosplit"] = _policy_row(found.policy, signals["dev"], labels["dev"], head_costs, metric)
        for name, row in points.items():
            curves[name].append({"max_drop_calib": drop, **relative_to(row, all_cloud, metric)})
    return curves


# Rows of the summary table, in reading order; the router variants follow in their own table.
TABLE_ROWS = (
    ("cartosplit", "cartosplit (router + thresholds)"),
    ("dimee_thresholds", "DIMEE-style thresholds, no router"),
    ("confidence_exit", "confidence (max-softmax) exit"),
    ("entropy_exit", "entropy exit (DeeBERT)"),
    ("patience", "patience (PABEE, t=1)"),
    ("random_routing", "random routing, same shares"),
    ("all_edge", "all-edge"),
    ("all_device", "all-device"),
    ("oracle", "oracle (upper bound)"),
)
# Random routing is a control (it copies cartosplit's shares), not a competitor.
BASELINES = tuple(name for name, _ in TABLE_ROWS if name not in ("cartosplit", "oracle", "random_routing"))


def best_baseline(task: dict) -> str:
    """The baseline with the largest cost cut within cartosplit's drop (at least 0.5 pt), else the least drop."""
    methods = task["methods"]
    limit = max(methods["cartosplit"]["acc_drop_pt"], 0.5)
    within = [b for b in BASELINES if methods[b]["acc_drop_pt"] <= limit + 1e-9]
    if within:
        return max(within, key=lambda b: (methods[b]["cost_reduction"], -methods[b]["acc_drop_pt"]))
    return min(BASELINES, key=lambda b: methods[b]["acc_drop_pt"])


def _fmt_row(label: str, row: dict, metric: str) -> str:
    s = row["share"]
    value = row[metric]
    extra = f" ± {row['accuracy_std']:.4f}" if "accuracy_std" in row and metric == "accuracy" else ""
    return (
        f"| {label} | {value:.4f}{extra} | {row['acc_drop_pt']:+.2f} | {row['cost']:.3f} | "
        f"{100 * row['cost_reduction']:.1f} % | {100 * s['device']:.0f} / {100 * s['edge']:.0f} / "
        f"{100 * s['cloud']:.0f} % |"
    )


def markdown(report: dict) -> list[str]:
    lines = [
        "# Accuracy vs cost on GLUE dev sets",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Model: {report['model']}, split (device/edge/total layers) {report['split']}",
        "",
        "Thresholds of every method are chosen on a calibration split carved from the training file "
        "(never on dev), with one objective for all: the lowest mean cost whose calibration accuracy is "
        "within 0.5 pt of all-cloud's. Cost: the profile named per task (default: the unit convention of "
        "docs/method.md). `drop` is in points of the task's metric, positive = worse than all-cloud; `cut` "
        "is the cost reduction vs all-cloud. The paper's claim to beat: > 43 % cut at < 0.5 pt drop.",
    ]
    lines += headline_markdown(report.get("headline", {}))
    for name, task in report["tasks"].items():
        metric = task["metric"]
        ac = task["all_cloud"]
        tr = task["training"]
        lines += [
            "",
            f"## {name} ({metric}; dev {task['samples']['dev']}, calibration {task['samples']['calib']}, "
            f"trained on {task['samples']['train']} × {tr['epochs']} epochs)",
            "",
            f"All-cloud: {metric} {ac[metric]:.4f}, cost {ac['cost']:.3f}. Dev exit accuracy device/edge/final: "
            + "/".join(f"{v:.3f}" for v in task["dev_exit_accuracy"].values())
            + ". Cartography groups easy/medium/hard: "
            + "/".join(f"{100 * v:.0f}" for v in task["groups"].values())
            + f" %. Headline variant (tuned on half the calibration split, chosen on the other half): "
            f"`{task['headline_variant']}`; "
            f"best baseline at that drop: `{best_baseline(task)}`.",
            "",
            f"| method | {metric} | drop (pt) | cost | cut | device / edge / cloud |",
            "|---|---|---|---|---|---|",
        ]
        lines += [_fmt_row(label, task["methods"][key], metric) for key, label in TABLE_ROWS]
        lines += [
            "",
            "Router variants (each with its own thresholds from the calibration split; `router` = the margins "
            "calibration kept it on, else the policy is the cascade):",
            "",
            f"| variant | router held-out acc (majority) | router | {metric} | drop (pt) | cut "
            "| device / edge / cloud |",
            "|---|---|---|---|---|---|---|",
        ]
        for key, row in task["methods"].items():
            if not key.startswith("cartosplit_"):
                continue
            s, r = row["share"], row["router"]
            lines.append(
                f"| {key} | {r['holdout_accuracy']:.3f} ({r['majority_accuracy']:.3f}) | "
                f"{'on' if row['uses_router'] else 'off'} | {row[metric]:.4f} | {row['acc_drop_pt']:+.2f} | "
                f"{100 * row['cost_reduction']:.1f} % | {100 * s['device']:.0f} / {100 * s['edge']:.0f} / "
                f"{100 * s['cloud']:.0f} % |"
            )
        lines += ["", f"![{name} frontier](tradeoff-{name}.png)"]
        if "promise" in task:
            lines += promise_markdown(name, task)
    return lines


def plot_frontier(name: str, task: dict, out: Path) -> None:
    plt = pyplot()

    metric = task["metric"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ref = task["all_cloud"][metric]
    for curve, points in task["frontier"].items():
        pts = sorted(points, key=lambda p: p["cost"])
        y = np.array([p[metric] for p in pts])
        yerr = None
        if all("acc_drop_pt_ci95" in p for p in pts):  # 95 % bootstrap intervals over dev samples
            low = np.array([ref - p["acc_drop_pt_ci95"][1] / 100 for p in pts])
            high = np.array([ref - p["acc_drop_pt_ci95"][0] / 100 for p in pts])
            yerr = np.clip(np.stack([y - low, high - y]), 0, None)
        ax.errorbar([p["cost"] for p in pts], y, yerr=yerr, marker="o", ms=3, capsize=2, label=curve)
    markers = {"all_edge": "s", "all_device": "v", "patience": "P", "random_routing": "x", "oracle": "*"}
    for key, marker in markers.items():
        row = task["methods"][key]
        ax.scatter(row["cost"], row[metric], marker=marker, s=60, label=key, zorder=3)
    ac = task["all_cloud"]
    ax.scatter(ac["cost"], ac[metric], marker="D", s=60, color="black", label="all_cloud", zorder=3)
    ax.axhline(ac[metric] - 0.005, color="grey", lw=0.8, ls="--")  # the paper's 0.5 pt budget
    ax.set_xlabel(f"mean cost per sample ({task['cost_profile']['unit']})")
    ax.set_ylabel(f"dev {metric}")
    ax.set_title(f"{name}: dev {metric} vs cost (thresholds from calibration split)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def merge_report(results: Path, task_name: str, task: dict, command: str, model: str, split: list[int]) -> dict:
    """Put one task into tradeoff.json, keeping the other tasks' entries (each with its own command)."""
    from cartosplit.benchmarks.machine import describe_machine

    path = results / "tradeoff.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    tasks = report.get("tasks", {})
    tasks[task_name] = {**task, "command": command, "machine": describe_machine()}
    ordered = {t: tasks[t] for t in TASKS if t in tasks} | {t: v for t, v in tasks.items() if t not in TASKS}
    commands = [ordered[t]["command"] for t in ordered]
    machines = sorted({ordered[t]["machine"] for t in ordered})
    return {
        "command": " && ".join(dict.fromkeys(commands)),
        "machine": machines[0] if len(machines) == 1 else machines,
        "model": model,
        "split": split,
        "headline": headline(ordered),
        "tasks": ordered,
    }


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("tradeoff", __doc__)
    parser.add_argument("--task", required=True, choices=(*TASKS, "all"), help="GLUE task, or all four in turn")
    parser.add_argument("--run", help="run folder (default: runs/bench/<task>); trained here if not finished")
    parser.add_argument("--data-dir", help="GLUE folder (default: the usual resolution)")
    parser.add_argument("--model", help="HF BERT id or folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--train-size", help="override the task's training cap ('all' = every sample)")
    parser.add_argument("--epochs", type=int, help="override the task's epochs")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-train", action="store_true", help="fail instead of training a missing run")
    parser.add_argument(
        "--costs", "--cost-profile", dest="costs", help="JSON cost profile (default: the unit convention)"
    )
    parser.add_argument("--max-drop", type=float, default=0.5, help="allowed calibration drop in points")
    parser.add_argument("--routers", type=comma_list(str), default=("logreg", "mlp", "centroid"), help="router kinds")
    parser.add_argument("--depths", type=comma_list(int), default=(0, 1, 2), help="router depths r")
    parser.add_argument("--delta", type=float, default=0.1, help="LTT: P(risk > epsilon) <= delta (default: 0.1)")
    parser.add_argument(
        "--frontier-eps",
        type=comma_list(float),
        default=(0.25, 1.0, 2.0),
        help="further epsilons (pt) for the promise frontier, beside --max-drop (default: 0.25,1,2)",
    )
    parser.add_argument("--splits", type=int, default=50, help="random dev halvings, used both ways (default: 50)")
    parser.add_argument("--fits-a", type=int, default=20, help="random partitions of the calibration split (20)")
    parser.add_argument("--out", default="benchmarks/results", help="results folder (default: %(default)s)")
    args = parser.parse_args(argv)

    profile = CostProfile.from_json(args.costs) if args.costs else CostProfile()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for task_name in TASKS if args.task == "all" else (args.task,):
        run = Path(args.run) if args.run and args.task != "all" else Path("runs/bench") / task_name
        started = time.time()
        ensure_trained(task_name, run, args)
        task = evaluate_task(task_name, run, profile, args)
        task["seconds"] = round(time.time() - started, 1)
        argv_task = [a if a != "all" else task_name for a in (argv if argv is not None else sys.argv[1:])]
        command = bench_command("tradeoff", argv_task)
        info = json.loads((run / "run.json").read_text())
        model = info["config"]["model"]
        report = merge_report(out, task_name, task, command, model, task["split"])
        plot_frontier(task_name, report["tasks"][task_name], out / f"tradeoff-{task_name}.png")
        plot_promise(task_name, report["tasks"][task_name], out / f"tradeoff-{task_name}-promise.png")
        (out / f"tradeoff-{task_name}.json").write_text(json.dumps(report["tasks"][task_name], indent=2) + "\n")
        write_report(
            {k: v for k, v in report.items() if k not in ("command", "machine")},
            out / "tradeoff",
            report["command"],
            markdown,
        )
        summary = report["tasks"][task_name]
        head, base = summary["methods"]["cartosplit"], summary["methods"][best_baseline(summary)]
        print(
            f"{task_name}: cartosplit {summary['metric']} drop {head['acc_drop_pt']:+.2f} pt, cut "
            f"{100 * head['cost_reduction']:.1f} % ({summary['headline_variant']}); best baseline "
            f"{best_baseline(summary)} drop {base['acc_drop_pt']:+.2f} pt, cut {100 * base['cost_reduction']:.1f} %"
        )
        for kind in GUARANTEE_KINDS:
            row = summary["promise"][kind]["cross_fit"]
            print(
                f"  {kind} (cross-fit, {row['n_fits']} fits): P(drop > {row['epsilon_pt']:g} pt) "
                f"{row['violation_rate']:.2f}, mean drop {row['mean_drop_pt']:+.2f} pt, mean cut "
                f"{100 * row['mean_cut']:.1f} %"
                + (
                    f", smallest certifiable epsilon {row['smallest_certifiable_epsilon_pt']:.2f} pt"
                    if row.get("smallest_certifiable_epsilon_pt") is not None
                    else ""
                )
            )
    return 0
