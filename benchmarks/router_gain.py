"""Does the router earn its place? Every router variant against the cascade, at the same guarantee, per cost profile.

    cartosplit bench router --task sst2 --task mrpc --task rte --task cola

Per task (a trained run from ``bench tradeoff``; a run under ``--heldout-runs-dir`` is preferred when it
recorded the calibration split's dynamics, which the held-out groups need):

1. the calibration split from the training file is cut once per ``--splits`` seed into path samples
   (a third) and certifying samples; dev is only ever evaluated;
2. every variant is fitted (``cartosplit.export.router_variant``): kind (logreg, knn, logreg with free features)
   x depth 0..d x target (train / held-out cartography, fixed / adaptive grouping, or the outcome);
   its verdict (group accuracy vs the majority, AUROC of P(hard) vs the device confidence's on
   "no early exit is right") is taken on the path samples;
3. for each cost profile (unit, measured ms and mJ, the cited per-device x link profiles), the cascade
   and each variant are calibrated along their paths with the same guarantee (``--guarantee``, default
   CRC: E[risk] <= epsilon) and evaluated on dev, with paired bootstrap intervals;
4. a variant is deployable when calibration's verdict keeps it under that profile (it beats the
   majority group, and its path beats the cascade's by >= 1 % of all-cloud's cost on the half of the
   path samples it was not chosen on); the best variant is the deployable one that spares the most
   there, never chosen on dev or on the certifying samples, so its dev cut is an honest estimate;
   ``gain_pt`` = its dev cut minus the cascade's, in points of cost cut (0 when none is deployable);
5. the regime map: the best variants' gain over the cascade as the device's per-layer cost is scaled
   against the link (``router-regimes.png``), with the named device profiles marked on it.

Writes ``router.json`` (per task and profile: cascade_cut, best_variant, best_variant_cut, gain_pt,
guarantee; the variants' rows and verdicts under ``details``), ``router.md`` and ``router-regimes.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cartosplit.benchmarks.report import bench_command, bench_parser, pyplot
from cartosplit.device_runtime.costs import CostProfile
from cartosplit.device_runtime.policy import ExitSignals, answers, route

RESULTS = Path("benchmarks/results")
# (kind, groups, grouping) per depth: the paper's reading first, then each change the issue asks for
VARIANTS = (
    ("logreg", "train", "fixed"),  # the current router
    ("logreg", "train", "adaptive"),  # groups that adapt to the task
    ("logreg", "heldout", "fixed"),  # held-out groups
    ("logreg", "heldout", "adaptive"),
    ("knn", "train", "fixed"),  # the clustering reading
    ("knn", "heldout", "adaptive"),
    ("logreg", "outcome", "fixed"),  # the direct target
    ("logreg+free", "train", "fixed"),  # free features
    ("logreg+free", "outcome", "fixed"),
)
# the cited per-device profiles the variants are all compared under (the regime map covers the rest)
DEVICE_PROFILES = (
    "raspberry-pi-zero-2-w--wifi--ms",
    "raspberry-pi-4--wifi--ms",
    "raspberry-pi-4--lte--mJ",
    "raspberry-pi-5--wifi--ms",
    "phone-cortex-a76--lte--ms",
    "phone-cortex-a76--lte--mJ",
)
REGIME_FACTORS = tuple(float(f) for f in np.geomspace(1 / 16, 32, 10))  # x the Pi 4's per-layer cost
REGIME_BASES = {"wifi": "raspberry-pi-4--wifi--ms", "lte": "raspberry-pi-4--lte--ms"}
BOOT = 1000


def _router_config(kind: str, depth: int):
    from cartosplit.export.router import RouterConfig

    if kind == "logreg+free":
        return RouterConfig(kind="logreg", depth=depth, free_features=True)
    return RouterConfig(kind=kind, depth=depth)


def load_profiles(extra_dir: Path | None, names: tuple[str, ...] = DEVICE_PROFILES) -> dict[str, CostProfile]:
    """unit, the measured ms / mJ profiles of this repo's benchmarks, and the named per-device ones if written
    (``python -m cartosplit.benchmarks.device_profiles``)."""
    profiles = {"unit": CostProfile()}
    for name in ("ms", "mJ"):
        path = RESULTS / f"cost-profile-{name}.json"
        if path.is_file():
            profiles[f"measured-x86-{name}"] = CostProfile.from_json(path)
    for name in names:
        path = (extra_dir or Path(".")) / f"{name}.json"
        if path.is_file():
            profiles[name] = CostProfile.from_json(path)
    return profiles


def _dev_row(policy, signals: ExitSignals, labels: np.ndarray, tier_costs, all_cloud: float, idx) -> dict:
    """Cut (percent of all-cloud's cost) and accuracy drop on dev, with paired bootstrap arrays kept."""
    final = signals.predictions()[2]
    if policy is None:  # refused: all-cloud
        tiers = None
        cost = np.full(len(labels), all_cloud)
        given = final
    else:
        tiers = route(policy, signals)
        cost, given = tier_costs[tiers], answers(tiers, signals)
    lost = (final == labels).astype(float) - (given == labels).astype(float)
    boot_cut = 100 * (1 - cost[idx].mean(axis=1) / all_cloud)
    row = {
        "cut": float(100 * (1 - cost.mean() / all_cloud)),
        "acc_drop_pt": float(100 * lost.mean()),
        "acc_drop_pt_ci95": [float(v) for v in np.quantile(100 * lost[idx].mean(axis=1), [0.025, 0.975])],
        "cloud_direct": 0.0 if tiers is None else float((tiers == 3).mean()),
        "_boot_cut": boot_cut,
    }
    row["cut_ci95"] = [float(v) for v in np.quantile(boot_cut, [0.025, 0.975])]
    return row


def calibrate_one(fitted, use_router, data, path_idx, cert_idx, profile, guarantee, grid, idx, dev_labels):
    """One method (the cascade when ``fitted`` is None) under one profile: certified policy, dev row, path score."""
    from cartosplit.export.risk_control import calibrate_along_path, held_out_path_score, score_path

    depth = fitted.variant.router.depth if fitted is not None else 0
    split = data.model_config.split_points(depth)
    tier_costs, all_cloud = profile.tier_costs(split), profile.all_cloud_cost(split)
    probs_c, probs_d = data.forward["calib"][0], data.forward["dev"][0]
    rp_c = fitted.calib_probs if fitted is not None else None
    rp_d = fitted.dev_probs if fitted is not None else None
    calib = ExitSignals(probs_c[0], probs_c[1], probs_c[2], rp_c)
    dev = ExitSignals(probs_d[0], probs_d[1], probs_d[2], rp_d)
    labels = data.sets["calib"].labels
    pc = calibrate_along_path(
        calib.subset(path_idx), labels[path_idx], calib.subset(cert_idx), labels[cert_idx],
        tier_costs, all_cloud, guarantee, use_router, **grid,
    )  # fmt: skip
    row = _dev_row(pc.policy, dev, dev_labels, tier_costs, all_cloud, idx)
    row["certified"] = pc.policy is not None
    row["bound_pt"] = float(100 * pc.certification.bound) if pc.certification.bound is not None else None
    row["path_score"] = score_path(pc.path, calib.subset(path_idx), labels[path_idx], tier_costs, guarantee) / all_cloud
    # what calibration's verdict weighs: the path score on the half of the path samples not chosen on
    row["held_out_score"] = held_out_path_score(
        calib.subset(path_idx), labels[path_idx], tier_costs, all_cloud, guarantee, use_router, **grid
    )
    return row


def evaluate_task(task: str, run: Path, args: argparse.Namespace, profiles: dict[str, CostProfile]) -> dict:
    from cartosplit.export.calibrate import load_calibration_data, path_split
    from cartosplit.export.risk_control import Guarantee
    from cartosplit.export.router_variant import RouterVariant, fit_variant

    data = load_calibration_data(run)
    dev_labels = data.sets["dev"].labels
    idx = np.random.default_rng(12345).integers(0, len(dev_labels), (BOOT, len(dev_labels)))
    guarantee = Guarantee(args.guarantee, args.max_drop / 100, args.delta, "label")
    grid = {"grid_size": args.grid_size, "margin_grid_size": args.margin_grid_size}
    depths = range(data.train_config.device_split + 1)
    started = time.time()
    out = {"run": str(run), "heldout_dynamics": data.heldout_dynamics is not None, "splits": {}}
    for seed in args.split_seeds or range(args.splits):
        path_idx, cert_idx = path_split(len(data.sets["calib"]), 1 / 3, seed)
        fitted, skipped = [], []
        variants = [
            RouterVariant(_router_config(kind, depth), groups, grouping)
            for depth in depths
            for kind, groups, grouping in VARIANTS
            if kind in args.kinds
        ]
        for variant in tqdm(variants, desc=f"{task} fit routers (split {seed})", leave=False):
            if variant.groups == "heldout" and data.heldout_dynamics is None:
                skipped.append(variant.name)
                continue
            fitted.append(fit_variant(data, variant, path_idx))
        per_profile = {}
        if args.redo_regimes:  # only the regime map, for a task whose profiles are already measured
            return {"regimes": regime_sweep(fitted, data, path_idx, cert_idx, profiles, guarantee, grid, idx,
                                            dev_labels)}  # fmt: skip
        for pname, profile in tqdm(profiles.items(), desc=f"{task} profiles (split {seed})", leave=False):
            cascade = calibrate_one(None, False, data, path_idx, cert_idx, profile, guarantee, grid, idx, dev_labels)
            rows = []
            for f in fitted:
                row = calibrate_one(f, True, data, path_idx, cert_idx, profile, guarantee, grid, idx, dev_labels)
                gain_boot = row.pop("_boot_cut") - cascade["_boot_cut"]
                verdict = f.rejudge(cascade["held_out_score"] - row["held_out_score"])  # what it spares here
                row.update(
                    variant=f.variant.name,
                    kept=verdict.kept,
                    spared=cascade["held_out_score"] - row["held_out_score"],  # what the verdict weighed
                    gain_pt=row["cut"] - cascade["cut"],
                    gain_ci95=[float(v) for v in np.quantile(gain_boot, [0.025, 0.975])],
                )
                rows.append(row)
            cascade.pop("_boot_cut")
            per_profile[pname] = {"cascade": cascade, "variants": rows}
        verdicts = {
            f.variant.name: {
                **f.verdict.to_dict(),
                "group_shares": f.group_shares,
                "fitted_on": f.fitted_on,
            }
            for f in fitted
        }
        out["splits"][str(seed)] = {"profiles": per_profile, "verdicts": verdicts, "skipped": skipped}
        if seed == 0:
            out["regimes"] = regime_sweep(fitted, data, path_idx, cert_idx, profiles, guarantee, grid, idx, dev_labels)
    out["seconds"] = round(time.time() - started, 1)
    return out


def regime_sweep(fitted, data, path_idx, cert_idx, profiles, guarantee, grid, idx, dev_labels) -> dict:
    """Gain of the best kept variant (chosen on path samples) over the cascade as the device gets slower.

    One curve per link: the cited Pi 4 profile over Wi-Fi and over LTE with its per-layer device cost
    scaled (the other cited devices on that link differ from it only there, so they sit on the curve),
    against x = the device's cost to answer at its exit (d layers) / the all-cloud cost."""
    curves = {}
    for link, base_name in REGIME_BASES.items():
        base = profiles.get(base_name) or _load_device_profile(base_name)
        if base is None:
            continue
        # a shortlist: the five variants with the best path score under the base profile, to keep it fast
        scored = [
            (
                calibrate_one(f, True, data, path_idx, cert_idx, base, guarantee, grid, idx, dev_labels)[
                    "held_out_score"
                ],
                i,
            )
            for i, f in enumerate(fitted)
        ]
        shortlist = [fitted[i] for _, i in sorted(scored)[:5]]
        points = []
        for factor in tqdm(REGIME_FACTORS, desc=f"regimes {link}", leave=False):
            profile = replace(base, device_per_layer=base.device_per_layer * factor, source=f"{base_name} x{factor:g}")
            cascade = calibrate_one(None, False, data, path_idx, cert_idx, profile, guarantee, grid, idx, dev_labels)
            rows = [
                calibrate_one(f, True, data, path_idx, cert_idx, profile, guarantee, grid, idx, dev_labels)
                for f in shortlist
            ]
            spared = [cascade["held_out_score"] - r["held_out_score"] for r in rows]
            kept = [i for i in range(len(rows)) if shortlist[i].rejudge(spared[i]).kept]
            split = data.model_config.split_points(0)
            point = {
                "device_factor": factor,
                "ratio": device_share(profile, split),
                "cascade_cut": cascade["cut"],
            }
            if kept:
                best = max(kept, key=lambda i: spared[i])
                gain_boot = rows[best]["_boot_cut"] - cascade["_boot_cut"]
                point.update(
                    best_variant=shortlist[best].variant.name,
                    best_variant_cut=rows[best]["cut"],
                    gain_pt=rows[best]["cut"] - cascade["cut"],
                    gain_ci95=[float(v) for v in np.quantile(gain_boot, [0.025, 0.975])],
                )
            else:  # every router refused: the cascade is deployed, no gain
                point.update(best_variant=None, best_variant_cut=cascade["cut"], gain_pt=0.0, gain_ci95=[0.0, 0.0])
            points.append(point)
        curves[link] = {"base_profile": base_name, "points": points}
    return curves


def _load_device_profile(name: str) -> CostProfile | None:
    path = RESULTS / "device-profiles" / f"{name}.json"
    return CostProfile.from_json(path) if path.is_file() else None


def device_share(profile: CostProfile, split) -> float:
    """The device's cost to answer at its exit (d layers) over the all-cloud cost: the regime map's x."""
    return float(split.device * profile.device_per_layer / profile.all_cloud_cost(split))


def _best(res: dict) -> dict | None:
    """The deployable variant that spares the most on held-out path samples (never chosen on dev or on the
    certifying samples); None when calibration would refuse every one."""
    kept = [r for r in res["variants"] if r["kept"]]
    return max(kept, key=lambda r: res["cascade"]["held_out_score"] - r["held_out_score"]) if kept else None


def headline(task_result: dict, guarantee: dict) -> dict:
    """Per profile: the issue's keys on the first split; with more splits, the gain of each beside it."""
    splits = task_result["splits"]
    first = splits[min(splits, key=int)]
    out = {}
    for pname, res in first["profiles"].items():
        rows = res["variants"]
        if not rows:
            continue
        best = _best(res)
        cascade_cut = res["cascade"]["cut"]
        out[pname] = {
            "cascade_cut": round(cascade_cut, 2),
            "best_variant": best["variant"] if best else None,  # None: every variant refused, the cascade stays
            "best_variant_cut": round(best["cut"] if best else cascade_cut, 2),
            "gain_pt": round(best["gain_pt"] if best else 0.0, 2),
            "gain_ci95": [round(v, 2) for v in best["gain_ci95"]] if best else [0.0, 0.0],
            "cascade_acc_drop_pt": round(res["cascade"]["acc_drop_pt"], 2),
            "best_variant_acc_drop_pt": round((best or res["cascade"])["acc_drop_pt"], 2),
            "best_variant_acc_drop_pt_ci95": [round(v, 2) for v in (best or res["cascade"])["acc_drop_pt_ci95"]],
            "variants_kept": sum(r["kept"] for r in rows),
            "variants": len(rows),
            "best_on_dev_gain_pt": round(max(r["gain_pt"] for r in rows), 2),  # an upper bound: chosen on dev
            "guarantee": guarantee,
        }
        if len(splits) > 1:  # each path/certify cut of the calibration split, its own selection and verdicts
            gains = {}
            for key, split in sorted(splits.items(), key=lambda kv: int(kv[0])):
                if pname in split["profiles"]:
                    b = _best(split["profiles"][pname])
                    gains[key] = round(b["gain_pt"] if b else 0.0, 2)
            out[pname]["gain_pt_by_split"] = gains
            out[pname]["gain_pt_mean_over_splits"] = round(float(np.mean(list(gains.values()))), 2)
    return out


def plot_regimes(results: dict, profiles: dict[str, CostProfile], path: Path) -> None:
    plt = pyplot()

    from cartosplit.device_runtime.costs import SplitPoints

    links = sorted({link for res in results.values() for link in res.get("regimes", {})})
    fig, axes = plt.subplots(1, max(len(links), 1), figsize=(6 * max(len(links), 1), 4.5), sharey=True, squeeze=False)
    split = SplitPoints(router_depth=0, device=2, edge=4, total=6)
    for ax, link in zip(axes[0], links, strict=False):
        for task, res in results.items():
            pts = res.get("regimes", {}).get(link, {}).get("points", [])
            if not pts:
                continue
            x = [p["ratio"] for p in pts]
            ax.plot(x, [p["gain_pt"] for p in pts], marker="o", label=task)
            lo, hi = zip(*(p["gain_ci95"] for p in pts), strict=True)
            ax.fill_between(x, lo, hi, alpha=0.12)
        for name, profile in profiles.items():
            if f"--{link}--ms" in name:
                ratio = device_share(profile, split)
                ax.axvline(ratio, color="grey", lw=0.6, ls=":")
                ax.text(ratio, 0.98, name.split("--")[0], rotation=90, fontsize=7, va="top", ha="right",
                        color="grey", transform=ax.get_xaxis_transform())  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.axhline(3, color="tab:red", lw=0.6, ls="--", label="goal: +3 pt")
        ax.set_xscale("log")
        ax.set_xlabel(f"device cost to answer at its exit / all-cloud cost ({link}, ms)")
        ax.set_title(f"{link}: Pi 4 profile, device per-layer cost scaled")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("router gain over the cascade (pt of cost cut, dev)")
    fig.suptitle("Where the router pays: gain at the same guarantee (CRC, 0.5 pt)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _by_split(h: dict) -> str:
    if "gain_pt_by_split" not in h:
        return "—"
    return " / ".join(f"{g:+.1f}" for g in h["gain_pt_by_split"].values()) + f" ({h['gain_pt_mean_over_splits']:+.1f})"


def markdown(report: dict) -> str:
    lines = [
        "# Does the router earn its place?",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Guarantee: {report['guarantee']['statement']}; calibration split from the training file, a third "
        "shapes the path, two thirds certify; dev only evaluated. Cuts in % of all-cloud's cost; "
        "gain = best variant's cut − cascade's (points), the best variant chosen on held-out path samples.",
        "",
        "| task | profile | cascade cut (drop pt) | best kept variant (path-chosen) | its cut | its drop pt [95 % CI] "
        "| gain pt [95 % CI] | gain pt per calibration cut (mean) | kept / all | best on dev (upper bound) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for task, per in report["router"].items():
        for pname, h in per.items():
            lines.append(
                f"| {task} | {pname} | {h['cascade_cut']:.1f} ({h['cascade_acc_drop_pt']:+.2f}) "
                f"| {h['best_variant'] or 'none kept: cascade'} | {h['best_variant_cut']:.1f} "
                f"| {h['best_variant_acc_drop_pt']:+.2f} [{h['best_variant_acc_drop_pt_ci95'][0]:+.2f}, "
                f"{h['best_variant_acc_drop_pt_ci95'][1]:+.2f}] "
                f"| {h['gain_pt']:+.1f} [{h['gain_ci95'][0]:+.1f}, {h['gain_ci95'][1]:+.1f}] | {_by_split(h)} "
                f"| {h['variants_kept']} / {h['variants']} | {h['best_on_dev_gain_pt']:+.1f} |"
            )
    lines += ["", "## The variants' signals (split 0, path samples)", ""]
    lines += ["'kept' here is the verdict without a cost profile (group accuracy > majority and AUROC > the device", ""]
    lines += ["confidence's); under a profile the verdict asks instead that its path spare >= 1 % of all-cloud's", ""]
    lines += ["cost over the cascade's on held-out path samples (per profile in router.json).", ""]
    lines += ["| task | variant | kept | group acc. (majority) | AUROC router / device conf. | groups e/m/h |"]
    lines += ["|---|---|---|---|---|---|"]
    for task, res in report["details"].items():
        for name, v in res["splits"]["0"]["verdicts"].items():
            shares = "/".join(f"{100 * s:.0f}" for s in v["group_shares"].values())
            lines.append(
                f"| {task} | {name} | {'yes' if v['kept'] else 'no'} | {v['router_accuracy']:.3f} "
                f"({v['majority_accuracy']:.3f}) | {v['router_auroc']:.3f} / {v['confidence_auroc']:.3f} | {shares} |"
            )
    lines += ["", "## Regime map (the Pi 4 profile per link, device per-layer cost scaled; best kept of a", ""]
    lines += ["5-variant shortlist per point; x = device cost to answer at its exit / all-cloud cost)", ""]
    lines += ["| task | link | device factor | x | cascade cut | best kept variant | gain pt [95 % CI] |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for task, res in report["details"].items():
        for link, curve in res.get("regimes", {}).items():
            for p in curve.get("points", []):
                lines.append(
                    f"| {task} | {link} | x{p['device_factor']:.3g} | {p['ratio']:.3g} | {p['cascade_cut']:.1f} "
                    f"| {p['best_variant'] or 'none kept'} "
                    f"| {p['gain_pt']:+.1f} [{p['gain_ci95'][0]:+.1f}, {p['gain_ci95'][1]:+.1f}] |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("router", __doc__)
    parser.add_argument("--task", action="append", choices=("sst2", "mrpc", "rte", "cola"), required=True)
    parser.add_argument("--runs-dir", default="runs/bench", help="trained runs from `bench tradeoff`")
    parser.add_argument(
        "--heldout-runs-dir", default="runs/bench-ho", help="runs with held-out dynamics, preferred when finished"
    )
    parser.add_argument("--profiles-dir", default=str(RESULTS / "device-profiles"), help="per-device cost profiles")
    parser.add_argument("--guarantee", choices=("crc", "ltt"), default="crc")
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=0.1)
    parser.add_argument("--splits", type=int, default=1, help="path/certify cuts of the calibration split")
    parser.add_argument(
        "--split-seeds", type=int, nargs="+", help="exactly these cuts (e.g. 1 2, to add to a run of cut 0)"
    )
    kinds = sorted({k for k, _, _ in VARIANTS})
    parser.add_argument("--kinds", nargs="+", default=kinds, choices=kinds, help="leave some router kinds out")
    parser.add_argument("--grid-size", type=int, default=20)
    parser.add_argument("--margin-grid-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--redo-regimes", action="store_true", help="recompute only the regime map of tasks already measured"
    )
    parser.add_argument("--out", default=str(RESULTS / "router"), help="path prefix for .json, .md, -regimes.png")
    args = parser.parse_args(argv)

    import torch

    from cartosplit.benchmarks.machine import describe_machine
    from cartosplit.export.risk_control import Guarantee

    torch.set_num_threads(args.threads)
    profiles = load_profiles(Path(args.profiles_dir))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")  # resumable: finished tasks are kept across runs
    details = json.loads(partial.read_text()) if partial.is_file() else {}
    guarantee = Guarantee(args.guarantee, args.max_drop / 100, args.delta, "label")
    g = {"kind": args.guarantee, "epsilon_pt": args.max_drop, "delta": args.delta if args.guarantee == "ltt" else None,
         "statement": guarantee.describe()}  # fmt: skip
    started = time.time()
    for task in args.task:
        if args.redo_regimes and task in details:
            print(f"{task}: the regime map again", file=sys.stderr)
            details[task].update(evaluate_task(task, Path(details[task]["run"]), args, profiles))
            partial.write_text(json.dumps(details) + "\n")
            continue
        if task in details:
            continue
        heldout = Path(args.heldout_runs_dir) / task
        run = heldout if (heldout / "run.json").is_file() and _finished(heldout) else Path(args.runs_dir) / task
        print(f"{task}: {run}", file=sys.stderr)
        details[task] = evaluate_task(task, run, args, profiles)
        partial.write_text(json.dumps(details) + "\n")
    report = {
        "command": bench_command("router", argv),
        "machine": describe_machine(),
        "seconds": round(time.time() - started, 1),
        "guarantee": g,
        "profiles": {name: p.to_dict() for name, p in profiles.items()},
        "router": {task: headline(res, g) for task, res in details.items()},
        "details": details,
    }
    out.with_suffix(".json").write_text(json.dumps(_rounded(report), indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    plot_regimes(details, profiles, out.parent / f"{out.name}-regimes.png")
    print(markdown(report))
    return 0


def _rounded(value, digits: int = 4):
    """Floats to ``digits`` decimals: the committed JSON stays small and reads the same."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _finished(run: Path) -> bool:
    return json.loads((run / "run.json").read_text()).get("status") in ("trained", "calibrated")


if __name__ == "__main__":
    sys.exit(main())
