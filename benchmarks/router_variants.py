"""Router variants (kind x depth) against the max-softmax cascade, on one trained run.

    python -m benchmarks.router_variants --run runs/sst2-4k --out benchmarks/results/sst2-4k-router-variants

Writes <out>.json (every calibration summary) and <out>.md (one table, dev and calibration split),
with the command, the machine and the time. The run's own router and calibration.json are untouched.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from benchmarks.machine import describe_machine
from device_runtime.policy import Objective
from export.calibrate import CalibrateConfig, calibrate
from export.router import ROUTER_KINDS, RouterConfig
from export.train import load_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--max-drop", type=float, default=0.5)
    parser.add_argument("--costs", help="JSON cost profile (default: unit convention)")
    args = parser.parse_args(argv)

    _, tcfg = load_run(args.run)
    depths = range(tcfg.device_split + 1)
    variants = [(kind, depth) for depth in depths for kind in ROUTER_KINDS]
    started = time.time()
    summaries = []
    for kind, depth in tqdm(variants, desc="router variants"):
        cfg = CalibrateConfig(
            run=args.run,
            router=RouterConfig(kind=kind, depth=depth),
            costs=args.costs,
            objective=Objective("max-drop", args.max_drop),
            guarantee="none",  # the variants compared as the plain search chose them (no guarantee)
            write=False,
        )
        summaries.append(calibrate(cfg, log=lambda *_: None))

    command = "python -m benchmarks.router_variants " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    header = {
        "command": command,
        "machine": describe_machine(),
        "seconds": round(time.time() - started, 1),
        "run": args.run,
        "task": tcfg.task,
        "model": tcfg.model,
        "train_samples": tcfg.train_size,
        "calib_samples": tcfg.calib_size,
        "epochs": tcfg.epochs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "variants": summaries}, indent=2) + "\n")

    lines = [
        f"# Router variants vs the cascade — {tcfg.task}, {tcfg.model}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {header['machine']}  ",
        f"Run: {tcfg.train_size} training samples x {tcfg.epochs} epochs, {tcfg.calib_size} calibration samples; "
        f"objective: lowest cost within {args.max_drop} pt of all-cloud on the calibration split; "
        f"cost profile: {summaries[0]['cost_profile']['source']}.",
        "",
        "| split | policy | router held-out acc. (majority) | accuracy | drop pt | mean cost | cut vs all-cloud "
        "| device / edge / cloud |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for split in ("dev", "calib"):
        first = summaries[0]["results"][split]
        for name in ("all-cloud", "cascade (max-softmax)", "oracle"):
            lines.append(_row(split, name, first[name], ""))
        for s in summaries:
            r = s["router"]
            name = f"dimec-dc ({r['kind']}@{r['depth']})"
            acc = f"{r['holdout_accuracy']:.3f} ({r['majority_accuracy']:.3f})"
            lines.append(_row(split, name, s["results"][split][name], acc))
    lines += ["", f"Took {header['seconds']} s (forward passes cached in the run)."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _row(split: str, name: str, r: dict, router: str) -> str:
    s = r["shares"]
    cloud = s["cloud_via_edge"] + s["cloud_direct"]
    return (
        f"| {split} | {name} | {router} | {r['accuracy']:.4f} | {r['accuracy_drop_points']:.2f} | {r['mean_cost']:.3f} "
        f"| {r['cost_reduction_vs_all_cloud']:.1%} | {s['device']:.0%} / {s['edge']:.0%} / {cloud:.0%} |"
    )


if __name__ == "__main__":
    sys.exit(main())
