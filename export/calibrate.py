"""Fit the router and choose the policy thresholds on the held-out calibration split; report on dev.

The dev set is only ever evaluated: thresholds, margins and the router are chosen on the
calibration split (GLUE train samples kept out of training) and the training subset respectively.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cartosplit.device_runtime.costs import TIER_CLOUD_DIRECT, TIER_DEVICE, TIER_EDGE, CostProfile
from cartosplit.device_runtime.metrics import set_metric
from cartosplit.device_runtime.policy import (
    ExitSignals,
    Objective,
    answers,
    evaluate_tiers,
    oracle_tiers,
    route,
    search_policy,
)
from cartosplit.device_runtime.text import encode, load_tokenizer
from cartosplit.export.cartography import Cartography
from cartosplit.export.data import DataError, load_calibration_file, task_spec
from cartosplit.export.model import MultiExitBert
from cartosplit.export.risk_control import Guarantee, calibrate_along_path, held_out_path_score, plain_search_statement
from cartosplit.export.router import RouterConfig, save_router
from cartosplit.export.router_variant import FittedRouter, RouterVariant, fit_variant
from cartosplit.export.train import load_datasets, load_run, predict_probs

CALIBRATION_FILE = "calibration.json"
ROUTER_FIT_SAMPLES = 20_000  # the router is fitted on a random subset of at most this many trained samples


@dataclass
class CalibrateConfig:
    run: str
    router: RouterConfig = field(default_factory=RouterConfig)
    costs: str | None = None  # JSON cost profile or a profile name (pi4-wifi); None = the unit convention
    objective: Objective = field(default_factory=Objective)
    metric: str | None = None  # the set metric of the objective; None = the task's (cartosplit.export.data.TaskSpec)
    guarantee: str = "ltt"  # ltt | crc | none (cartosplit.export.risk_control)
    delta: float = 0.1  # LTT: P(risk > max_drop) <= delta
    reference: str = "label"  # label: 1[wrong and final right]; final: 1[answer != final exit's], no label
    calib_file: str | None = None  # the user's own in-domain calibration samples (labelled or not)
    path_fraction: float = 1 / 3  # without calib_file: share of the calibration split that shapes the path
    seed: int = 0
    router_groups: str = "train"  # what the router learns: cartosplit.export.router_targets.GROUP_SOURCES
    grouping: str = "fixed"  # fixed | adaptive (cartosplit.export.router_targets.GROUPINGS)
    keep_router: bool = False  # deploy the router even when it loses on held-out data (the verdict says so)
    grid_size: int = 25
    margin_grid_size: int = 12
    batch_size: int = 64
    write: bool = True  # False: report only, leave the run's router and calibration.json as they are


class UncertifiableError(ValueError):
    """The calibration samples cannot certify the asked bound: no policy is returned.

    ``smallest_epsilon_pt`` is the least bound (points) they certify with any saving, or None."""

    def __init__(self, message: str, smallest_epsilon_pt: float | None = None) -> None:
        super().__init__(message)
        self.smallest_epsilon_pt = smallest_epsilon_pt


def _cached_forward(run: Path, model: MultiExitBert, name: str, encoded: list, depths: tuple[int, ...], batch: int):
    """Exit probabilities and pooled features per split, cached in the run (invalidated by a newer model)."""
    cache = run / "cache" / f"{name}.npz"
    weights = run / "model" / "model.safetensors"
    if cache.is_file() and cache.stat().st_mtime >= weights.stat().st_mtime:
        with np.load(cache) as saved:
            if all(f"pooled_{d}" in saved for d in depths) and saved["probs"].shape[1] == len(encoded):
                return saved["probs"], {d: saved[f"pooled_{d}"] for d in depths}
    probs, pooled = predict_probs(model, encoded, batch, pooled_depths=depths, progress=f"forward {name}")
    cache.parent.mkdir(exist_ok=True)
    np.savez(cache, probs=probs, **{f"pooled_{d}": v for d, v in pooled.items()})
    return probs, pooled


def report_row(tiers: np.ndarray, given: np.ndarray, labels: np.ndarray, tier_costs: np.ndarray, metric: str) -> dict:
    """Accuracy, the set metric, mean cost and shares of one routing (drop and cut added by ``_relative``)."""
    outcome = evaluate_tiers(tiers, given, labels, tier_costs)
    return {**outcome.to_dict(), "metric": metric, "metric_value": set_metric(metric, given, labels)}


def baselines(
    signals: ExitSignals, labels: np.ndarray, tier_costs: np.ndarray, all_cloud_cost: float, metric: str
) -> dict:
    """All-device, all-edge, all-cloud and the oracle (an upper bound on accuracy at the least cost)."""
    n = len(labels)
    preds = signals.predictions()
    rows = {
        "all-device": report_row(np.full(n, TIER_DEVICE), preds[0], labels, tier_costs, metric),
        "all-edge": report_row(np.full(n, TIER_EDGE), preds[1], labels, tier_costs, metric),
    }
    cloud = report_row(np.full(n, TIER_CLOUD_DIRECT), preds[2], labels, tier_costs, metric)
    cloud["mean_cost"] = all_cloud_cost  # raw input sent, nothing on the device: not the router's depth-r route
    rows["all-cloud"] = cloud
    tiers, answer = oracle_tiers(signals, labels)
    rows["oracle"] = report_row(tiers, answer, labels, tier_costs, metric)
    return rows


def _relative(row: dict, reference: dict) -> dict:
    return {
        **row,
        "accuracy_drop_points": round(100 * (reference["accuracy"] - row["accuracy"]), 3),
        "metric_drop_points": round(100 * (reference["metric_value"] - row["metric_value"]), 3),
        "cost_reduction_vs_all_cloud": 1.0 - row["mean_cost"] / reference["mean_cost"],
    }


def format_table(rows: dict[str, dict], title: str) -> str:
    metric = next(iter(rows.values()))["metric"]
    extra = metric != "accuracy"
    head = f"{'policy':<28}{'accuracy':>9}{'drop pt':>9}"
    head += f"{metric:>8}{'drop pt':>9}" if extra else ""
    head += f"{'cost':>8}{'cut':>8}{'device':>8}{'edge':>7}{'cloud':>7}"
    lines = [title, head, "-" * len(head)]
    for name, r in rows.items():
        s = r["shares"]
        line = f"{name:<28}{r['accuracy']:>9.4f}{r['accuracy_drop_points']:>9.2f}"
        line += f"{r['metric_value']:>8.4f}{r['metric_drop_points']:>9.2f}" if extra else ""
        line += (
            f"{r['mean_cost']:>8.3f}{r['cost_reduction_vs_all_cloud']:>8.1%}{s['device']:>8.1%}{s['edge']:>7.1%}"
            f"{s['cloud_via_edge'] + s['cloud_direct']:>7.1%}"
        )
        lines.append(line)
    return "\n".join(lines)


@dataclass
class CalibrationData:
    """What calibration and the benchmarks read from a trained run: the sets, their forward passes, the groups.

    ``sets["train"]`` (what the router is fitted on) is a seeded random subset of at most
    ``ROUTER_FIT_SAMPLES`` of the trained samples."""

    run: Path
    train_config: object  # cartosplit.export.train.TrainConfig
    model_config: object  # cartosplit.export.model.MultiExitConfig
    sets: dict  # name -> TextDataset for "train" (the trained subset), "calib" and "dev"
    forward: dict  # name -> (exit probabilities [3, N, K], {depth: pooled features [N, H]})
    groups: np.ndarray  # cartography group per sample of sets["train"] (the run's fixed rule)
    trained_samples: int  # the run's whole training subset (sets["train"] is at most ROUTER_FIT_SAMPLES of it)
    train_carto: Cartography  # confidence / variability of sets["train"], for other groupings
    tokens: dict  # name -> token count per sample (the free router features read it)
    heldout_dynamics: tuple | None  # the calibration split's (gold_prob, correct) per epoch, if recorded


def load_calibration_data(run: str | Path, batch_size: int = 64) -> CalibrationData:
    """Load a trained run and run (or reuse the cached) forward passes over its three sets."""
    import torch

    run = Path(run)
    _, tcfg = load_run(run)
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    model = MultiExitBert.load(run / "model")
    tokenizer = load_tokenizer(run / "model" / "tokenizer.json", tcfg.max_length)
    pool, dev = load_datasets(tcfg)
    with np.load(run / "split.npz") as split:
        train_idx, calib_idx = split["train"], split["calib"]
    with np.load(run / "cartography.npz") as carto:
        groups = carto["groups"]
        train_carto = Cartography(carto["confidence"], carto["variability"], carto["correctness"])
    heldout = None
    with np.load(run / "dynamics.npz") as dyn:
        if "calib_gold_prob" in dyn and not np.isnan(dyn["calib_gold_prob"]).any():
            heldout = (dyn["calib_gold_prob"], dyn["calib_correct"])
    trained = len(train_idx)
    if trained > ROUTER_FIT_SAMPLES:
        # a router of a few thousand parameters learns no more from 60,000 samples than from 20,000,
        # and the forward pass over the rest would be the slowest step of calibration
        pick = np.sort(np.random.default_rng(0).choice(trained, ROUTER_FIT_SAMPLES, replace=False))
        train_idx, groups = train_idx[pick], groups[pick]
        train_carto = Cartography(*(a[pick] for a in (train_carto.confidence, train_carto.variability,
                                                       train_carto.correctness)))  # fmt: skip
    depths = tuple(range(tcfg.device_split + 1))  # every router depth the device can use, computed once
    sets = {"train": pool.subset(train_idx), "calib": pool.subset(calib_idx), "dev": dev}
    forward, tokens = {}, {}
    for name, ds in sets.items():
        encoded = encode(tokenizer, ds.texts, ds.text_pairs)
        tokens[name] = np.array([len(ids) for ids, _ in encoded], dtype=np.float32)
        forward[name] = _cached_forward(run, model, name, encoded, depths, batch_size)
    return CalibrationData(run, tcfg, model.config, sets, forward, groups, trained, train_carto, tokens, heldout)


def path_split(n_calib: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the calibration split that shape the path, and those that certify it (disjoint, seeded)."""
    order = np.random.default_rng(seed).permutation(n_calib)
    cut = max(1, round(fraction * n_calib))
    path_idx, cert_idx = np.sort(order[:cut]), np.sort(order[cut:])
    if len(cert_idx) == 0:
        raise DataError(f"the calibration split has {n_calib} samples: too few to shape a path and certify")
    return path_idx, cert_idx


