"""Fit the router and choose the policy thresholds on the held-out calibration split; report on dev.

The dev set is only ever evaluated: thresholds, margins and the router are chosen on the
calibration split (GLUE train samples kept out of training) and the training subset respectively.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from device_runtime.costs import TIER_CLOUD_DIRECT, TIER_DEVICE, TIER_EDGE, CostProfile
from device_runtime.policy import (
    ExitSignals,
    Objective,
    Outcome,
    evaluate_policy,
    evaluate_tiers,
    oracle_tiers,
    search_policy,
)
from device_runtime.text import encode, load_tokenizer
from export.model import MultiExitBert
from export.router import RouterConfig, fit_router, router_probs, save_router
from export.train import load_datasets, load_run, predict_probs

CALIBRATION_FILE = "calibration.json"


@dataclass
class CalibrateConfig:
    run: str
    router: RouterConfig = field(default_factory=RouterConfig)
    costs: str | None = None  # JSON cost profile; None = the default unit convention
    objective: Objective = field(default_factory=Objective)
    grid_size: int = 25
    margin_grid_size: int = 12
    batch_size: int = 64
    write: bool = True  # False: report only, leave the run's router and calibration.json as they are


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


def baselines(signals: ExitSignals, labels: np.ndarray, tier_costs: np.ndarray, all_cloud_cost: float) -> dict:
    """All-device, all-edge, all-cloud and the oracle (an upper bound on accuracy at the least cost)."""
    n = len(labels)
    preds = signals.predictions()
    rows = {
        "all-device": evaluate_tiers(np.full(n, TIER_DEVICE), preds[0], labels, tier_costs),
        "all-edge": evaluate_tiers(np.full(n, TIER_EDGE), preds[1], labels, tier_costs),
    }
    cloud = evaluate_tiers(np.full(n, TIER_CLOUD_DIRECT), preds[2], labels, tier_costs)
    cloud.mean_cost = all_cloud_cost  # raw input sent, nothing on the device: not the router's depth-r route
    rows["all-cloud"] = cloud
    tiers, answer = oracle_tiers(signals, labels)
    rows["oracle"] = evaluate_tiers(tiers, answer, labels, tier_costs)
    return rows


def _row(outcome: Outcome, reference: Outcome) -> dict:
    return {
        **outcome.to_dict(),
        "accuracy_drop_points": round(100 * (reference.accuracy - outcome.accuracy), 3),
        "cost_reduction_vs_all_cloud": 1.0 - outcome.mean_cost / reference.mean_cost,
    }


def format_table(rows: dict[str, dict], title: str) -> str:
    head = f"{'policy':<28}{'accuracy':>9}{'drop pt':>9}{'cost':>8}{'cut':>8}{'device':>8}{'edge':>7}{'cloud':>7}"
    lines = [title, head, "-" * len(head)]
    for name, r in rows.items():
        s = r["shares"]
        lines.append(
            f"{name:<28}{r['accuracy']:>9.4f}{r['accuracy_drop_points']:>9.2f}{r['mean_cost']:>8.3f}"
            f"{r['cost_reduction_vs_all_cloud']:>8.1%}{s['device']:>8.1%}{s['edge']:>7.1%}"
            f"{s['cloud_via_edge'] + s['cloud_direct']:>7.1%}"
        )
    return "\n".join(lines)


@dataclass
class CalibrationData:
    """What calibration and the benchmarks read from a trained run: the sets, their forward passes, the groups."""

    run: Path
    train_config: object  # export.train.TrainConfig
    model_config: object  # export.model.MultiExitConfig
    sets: dict  # name -> TextDataset for "train" (the trained subset), "calib" and "dev"
    forward: dict  # name -> (exit probabilities [3, N, K], {depth: pooled features [N, H]})
    groups: np.ndarray  # cartography group per trained sample


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
    depths = tuple(range(tcfg.device_split + 1))  # every router depth the device can use, computed once
    sets = {"train": pool.subset(train_idx), "calib": pool.subset(calib_idx), "dev": dev}
    forward = {
        name: _cached_forward(run, model, name, encode(tokenizer, ds.texts, ds.text_pairs), depths, batch_size)
        for name, ds in sets.items()
    }
    return CalibrationData(run, tcfg, model.config, sets, forward, groups)


def calibrate(cfg: CalibrateConfig, log=print) -> dict:
    started = time.time()
    run = Path(cfg.run)
    info, tcfg = load_run(run)
    if cfg.router.depth > tcfg.device_split:
        raise ValueError(
            f"router depth {cfg.router.depth} is past the device split ({tcfg.device_split}): "
            "the router must decide on the device, before the sample leaves it"
        )
    data = load_calibration_data(run, cfg.batch_size)
    sets, forward, groups = data.sets, data.forward, data.groups
    dev = sets["dev"]

    router, report = fit_router(forward["train"][1][cfg.router.depth], groups, cfg.router)
    if cfg.write:
        save_router(router, cfg.router, run / "router")
    signals = {}
    for name in ("calib", "dev"):
        probs, pooled = forward[name]
        signals[name] = ExitSignals(probs[0], probs[1], probs[2], router_probs(router, pooled[cfg.router.depth]))

    profile = CostProfile.from_json(cfg.costs) if cfg.costs else CostProfile()
    split = data.model_config.split_points(cfg.router.depth)
    tier_costs = profile.tier_costs(split)
    all_cloud_cost = profile.all_cloud_cost(split)
    calib_labels, dev_labels = sets["calib"].labels, dev.labels

    grid = {"grid_size": cfg.grid_size, "margin_grid_size": cfg.margin_grid_size}
    cascade = search_policy(signals["calib"], calib_labels, tier_costs, cfg.objective, use_router=False, **grid)
    dimec = search_policy(signals["calib"], calib_labels, tier_costs, cfg.objective, use_router=True, **grid)

    results, r = {}, cfg.router.depth
    for name, labels in (("calib", calib_labels), ("dev", dev_labels)):
        base = baselines(signals[name], labels, tier_costs, all_cloud_cost)
        reference = base["all-cloud"]
        rows = {k: _row(v, reference) for k, v in base.items()}
        for label, found in (("cascade (max-softmax)", cascade), (f"dimec-dc ({cfg.router.kind}@{r})", dimec)):
            rows[label] = _row(evaluate_policy(found.policy, signals[name], labels, tier_costs), reference)
        results[name] = rows

    summary = {
        "run": str(run),
        "task": tcfg.task,
        "objective": asdict(cfg.objective),
        "cost_profile": profile.to_dict(),
        "split_points": asdict(split),
        "tier_costs": dict(zip(("device", "edge", "cloud_via_edge", "cloud_direct"), tier_costs.tolist(), strict=True)),
        "all_cloud_cost": all_cloud_cost,
        "policy": dimec.policy.to_dict(),
        "cascade_policy": cascade.policy.to_dict(),
        "router": report.to_dict(),
        "results": results,
        "seconds": round(time.time() - started, 1),
    }
    if cfg.write:
        (run / CALIBRATION_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        info["status"] = "calibrated"
        (run / "run.json").write_text(json.dumps(info, indent=2) + "\n")

    obj = cfg.objective
    goal = f"max drop {obj.max_drop} pt" if obj.kind == "max-drop" else f"reward, beta {obj.beta}"
    log(
        f"router {report.kind}@depth {report.depth}: held-out accuracy {report.holdout_accuracy:.3f} "
        f"(majority {report.majority_accuracy:.3f}) on {report.holdout_samples} samples; confusion "
        f"(rows true easy/medium/hard): {report.confusion}"
    )
    log(f"policy: {_fmt_policy(dimec.policy.to_dict())}; cascade: {_fmt_policy(cascade.policy.to_dict())}")
    for name in ("calib", "dev"):
        n = len(calib_labels) if name == "calib" else len(dev_labels)
        log(format_table(results[name], f"\n{name} ({n} samples; objective: {goal}; cost unit: {profile.unit})"))
    if cfg.write:
        log(f"saved {run / CALIBRATION_FILE}")
    return summary


def _fmt_policy(p: dict) -> str:
    return ", ".join(f"{k}={'inf' if v is None else f'{v:.3f}'}" for k, v in p.items())


__all__ = ["CalibrateConfig", "CalibrationData", "baselines", "calibrate", "format_table", "load_calibration_data"]
