"""The workstation commands of ``cartosplit``: train, calibrate, export, demo.

Each command is ``add_<name>_arguments(parser)`` and ``cmd_<name>(args) -> int`` over one library call;
``cartosplit.cli`` imports this module only for these commands. The imports below are at module level on
purpose: on an install without torch or transformers, importing this module fails and the CLI turns that
into the install hint before any work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import transformers  # noqa: F401  (loaded lazily by export.model; every command here needs it)

from cartosplit.cli_args import comma_list, positive_int, train_size
from cartosplit.device_runtime.bundle import load_bundle, refused_formats
from cartosplit.device_runtime.defaults import DEFAULT_DEVICE_SPLIT, DEFAULT_EDGE_SPLIT, DEFAULT_MODEL
from cartosplit.device_runtime.policy import Objective
from cartosplit.export.bundle_writer import ExportConfig, ExportRefused, export_bundle
from cartosplit.export.calibrate import CalibrateConfig, calibrate
from cartosplit.export.cartography import GroupingRule
from cartosplit.export.demo import run_demo
from cartosplit.export.quiet import quiet_known_noise
from cartosplit.export.router import RouterConfig
from cartosplit.export.train import TrainConfig, train

quiet_known_noise()  # before anything imports torchao (litert-torch does): two harmless log lines, see quiet.py

# --- train ------------------------------------------------------------------------------------------------


def _add_train_options(p: argparse.ArgumentParser, out_default: str | None, size: int, calib: int, epochs: int) -> None:
    data = p.add_argument_group("data")
    data.add_argument(
        "--task",
        help="GLUE task: sst2, cola, mrpc or rte (default: sst2; with --train-file none: the run is labelled by "
        "its data files, never as a GLUE task)",
    )
    data.add_argument(
        "--data-dir",
        help="folder with <TASK>/train.tsv and dev.tsv in the GLUE layout; default: $CARTOSPLIT_DATA_DIR, "
        "then ../shared/data/glue, then the Hugging Face `datasets` download",
    )
    data.add_argument("--train-file", help="your own CSV/JSONL (text, optional text_pair, label) instead of GLUE")
    data.add_argument("--dev-file", help="the matching dev file, for reporting (needed with --train-file)")
    data.add_argument(
        "--train-size",
        type=train_size,
        default=size,
        help="training samples drawn from the training file, or 'all' (default: %(default)s)",
    )
    data.add_argument(
        "--calib-size",
        type=positive_int,
        default=calib,
        help="training-file samples held out to calibrate thresholds, never trained on (default: %(default)s)",
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face BERT-family id or local folder")
    model.add_argument(
        "--device-split", type=int, default=DEFAULT_DEVICE_SPLIT, help="layers on the device (default: %(default)s)"
    )
    model.add_argument(
        "--edge-split", type=int, default=DEFAULT_EDGE_SPLIT, help="depth reached on the edge (default: %(default)s)"
    )
    model.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="exit pooling (default: mean)")
    model.add_argument("--max-length", type=positive_int, default=128, help="truncate inputs to this many tokens")
    opt = p.add_argument_group("training")
    opt.add_argument("--epochs", type=positive_int, default=epochs, help="(default: %(default)s)")
    opt.add_argument("--batch-size", type=positive_int, default=32, help="(default: %(default)s)")
    opt.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (default: %(default)s)")
    opt.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    opt.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    carto = p.add_argument_group("cartography (easy = learned by the device exit, medium = by the edge exit)")
    carto.add_argument("--min-confidence", type=float, default=0.75, help="learned: mean gold prob >= this")
    carto.add_argument("--max-variability", type=float, default=0.2, help="learned: std of gold prob <= this")
    p.add_argument("--out", default=out_default, help="run folder (default: runs/<task>)")


def _task(args: argparse.Namespace) -> str | None:
    # a user's own files are not SST-2: the run, calibration.json and the manifest say "own data" (task None)
    if args.task is None:
        return None if args.train_file else "sst2"
    return args.task


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        task=_task(args),
        out=args.out or f"runs/{_task(args) or Path(args.train_file).stem}",
        model=args.model,
        data_dir=args.data_dir,
        train_file=args.train_file,
        dev_file=args.dev_file,
        train_size=args.train_size,
        calib_size=args.calib_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        device_split=args.device_split,
        edge_split=args.edge_split,
        pooling=args.pooling,
        seed=args.seed,
        threads=args.threads,
        grouping=GroupingRule(args.min_confidence, args.max_variability),
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit train``."""
    _add_train_options(parser, None, size=4000, calib=2000, epochs=3)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")