def _calibration_samples(cfg: CalibrateConfig, data: CalibrationData, fitted: FittedRouter, path_idx, cert_idx):
    """(path signals, path labels, calibration signals, calibration labels or None, source): where the
    path is shaped and where the guarantee is certified, never the same samples."""
    calib = data.sets["calib"]
    split_signals = _signals(data.forward["calib"], fitted.calib_probs)
    if cfg.calib_file:
        user = load_calibration_file(cfg.calib_file, calib.label_names)
        if (user.text_pairs is None) != (calib.text_pairs is None):
            want = "text pairs (text, text_pair)" if calib.text_pairs is not None else "single texts"
            raise DataError(f"{cfg.calib_file}: this run's task takes {want}")
        forward, tokens = _cached_file_forward(data.run, cfg.calib_file, user, data, cfg.batch_size)
        source = f"{cfg.calib_file} ({len(user)} samples, {'labelled' if user.labels is not None else 'unlabelled'})"
        file_signals = _signals(forward, fitted.predict(forward[1][cfg.router.depth], tokens))
        return split_signals, calib.labels, file_signals, user.labels, source
    source = (
        f"the run's calibration split: {len(path_idx)} samples shape the path, {len(cert_idx)} certify it "
        "(held out from the training file; give in-domain samples with --calib-file)"
    )
    return (
        split_signals.subset(path_idx),
        calib.labels[path_idx],
        split_signals.subset(cert_idx),
        calib.labels[cert_idx],
        source,
    )


