"""Does the accuracy promise hold? Every method, with and without a guarantee, under three protocols.

Part of ``cartosplit bench tradeoff``; pure numpy over cached exit probabilities (no model here).

Protocols (docs/method.md, "The promise"):
- ``train_split``: the path is built on a random third of the calibration split carved from the
  training file, the guarantee certified on the other two thirds, the policy evaluated on all of dev;
  repeated over ``--fits-a`` random partitions (the plain search runs on the same two thirds).
- ``cross_fit``: in-domain. Dev is cut in random halves; calibrate on one, evaluate on the other, both
  ways, over ``--splits`` random cuts. The path comes from the training file's calibration split, so
  every calibration sample is used for testing.
- ``label_free``: as ``cross_fit`` with the calibration half's labels hidden: the risk is the
  disagreement with the final exit, and the plain search bounds that disagreement instead of the drop.

A refused calibration (nothing cheaper than all-cloud certified) deploys all-cloud: drop 0, cut 0.
``violation_rate`` is the share of fits whose evaluation drop (accuracy points, what the per-sample
loss bounds) exceeds epsilon; the task's own metric (MCC, F1) is reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from cartosplit.benchmarks.baselines import exit_scores, search_shared_threshold, shared_threshold_tiers
from cartosplit.benchmarks.report import pyplot
from cartosplit.device_runtime.metrics import confusion_counts, metric_from_counts
from cartosplit.device_runtime.policy import ExitSignals, Objective, answers, route, search_policy
from cartosplit.export.risk_control import (
    Guarantee,
    certify,
    choose_path,
    sample_losses,
    threshold_path,
)

PROTOCOLS = ("train_split", "cross_fit", "label_free")
GUARANTEE_KINDS = ("ltt", "crc", "none")
PATH_STEPS = 100
GRID = {"grid_size": 25, "margin_grid_size": 8}


@dataclass
class Candidate:
    """A method whose thresholds are calibrated: a policy (with or without the router) or one shared
    exit threshold (confidence / entropy early exit)."""

    name: str
    signals: dict[str, ExitSignals]  # "calib" (training-file split) and "dev"
    tier_costs: np.ndarray
    kind: str  # "policy", "confidence" or "entropy"
    use_router: bool = False

    def path_tiers(self, path: ExitSignals, labels, guarantee: Guarantee, targets: list[ExitSignals]) -> list:
        """The path built on ``path`` (safest first), as tier assignments [M, N] of each target."""
        if self.kind == "policy":
            policies = choose_path(path, labels, self.tier_costs, guarantee, self.use_router, PATH_STEPS, **GRID)
            return [np.stack([route(p, t) for p in policies]) for t in targets]
        thresholds = threshold_path(np.concatenate(exit_scores(path, self.kind)), PATH_STEPS)
        out = []
        for t in targets:
            score_d, score_e = exit_scores(t, self.kind)
            out.append(np.stack([shared_threshold_tiers(score_d, score_e, th) for th in thresholds]))
        return out

    def plain_tiers(self, fit: ExitSignals, labels: np.ndarray, objective: Objective, target: ExitSignals):
        """The plain search (cheapest within the drop on ``fit``), routed on ``target``."""
        if self.kind == "policy":
            found = search_policy(fit, labels, self.tier_costs, objective, self.use_router, **GRID)
            return route(found.policy, target)
        threshold, _ = search_shared_threshold(fit, labels, self.tier_costs, objective, self.kind)
        return shared_threshold_tiers(*exit_scores(target, self.kind), threshold)


class Scorer:
    """Drop (accuracy and the task metric, points) and cut of a routing of an index set of dev."""

    def __init__(self, signals: ExitSignals, labels: np.ndarray, all_cloud_cost: float, metric: str) -> None:
        self.signals, self.labels, self.metric = signals, np.asarray(labels), metric
        self.final = signals.predictions()[2]
        self.all_cloud_cost = all_cloud_cost

    def __call__(self, tiers: np.ndarray | None, index: np.ndarray, tier_costs: np.ndarray) -> dict:
        if tiers is None:  # refused: all-cloud
            return {"acc_drop_pt": 0.0, "metric_drop_pt": 0.0, "cut": 0.0, "certified": False}
        given = answers(tiers, self.signals)[index]
        y, final = self.labels[index], self.final[index]
        acc_drop = 100.0 * ((final == y).mean() - (given == y).mean())
        metric_drop = acc_drop
        if self.metric != "accuracy":
            ref = metric_from_counts(self.metric, *confusion_counts(final, y))
            metric_drop = 100.0 * float(ref - metric_from_counts(self.metric, *confusion_counts(given, y)))
        cut = 1.0 - tier_costs[tiers[index]].mean() / self.all_cloud_cost
        return {"acc_drop_pt": float(acc_drop), "metric_drop_pt": float(metric_drop), "cut": float(cut)}


def half_splits(n: int, splits: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(calibrate, evaluate) index pairs: each random cut into halves, used both ways."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(splits):
        order = rng.permutation(n)
        a, b = np.sort(order[: n // 2]), np.sort(order[n // 2 :])
        pairs += [(a, b), (b, a)]
    return pairs


def summarize(fits: list[dict], guarantee: Guarantee, metric: str, seed: int = 0) -> dict:
    """The promise keys over repeated fits, with 95 % intervals."""
    eps_pt = 100.0 * guarantee.epsilon
    drops = np.array([f["acc_drop_pt"] for f in fits])
    metric_drops = np.array([f["metric_drop_pt"] for f in fits])
    cuts = np.array([f["cut"] for f in fits])
    n = len(fits)
    violations = int((drops > eps_pt + 1e-9).sum())
    out = {
        "violation_rate": violations / n,
        "mean_drop_pt": float(drops.mean()),
        "mean_cut": float(cuts.mean()),
        "n_fits": n,
        "epsilon_pt": eps_pt,
        "delta": guarantee.delta if guarantee.kind == "ltt" else None,
        "violation_rate_ci95": clopper_pearson(violations, n),
        "mean_drop_pt_ci95": bootstrap_mean_ci(drops, seed),
        "mean_cut_ci95": bootstrap_mean_ci(cuts, seed),
        "drop_pt_p90": float(np.quantile(drops, 0.9)),
        "metric": metric,
        "metric_mean_drop_pt": float(metric_drops.mean()),
        "metric_violation_rate": float((metric_drops > eps_pt + 1e-9).mean()),
    }
    certs = [f["cert"] for f in fits if f.get("cert") is not None]
    if certs:
        out["certified_rate"] = float(np.mean([c.certified for c in certs]))
        smallest = [c.smallest_certifiable_epsilon for c in certs if c.smallest_certifiable_epsilon is not None]
        costs = [c for c in certs if c.smallest_certifiable_cost is not None]
        out["smallest_certifiable_epsilon_pt"] = float(100 * np.median(smallest)) if smallest else None
        out["smallest_certifiable_cut"] = (
            float(np.median([1 - c.smallest_certifiable_cost / fits[0]["all_cloud_cost"] for c in costs]))
            if costs
            else None
        )
    return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    a = (1 - level) / 2
    low = 0.0 if k == 0 else float(stats.beta.ppf(a, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - a, k + 1, n - k))
    return [low, high]


def bootstrap_mean_ci(values: np.ndarray, seed: int = 0, draws: int = 2000) -> list[float]:
    """Percentile bootstrap interval of the mean over fits. Fits share dev samples, so this is the
    spread of the protocol's average, not of independent experiments."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def run_protocols(
    candidates: list[Candidate],
    labels: dict[str, np.ndarray],
    all_cloud_cost: float,
    metric: str,
    epsilons_pt: tuple[float, ...],
    delta: float,
    splits: int = 50,
    fits_a: int = 20,
    seed: int = 0,
    log=print,
) -> dict:
    """``{method: {epsilon_pt: {guarantee: {protocol: summary}}}}`` for every candidate."""
    dev = candidates[0].signals["dev"]
    n_dev = len(labels["dev"])
    score = Scorer(dev, labels["dev"], all_cloud_cost, metric)
    halves = half_splits(n_dev, splits, seed)
    n_calib = len(labels["calib"])
    rng = np.random.default_rng(seed + 1)
    partitions = []
    for _ in range(fits_a):
        order = rng.permutation(n_calib)
        partitions.append((np.sort(order[: n_calib // 3]), np.sort(order[n_calib // 3 :])))
    dev_final = dev.predictions()[2]
    everything = np.arange(n_dev)
    out: dict = {}
    for cand in candidates:
        calib, dev_s, costs = cand.signals["calib"], cand.signals["dev"], cand.tier_costs
        # the paths do not depend on epsilon: shape them once per partition and per reference
        shape = {ref: Guarantee("ltt", 0.01, delta, ref) for ref in ("label", "final")}
        paths_a = []
        for path_idx, cert_idx in partitions:
            path_set, cert_set = calib.subset(path_idx), calib.subset(cert_idx)
            tiers = cand.path_tiers(path_set, labels["calib"][path_idx], shape["label"], [cert_set, dev_s])
            paths_a.append((cert_idx, cert_set, *tiers))
        paths_b = {}
        for ref in ("label", "final"):
            (dev_tiers,) = cand.path_tiers(calib, labels["calib"] if ref == "label" else None, shape[ref], [dev_s])
            paths_b[ref] = (dev_tiers, sample_losses(dev_tiers, dev_s, labels["dev"] if ref == "label" else None, ref))
        out[cand.name] = {}
        for eps_pt in epsilons_pt:
            fits = {g: {p: [] for p in PROTOCOLS} for g in GUARANTEE_KINDS}
            guarantees = {
                (kind, ref): Guarantee(kind, eps_pt / 100.0, delta, ref) for kind in ("ltt", "crc") for ref in shape
            }
            objective = Objective("max-drop", eps_pt, metric=metric)
            # (a) training-file split: path on a third, certify on the rest, evaluate on dev
            for cert_idx, cert_set, cert_tiers, dev_tiers in paths_a:
                losses = sample_losses(cert_tiers, cert_set, labels["calib"][cert_idx], "label")
                for kind in ("ltt", "crc"):
                    c = certify(losses, costs[cert_tiers].mean(axis=1), guarantees[(kind, "label")], all_cloud_cost)
                    row = score(dev_tiers[c.index] if c.certified else None, everything, costs)
                    fits[kind]["train_split"].append({**row, "cert": c, "all_cloud_cost": all_cloud_cost})
                plain = cand.plain_tiers(cert_set, labels["calib"][cert_idx], objective, dev_s)
                fits["none"]["train_split"].append(score(plain, everything, costs))
            # (b) cross-fit and (c) label-free on dev halves; the path from the training-file split
            for protocol, ref in (("cross_fit", "label"), ("label_free", "final")):
                dev_tiers, losses = paths_b[ref]
                sample_costs = costs[dev_tiers]
                for a, b in halves:
                    for kind in ("ltt", "crc"):
                        spent = sample_costs[:, a].mean(axis=1)
                        c = certify(losses[:, a], spent, guarantees[(kind, ref)], all_cloud_cost)
                        row = score(dev_tiers[c.index] if c.certified else None, b, costs)
                        fits[kind][protocol].append({**row, "cert": c, "all_cloud_cost": all_cloud_cost})
                    fit_set = dev_s.subset(a)
                    fit_labels = labels["dev"][a] if ref == "label" else dev_final[a]
                    fit_objective = objective if ref == "label" else Objective("max-drop", eps_pt)
                    plain = cand.plain_tiers(fit_set, fit_labels, fit_objective, dev_s)
                    fits["none"][protocol].append(score(plain, b, costs))
            stated = {kind: guarantees[(kind, "label")] for kind in ("ltt", "crc")} | {"none": _none(eps_pt)}
            out[cand.name][eps_pt] = {
                kind: {p: summarize(fits[kind][p], stated[kind], metric) for p in PROTOCOLS} for kind in GUARANTEE_KINDS
            }
            ltt_b, none_b = (out[cand.name][eps_pt][k]["cross_fit"] for k in ("ltt", "none"))
            log(
                f"  {cand.name} eps {eps_pt:g} pt, cross-fit: LTT P(drop>eps) {ltt_b['violation_rate']:.2f} "
                f"cut {100 * ltt_b['mean_cut']:.1f} %; plain P {none_b['violation_rate']:.2f} "
                f"cut {100 * none_b['mean_cut']:.1f} %"
            )
    return out


def _none(eps_pt: float) -> Guarantee:
    """The plain search has no delta; a Guarantee object only carries its epsilon into the summary."""
    return Guarantee("none", eps_pt / 100.0)


def best_under_guarantee(results: dict, baselines: list[str], eps_pt: float, kind: str, protocol: str) -> str | None:
    """The baseline with the largest mean cut that keeps the promise (LTT: violation rate ≤ delta;
    CRC and none: mean drop ≤ epsilon)."""
    kept = []
    for name in baselines:
        row = results[name][eps_pt][kind][protocol]
        if promise_kept(row, kind):
            kept.append((row["mean_cut"], name))
    return max(kept)[1] if kept else None


def promise_kept(row: dict, kind: str) -> bool:
    if kind == "ltt":
        return row["violation_rate"] <= row["delta"] + 1e-12
    return row["mean_drop_pt"] <= row["epsilon_pt"] + 1e-9


__all__ = ["PROTOCOLS", "Candidate", "best_under_guarantee", "promise_kept", "run_protocols", "summarize"]


# ---------------------------------------------------------------------------------------------------
# Report: tables, the four-task headline, the frontier with intervals
# ---------------------------------------------------------------------------------------------------

PROTOCOL_TITLES = {
    "train_split": "(a) training-file split",
    "cross_fit": "(b) cross-fit on dev halves",
    "label_free": "(c) label-free dev halves",
}


def _ci(pair: list[float] | None, scale: float = 1.0, fmt: str = ".2f") -> str:
    return "" if pair is None else f" [{scale * pair[0]:{fmt}}, {scale * pair[1]:{fmt}}]"


def promise_row(label: str, kind: str, protocol: str, row: dict) -> str:
    smallest = row.get("smallest_certifiable_epsilon_pt")
    small_cut = row.get("smallest_certifiable_cut")
    small = "—" if smallest is None else f"{smallest:.2f} pt" + ("" if small_cut is None else f" ({small_cut:.1%})")
    certified = "—" if "certified_rate" not in row else f"{row['certified_rate']:.0%}"
    metric_drop = "" if row["metric"] == "accuracy" else f" | {row['metric_mean_drop_pt']:+.2f}"
    kept = "yes" if promise_kept(row, kind) else "**no**"
    return (
        f"| {label} | {kind} | {PROTOCOL_TITLES[protocol]} | {row['violation_rate']:.2f}"
        f"{_ci(row['violation_rate_ci95'])} | {row['mean_drop_pt']:+.2f}{_ci(row['mean_drop_pt_ci95'])}"
        f"{metric_drop} | {100 * row['mean_cut']:.1f} %{_ci(row['mean_cut_ci95'], 100, '.1f')} | {certified} | "
        f"{small} | {kept} | {row['n_fits']} |"
    )


def promise_markdown(name: str, task: dict) -> list[str]:
    """The task's promise section: cartosplit under every guarantee and protocol, then every method."""
    metric = task["metric"]
    eps = next(iter(task["promise"]["ltt"].values()))["epsilon_pt"]
    delta = next(iter(task["promise"]["ltt"].values()))["delta"]
    metric_head = "" if metric == "accuracy" else f" | mean {metric} drop (pt)"
    head = (
        f"| method | guarantee | protocol | P(drop > {eps:g} pt) [95 % CI] | mean drop (pt) [CI]{metric_head} "
        "| mean cut [CI] | certified | smallest certifiable ε (its cut) | kept | fits |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [
        "",
        f"### The promise on {name}: ε = {eps:g} pt, δ = {delta:g}",
        "",
        "Kept = LTT: P(drop > ε) ≤ δ; CRC and the plain search: mean drop ≤ ε. Drops in accuracy points (what "
        "the per-sample loss bounds); a refused fit deploys all-cloud (drop 0, cut 0).",
        "",
        head,
        sep,
    ]
    for kind in GUARANTEE_KINDS:
        for protocol in PROTOCOLS:
            lines.append(promise_row("cartosplit", kind, protocol, task["promise"][kind][protocol]))
    lines += ["", "Every method under the same protocols:", "", head, sep]
    key = f"{eps:g}"
    for method, by_eps in task["promise_methods"].items():
        if method == "cartosplit":
            continue
        for kind in GUARANTEE_KINDS:
            for protocol in PROTOCOLS:
                lines.append(promise_row(method, kind, protocol, by_eps[key][kind][protocol]))
    best = task["promise_best_baseline"]
    lines += [
        "",
        "Best baseline that keeps the promise (largest mean cut): "
        + "; ".join(f"{k} {PROTOCOL_TITLES[p]}: `{best[k][p]}`" for k in GUARANTEE_KINDS for p in PROTOCOLS),
        "",
        f"![{name} promise frontier](tradeoff-{name}-promise.png)",
    ]
    return lines


def headline(tasks: dict) -> dict:
    """Mean cut over the tasks for each guarantee and protocol, whether each task kept the promise, and
    the best baseline's mean cut under the same guarantee (per task, the baseline that kept it)."""
    out: dict = {}
    for kind in GUARANTEE_KINDS:
        out[kind] = {}
        for protocol in PROTOCOLS:
            rows = {t: v["promise"][kind][protocol] for t, v in tasks.items() if "promise" in v}
            if not rows:
                continue
            baseline_cuts = []
            for t, v in tasks.items():
                if "promise" not in v:
                    continue
                name = v["promise_best_baseline"][kind][protocol]
                eps = f"{rows[t]['epsilon_pt']:g}"
                baseline_cuts.append(
                    0.0 if name is None else v["promise_methods"][name][eps][kind][protocol]["mean_cut"]
                )
            out[kind][protocol] = {
                "mean_cut": float(np.mean([r["mean_cut"] for r in rows.values()])),
                # a task whose promise broke counts 0: the cut "at a kept promise"
                "mean_cut_kept": float(
                    np.mean([r["mean_cut"] if promise_kept(r, kind) else 0.0 for r in rows.values()])
                ),
                "kept_on": [t for t, r in rows.items() if promise_kept(r, kind)],
                "tasks": list(rows),
                "best_baseline_mean_cut": float(np.mean(baseline_cuts)),
            }
    return out


def headline_markdown(head: dict) -> list[str]:
    lines = [
        "",
        "## Headline: mean cost cut over the tasks at the promise",
        "",
        "| guarantee | protocol | cartosplit mean cut | at a kept promise (0 where broken) | kept on "
        "| best baseline (kept) mean cut |",
        "|---|---|---|---|---|---|",
    ]
    for kind, by_protocol in head.items():
        for protocol, row in by_protocol.items():
            lines.append(
                f"| {kind} | {PROTOCOL_TITLES[protocol]} | {100 * row['mean_cut']:.1f} % | "
                f"{100 * row['mean_cut_kept']:.1f} % | "
                f"{', '.join(row['kept_on']) or 'none'} of {len(row['tasks'])} | "
                f"{100 * row['best_baseline_mean_cut']:.1f} % |"
            )
    return lines


def plot_promise(name: str, task: dict, out) -> None:
    """Mean cut vs mean drop under cross-fit, per guarantee, for cartosplit and the cascade, across ε,
    with 95 % intervals on both."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    styles = {"ltt": "o-", "crc": "s--", "none": "x:"}
    for ax, protocol in zip(axes, ("cross_fit", "label_free"), strict=True):
        for method in ("cartosplit", "dimee_thresholds", "confidence_exit"):
            for kind in GUARANTEE_KINDS:
                pts = sorted((float(e), rows[kind][protocol]) for e, rows in task["promise_methods"][method].items())
                cut = np.array([100 * r["mean_cut"] for _, r in pts])
                drop = np.array([r["mean_drop_pt"] for _, r in pts])
                cut_err = np.array([[c - 100 * r["mean_cut_ci95"][0], 100 * r["mean_cut_ci95"][1] - c]
                                    for c, (_, r) in zip(cut, pts, strict=True)]).T  # fmt: skip
                drop_err = np.array([[d - r["mean_drop_pt_ci95"][0], r["mean_drop_pt_ci95"][1] - d]
                                     for d, (_, r) in zip(drop, pts, strict=True)]).T  # fmt: skip
                ax.errorbar(cut, drop, xerr=cut_err, yerr=drop_err, fmt=styles[kind], ms=4, capsize=2,
                            label=f"{method} {kind}", alpha=0.85)  # fmt: skip
        for e in sorted({float(e) for e in task["promise_methods"]["cartosplit"]}):
            ax.axhline(e, color="grey", lw=0.5, ls="--")
        ax.set_xlabel("mean cost cut vs all-cloud (%)")
        ax.set_title(f"{name}: {PROTOCOL_TITLES[protocol]} (grey lines: ε)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean dev-half accuracy drop (pt)")
    axes[1].legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