def cmd_train(args: argparse.Namespace) -> int:
    """``cartosplit train``."""
    train(_train_config(args), resume=args.resume)
    return 0


# --- calibrate --------------------------------------------------------------------------------------------


def _add_calibrate_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("router")
    r.add_argument(
        "--router",
        choices=("logreg", "mlp", "centroid", "knn"),
        default="logreg",
        help="knn: the k nearest reference samples' groups (default: logreg)",
    )
    r.add_argument(
        "--router-groups",
        choices=("train", "heldout", "outcome"),
        default="train",
        help="what the router learns: train = cartography of the trained samples (the paper's reading); "
        "heldout = cartography of the calibration split's per-epoch dynamics, never trained on; outcome = "
        "the cheapest exit that is right on held-out samples (no cartography). Held-out targets fit the "
        "router on the calibration path samples (default: %(default)s)",
    )
    r.add_argument(
        "--grouping",
        choices=("fixed", "adaptive"),
        default="fixed",
        help="fixed: the run's confidence/variability thresholds; adaptive: by rank, no tier left empty "
        "(default: %(default)s)",
    )
    r.add_argument(
        "--free-features",
        action="store_true",
        help="logreg/mlp: add what costs nothing at the router's depth: a tiny label head's confidence and "
        "entropy, and the token count",
    )
    r.add_argument(
        "--keep-router",
        action="store_true",
        help="deploy the router even if it is no better than the majority group or the device exit's "
        "confidence on held-out data (by default such a router is refused and the policy is the cascade)",
    )
    r.add_argument(
        "--router-depth",
        type=int,
        default=0,
        help="layers run before the router decides; 0 = embedding output, which spares the whole device slice "
        "for a hard sample and won most device regimes in benchmarks/results/router.md (default: %(default)s)",
    )
    c = p.add_argument_group("costs and objective")
    c.add_argument(
        "--costs",
        "--cost-profile",
        dest="costs",
        help="JSON cost profile (per-layer and per-hop costs, e.g. from `cartosplit bench cost-profile` or "
        "`bench device`), or a named cited profile: <device>-<link>[-mJ], devices pi-zero-2w, pi4, pi5, phone, "
        "links wifi, lte, wired, e.g. pi4-wifi or phone-lte-mJ (benchmarks/results/device-profiles); "
        "default: unit convention",
    )
    c.add_argument("--objective", choices=("max-drop", "reward"), default="max-drop", help="(default: max-drop)")
    c.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="max-drop: lowest cost within this many accuracy points of all-cloud (default: %(default)s)",
    )
    c.add_argument("--beta", type=float, default=1.0, help="reward: accuracy - beta * cost (default: %(default)s)")
    c.add_argument(
        "--metric",
        choices=("accuracy", "mcc", "f1"),
        help="the set metric the objective and reports use (default: the task's: MCC for CoLA, F1 for MRPC, "
        "else accuracy)",
    )
    g = p.add_argument_group("guarantee (docs/method.md, 'The promise')")
    g.add_argument(
        "--guarantee",
        choices=("ltt", "crc", "none"),
        default="ltt",
        help="ltt: P(risk <= max-drop) >= 1 - delta over the calibration draw; crc: E[risk] <= max-drop; none: "
        "the plain search, no guarantee. The risk bounds the accuracy drop; a bound the samples cannot "
        "certify is refused, naming the smallest one they can (default: %(default)s)",
    )
    g.add_argument("--delta", type=float, default=0.1, help="ltt: allowed failure probability (default: %(default)s)")
    g.add_argument(
        "--reference",
        choices=("label", "final"),
        default="label",
        help="label: risk = P(answer wrong and final exit right); final: P(answer differs from the final exit's), "
        "which needs no label (default: %(default)s; unlabelled --calib-file forces final)",
    )
    g.add_argument(
        "--calib-file",
        help="your own in-domain calibration samples: CSV/JSONL as for training (label optional) or plain text "
        "lines (.txt); default: the run's calibration split from the training file",
    )


def _calibrate_config(args: argparse.Namespace, run: str) -> CalibrateConfig:
    return CalibrateConfig(
        run=run,
        router=RouterConfig(kind=args.router, depth=args.router_depth, **_router_extras(args)),
        costs=args.costs,
        objective=Objective(args.objective, args.max_drop, args.beta),
        metric=args.metric,
        guarantee=args.guarantee,
        delta=args.delta,
        reference=args.reference,
        calib_file=args.calib_file,
        router_groups=args.router_groups,
        grouping=args.grouping,
        keep_router=args.keep_router,
    )