def _signals(forward: tuple, router_probs: np.ndarray) -> ExitSignals:
    probs = forward[0]
    return ExitSignals(probs[0], probs[1], probs[2], router_probs)


def _cached_file_forward(run: Path, path: str, user, data: CalibrationData, batch: int) -> tuple:
    """The forward pass over a --calib-file, cached under the file's content hash."""
    import hashlib

    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    model = MultiExitBert.load(run / "model")
    tokenizer = load_tokenizer(run / "model" / "tokenizer.json", data.train_config.max_length)
    depths = tuple(range(data.train_config.device_split + 1))
    encoded = encode(tokenizer, user.texts, user.text_pairs)
    tokens = np.array([len(ids) for ids, _ in encoded], dtype=np.float32)
    return _cached_forward(run, model, f"calibfile-{digest}", encoded, depths, batch), tokens


def calibrate(cfg: CalibrateConfig, log=print) -> dict:
    """Fit the router and choose the thresholds; with a guarantee, certify them or refuse.

    Raises ``UncertifiableError`` (nothing written) when the calibration samples cannot certify
    ``max_drop`` at the asked guarantee; its message names the smallest bound they can certify."""
    started = time.time()
    run = Path(cfg.run)
    info, tcfg = load_run(run)
    if cfg.router.depth > tcfg.device_split:
        raise ValueError(
            f"router depth {cfg.router.depth} is past the device split ({tcfg.device_split}): "
            "the router must decide on the device, before the sample leaves it"
        )
    if cfg.guarantee != "none" and cfg.objective.kind != "max-drop":
        raise ValueError("a guarantee bounds the drop: use --objective max-drop, or --guarantee none for reward")
    data = load_calibration_data(run, cfg.batch_size)
    sets, forward = data.sets, data.forward
    dev = sets["dev"]

    n_calib = len(sets["calib"])
    # with a --calib-file the whole split shapes the path and the file certifies
    path_idx, cert_idx = (
        (np.arange(n_calib), None) if cfg.calib_file else path_split(n_calib, cfg.path_fraction, cfg.seed)
    )
    variant = RouterVariant(cfg.router, cfg.router_groups, cfg.grouping)
    fitted = fit_variant(data, variant, path_idx, keep_anyway=cfg.keep_router)
    router = fitted.router
    signals = {
        "calib": _signals(forward["calib"], fitted.calib_probs),
        "dev": _signals(forward["dev"], fitted.dev_probs),
    }
    path_signals, path_labels, cal_signals, cal_labels, source = _calibration_samples(
        cfg, data, fitted, path_idx, cert_idx
    )

    profile = CostProfile.load(cfg.costs) if cfg.costs else CostProfile()
    split = data.model_config.split_points(cfg.router.depth)
    tier_costs = profile.tier_costs(split)
    all_cloud_cost = profile.all_cloud_cost(split)
    calib_labels, dev_labels = sets["calib"].labels, dev.labels
    reference = cfg.reference
    if cal_labels is None and reference == "label":
        reference = "final"
        log("the calibration samples have no labels: the risk is the disagreement with the final exit")
    metric = cfg.metric or _task_metric(tcfg)
    cfg = replace(cfg, objective=replace(cfg.objective, metric=metric))

    grid = {"grid_size": cfg.grid_size, "margin_grid_size": cfg.margin_grid_size}
    # the verdict weighs what the router's path spares against the cascade's under this profile, on the
    # path samples only (the certifying ones are never used to choose), each path scored on the half of
    # them it was not chosen on
    judged_by = Guarantee("crc" if cfg.guarantee == "none" else cfg.guarantee,
                          min(max(cfg.objective.max_drop / 100.0, 1e-4), 0.99), cfg.delta, reference)  # fmt: skip
    path_lab = path_labels if reference == "label" else None
    scores = [
        held_out_path_score(path_signals, path_lab, tier_costs, all_cloud_cost, judged_by, routed, cfg.seed, **grid)
        for routed in (False, True)
    ]
    verdict = fitted.rejudge(scores[0] - scores[1], cfg.keep_router)
    fitted.verdict = verdict
    use_router = verdict.kept  # a router that lost on held-out data is not deployed: the policy is the cascade
    certification = {}
    if cfg.guarantee == "none":
        # the plain search on the calibration samples; unlabelled ones bound the disagreement instead
        fit_labels = cal_labels if cal_labels is not None and reference == "label" else cal_signals.predictions()[2]
        objective = cfg.objective if fit_labels is cal_labels else Objective("max-drop", cfg.objective.max_drop)
        cascade = search_policy(cal_signals, fit_labels, tier_costs, objective, use_router=False, **grid).policy
        dimec = search_policy(cal_signals, fit_labels, tier_costs, objective, use_router=use_router, **grid).policy
        guarantee = None
    else:
        guarantee = Guarantee(cfg.guarantee, cfg.objective.max_drop / 100.0, cfg.delta, reference)
        found = {}
        for name, routed in (("cascade", False), ("dimec", True)):
            if routed and not use_router:
                found[name] = found["cascade"]  # the refused router's policy is the cascade's
            else:
                found[name] = calibrate_along_path(
                    path_signals, path_labels if reference == "label" else None, cal_signals, cal_labels,
                    tier_costs, all_cloud_cost, guarantee, routed, **grid,
                )  # fmt: skip
            certification[name] = found[name].certification.to_dict()
        if found["dimec"].policy is None:
            cert = found["dimec"].certification
            smallest = cert.smallest_certifiable_epsilon
            raise UncertifiableError(
                _refusal(guarantee, cert, all_cloud_cost, source), None if smallest is None else 100 * smallest
            )
        # Only the router's path is deployed: taking the cheaper of two certified paths would test twice
        # at delta and void the bound. The cascade's path (one of the router's candidate shapes) is
        # certified on its own for the report only.
        cascade, dimec = found["cascade"].policy, found["dimec"].policy
    if cfg.write:
        save_router(router, cfg.router, run / "router")

    results, r = {}, cfg.router.depth
    dimec_label = f"dimec-dc ({cfg.router.kind}@{r})"
    for name, labels in (("calib", calib_labels), ("dev", dev_labels)):
        base = baselines(signals[name], labels, tier_costs, all_cloud_cost, metric)
        rows = {k: _relative(v, base["all-cloud"]) for k, v in base.items()}
        for label, policy in (("cascade (max-softmax)", cascade), (dimec_label, dimec)):
            if policy is None:
                continue  # the cascade alone could not be certified
            tiers = route(policy, signals[name])
            rows[label] = _relative(report_row(tiers, answers(tiers, signals[name]), labels, tier_costs, metric),
                                    base["all-cloud"])  # fmt: skip
        results[name] = rows

    summary = {
        "run": str(run),
        "task": tcfg.task,  # None: the run's own data files (below), not a GLUE task
        "data_files": [tcfg.train_file, tcfg.dev_file] if tcfg.train_file else None,
        "objective": asdict(cfg.objective),
        "guarantee": {
            "kind": cfg.guarantee,
            "epsilon_pt": cfg.objective.max_drop,
            "delta": cfg.delta if cfg.guarantee == "ltt" else None,
            "reference": reference,
            "statement": guarantee.describe() if guarantee else plain_search_statement(cfg.objective.max_drop),
            "calib_file": cfg.calib_file,
            "calibration_samples": source,
            "certification": certification.get("dimec") if guarantee else None,
            "cascade_certification": certification.get("cascade") if guarantee else None,
        },
        "cost_profile": profile.to_dict(),
        "split_points": asdict(split),
        "tier_costs": dict(zip(("device", "edge", "cloud_via_edge", "cloud_direct"), tier_costs.tolist(), strict=True)),
        "all_cloud_cost": all_cloud_cost,
        "policy": dimec.to_dict(),
        "cascade_policy": cascade.to_dict() if cascade is not None else None,
        "router": fitted.summary(),
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    if cfg.write:
        (run / CALIBRATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        info["status"] = "calibrated"
        (run / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    log(
        f"router {variant.name}, fitted on {fitted.fitted_on}; groups easy/medium/hard "
        + "/".join(f"{v:.0%}" for v in fitted.group_shares.values())
        + f"; {verdict.reason} (on {verdict.samples} held-out calibration samples)"
    )
    cascade_text = _fmt_policy(cascade.to_dict()) if cascade is not None else "not certified"
    log(f"policy: {_fmt_policy(dimec.to_dict())}; cascade: {cascade_text}")
    log(f"guarantee: {summary['guarantee']['statement']}")
    log(f"calibration samples: {source}")
    if guarantee is not None:
        c = certification["dimec"]
        log(
            f"certified bound {100 * c['bound']:.3f} pt on {c['n']} samples "
            f"(empirical risk {100 * c['empirical_risk']:.3f} pt)"
        )
    for name in ("calib", "dev"):
        n = len(calib_labels) if name == "calib" else len(dev_labels)
        log(format_table(results[name], f"\n{name} ({n} samples; cost unit: {profile.unit})"))
    dev_row = results["dev"][dimec_label]
    log(
        f"dev drop measured against all-cloud: {dev_row['accuracy_drop_points']:+.2f} pt accuracy"
        + (f", {dev_row['metric_drop_points']:+.2f} pt {metric}" if metric != "accuracy" else "")
        + f" at a {dev_row['cost_reduction_vs_all_cloud']:.1%} cut (the dev set was not used to calibrate)"
    )
    if cfg.write:
        log(f"saved {run / CALIBRATION_FILE}")
    return summary


def _task_metric(tcfg) -> str:
    """GLUE's metric for a GLUE task; accuracy for a user's own files (unless --metric says otherwise)."""
    if tcfg.train_file:
        return "accuracy"
    try:
        return task_spec(tcfg.task).metric
    except DataError:
        return "accuracy"


def _refusal(guarantee: Guarantee, cert, all_cloud_cost: float, source: str) -> str:
    eps = f"{100 * guarantee.epsilon:g} pt"
    if cert.smallest_certifiable_epsilon is None:
        smallest = "no bound certifies a policy cheaper than all-cloud on them"
    else:
        cut = 1 - cert.smallest_certifiable_cost / all_cloud_cost
        smallest = (
            f"the smallest certifiable bound is {100 * cert.smallest_certifiable_epsilon:.2f} pt "
            f"(a {cut:.1%} cut on the calibration samples)"
        )
    floor = ""
    if guarantee.kind == "ltt":
        need = math.ceil(math.log(guarantee.delta) / math.log(1 - guarantee.epsilon))
        floor = f"; certifying {eps} at delta {guarantee.delta:g} needs at least {need} samples even with none lost"
    return (
        f"cannot certify a drop of at most {eps} ({guarantee.describe()}) with {cert.n} calibration samples: "
        f"{smallest}{floor}. Calibration samples: {source}. Give more in-domain samples (--calib-file), "
        "or a larger --max-drop; no policy was written"
    )


def _fmt_policy(p: dict) -> str:
    return ", ".join(f"{k}={'inf' if v is None else f'{v:.3f}'}" for k, v in p.items())


__all__ = [
    "CalibrateConfig",
    "CalibrationData",
    "UncertifiableError",
    "baselines",
    "calibrate",
    "format_table",
    "load_calibration_data",
]