def _router_extras(args: argparse.Namespace) -> dict:
    if not args.free_features:
        return {}
    if args.router not in ("logreg", "mlp"):
        raise SystemExit("--free-features applies to --router logreg or mlp")
    return {"free_features": True}


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit calibrate``."""
    parser.add_argument("--run", required=True, help="run folder written by `cartosplit train`")
    _add_calibrate_options(parser)


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``cartosplit calibrate``."""
    calibrate(_calibrate_config(args, args.run))
    return 0


# --- export -----------------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit export``."""
    parser.add_argument("--run", required=True, help="a calibrated run folder")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument(
        "--formats",
        type=comma_list(str),
        default=("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"),
        help="comma-separated subset of onnx-fp32,onnx-int8,tflite-fp32,tflite-int8 (default: all); a format that "
        "fails validation is left out of the bundle, named on stderr with the flag that decides, and the exit status "
        "is 1 (no bundle if none passes)",
    )
    parser.add_argument(
        "--buckets", type=comma_list(int), default=(32, 64, 128), help="TFLite sequence lengths (default: 32,64,128)"
    )
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    parser.add_argument("--validation-samples", type=positive_int, default=256, help="held-out samples checked")
    parser.add_argument(
        "--fp32-tolerance", type=float, default=1e-3, help="max abs logit diff for fp32 (default: 1e-3)"
    )
    parser.add_argument(
        "--fp32-min-agreement",
        type=float,
        default=ExportConfig.fp32_min_agreement,
        help="min label/router agreement for fp32 (default: %(default)s)",
    )
    parser.add_argument(
        "--int8-min-agreement", type=float, default=0.95, help="min label/router agreement for int8 (default: 0.95)"
    )
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch and the runtimes")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing bundle folder (and its tier bundles)"
    )
    parser.add_argument(
        "--tiers",
        type=comma_list(str),
        default=(),
        help="also cut these tiers' bundles from the full one, each at OUT-<tier> (e.g. device,edge,cloud): "
        "each holds only what its tier opens (same as `cartosplit bundle split`)",
    )
    parser.add_argument(
        "--device-formats",
        type=comma_list(str),
        help="the device tier bundle's formats, e.g. tflite-int8 (default: every exported format); the edge "
        "and cloud tier bundles get every format their graphs have (ONNX)",
    )


def _stderr(line: str) -> None:
    print(f"cartosplit export: {line}", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    """``cartosplit export``: 0 when every format passed; 1 when some were refused (the bundle holds the others,
    each refusal is on stderr with the flag that decides) or none passed (no bundle)."""
    config = ExportConfig(
        run=args.run,
        out=args.out,
        formats=args.formats,
        buckets=args.buckets,
        opset=args.opset,
        validation_samples=args.validation_samples,
        fp32_tolerance=args.fp32_tolerance,
        fp32_min_agreement=args.fp32_min_agreement,
        int8_min_agreement=args.int8_min_agreement,
        threads=args.threads,
        overwrite=args.overwrite,
        tiers=args.tiers,
        device_formats=args.device_formats,
    )
    try:
        out = export_bundle(config, warn=_stderr)
    except ExportRefused as exc:
        _stderr(str(exc))
        return 1
    return 1 if refused_formats(load_bundle(out, verify=False).manifest) else 0


# --- demo -------------------------------------------------------------------------------------------------


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit demo``: train's and calibrate's, smaller defaults, and the serving formats."""
    _add_train_options(parser, "runs/demo-sst2", size=2000, calib=1000, epochs=3)
    _add_calibrate_options(parser)
    parser.add_argument("--device-format", default="onnx-int8", help="device graphs (default: %(default)s)")
    parser.add_argument("--server-format", default="onnx-fp32", help="edge and cloud graphs (default: %(default)s)")
    parser.add_argument("--limit", type=positive_int, help="only the first N dev inputs")


def cmd_demo(args: argparse.Namespace) -> int:
    """``cartosplit demo``."""
    cfg = _train_config(args)
    run_demo(
        cfg,
        _calibrate_config(args, cfg.out),
        device_format=args.device_format,
        server_format=args.server_format,
        limit=args.limit,
    )
    return 0
