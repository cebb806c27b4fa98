"""``cartosplit export``: a calibrated run -> a validated, hashed bundle of ONNX (fp32, int8) and TFLite graphs.

Every artifact is run against the torch model on held-out samples (the run's calibration split) before
the bundle is written; beyond tolerance, the bundle is refused and left as ``<out>.rejected`` with its
report for inspection. The formats' exporters are in ``cartosplit.export.exporters`` and
``cartosplit.export.tflite``; this module orchestrates them and writes the manifest.

With ``tiers`` (``--tiers device,edge,cloud``), each tier's bundle is then cut from the full one at
``<out>-<tier>`` (``cartosplit.device_runtime.tier_bundles``): the device's in ``device_formats`` (default: every
format of the export), the edge's and the cloud's in every format that holds their graphs (ONNX).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from cartosplit.device_runtime.bundle import FORMATS, MANIFEST_FILE, file_entries
from cartosplit.device_runtime.costs import CostProfile
from cartosplit.device_runtime.manifest import (
    ONNX_FP32,
    ONNX_INT8,
    TFLITE_FP32,
    TFLITE_INT8,
    TIERS,
    ExporterInfo,
    GraphSpec,
    Manifest,
    ModelInfo,
    RouterInfo,
    Validation,
)
from cartosplit.device_runtime.policy import GROUP_NAMES, Policy
from cartosplit.device_runtime.text import encode, load_tokenizer
from cartosplit.device_runtime.tier_bundles import bundle_size, cut_tier_bundle
from cartosplit.export.calibrate import CALIBRATION_FILE
from cartosplit.export.exporters import ExportContext, Exporter, ExportError, OnnxFp32Exporter, OnnxInt8Exporter
from cartosplit.export.model import MultiExitBert
from cartosplit.export.onnx_export import DEFAULT_OPSET
from cartosplit.export.router import load_router
from cartosplit.export.slices import build_slices
from cartosplit.export.train import load_datasets, load_run
from cartosplit.export.validation import SOURCE, HeldOut


@dataclass
class ExportConfig:
    run: str
    out: str
    formats: tuple[str, ...] = FORMATS
    buckets: tuple[int, ...] = (32, 64, 128)
    opset: int = DEFAULT_OPSET
    validation_samples: int = 256
    # the bars of every fp32 format (ONNX and TFLite) and of every int8 one; defaults: the exporters' own
    fp32_tolerance: float = OnnxFp32Exporter.ATOL_FOR_VALIDATION  # max abs diff of any logits
    fp32_min_agreement: float = OnnxFp32Exporter.MIN_AGREEMENT  # predicted labels and router decisions
    int8_min_agreement: float = OnnxInt8Exporter.MIN_AGREEMENT
    threads: int | None = None
    overwrite: bool = False
    tiers: tuple[str, ...] = ()  # also cut these tiers' bundles, each at <out>-<tier>
    device_formats: tuple[str, ...] | None = None  # the device tier bundle's formats (None: every exported one)

    def __post_init__(self) -> None:
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            raise ExportError(f"unknown formats {sorted(unknown)}; choose from {list(FORMATS)}")
        unknown = set(self.tiers) - set(TIERS)
        if unknown:
            raise ExportError(f"unknown tiers {sorted(unknown)}; choose from {list(TIERS)}")
        if self.device_formats is not None:
            if "device" not in self.tiers:
                raise ExportError("device formats choose the device tier bundle's formats: add device to the tiers")
            lacking = [f for f in self.device_formats if f not in self.formats]
            if lacking or not self.device_formats:
                raise ExportError(
                    f"the device tier bundle's formats must be exported formats ({', '.join(self.formats)}); "
                    f"got {', '.join(self.device_formats) or 'none'}"
                )
        if ONNX_INT8 in self.formats and ONNX_FP32 not in self.formats:
            raise ExportError(f"{ONNX_INT8} is quantized from {ONNX_FP32}: include both")
        if not self.buckets or any(b < 2 for b in self.buckets):
            raise ExportError(f"buckets must be sequence lengths >= 2, got {self.buckets}")


def _exporters(cfg: ExportConfig) -> list[Exporter]:
    """The requested formats' exporters, in FORMATS order (int8 ONNX quantizes the fp32 files)."""
    chosen: list[Exporter] = []
    if ONNX_FP32 in cfg.formats:
        chosen.append(OnnxFp32Exporter(cfg.fp32_tolerance, cfg.fp32_min_agreement))
    if ONNX_INT8 in cfg.formats:
        chosen.append(OnnxInt8Exporter(min_agreement=cfg.int8_min_agreement))
    if TFLITE_FP32 in cfg.formats or TFLITE_INT8 in cfg.formats:
        try:
            import litert_torch  # noqa: F401  (refuse now, not after the ONNX formats are exported)

            from cartosplit.export.tflite import TfliteFp32Exporter, TfliteInt8Exporter
        except ImportError as exc:
            raise ExportError(
                f"TFLite export needs litert-torch ({exc}): pip install 'cartosplit[tflite]', "
                f"or pass --formats {ONNX_FP32},{ONNX_INT8}"
            ) from None
        if TFLITE_FP32 in cfg.formats:
            chosen.append(TfliteFp32Exporter(cfg.buckets, cfg.fp32_tolerance, cfg.fp32_min_agreement))
        if TFLITE_INT8 in cfg.formats:
            chosen.append(TfliteInt8Exporter(cfg.buckets, min_agreement=cfg.int8_min_agreement))
    return chosen


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _held_out(run: Path, tcfg, samples: int, slices: dict, policy: Policy, r: int, e: int) -> HeldOut:
    """The first ``samples`` of the run's calibration split (never trained on) and the torch reference on them."""
    pool, _ = load_datasets(tcfg)
    with np.load(run / "split.npz") as split:
        calib = pool.subset(split["calib"][:samples])
    tokenizer = load_tokenizer(run / "model" / "tokenizer.json", tcfg.max_length)
    return HeldOut.build(slices, encode(tokenizer, calib.texts, calib.text_pairs), policy, r, e)


def _run_exporters(exporters: list[Exporter], ctx: ExportContext) -> tuple[dict, dict[str, GraphSpec], dict]:
    """Every format exported, then every one judged: nothing is decided before all verdicts are in, so that a
    refusal names every failure. Returns the manifest's formats, graphs (those with files) and verdicts."""
    graphs = {name: GraphSpec(list(ins), list(outs)) for name, (_, ins, outs) in ctx.slices.items()}
    formats = {}
    for exporter in exporters:
        exported = exporter.export(ctx)
        formats[exporter.fmt] = exported.info
        for graph, path in exported.files.items():
            if isinstance(path, dict):
                graphs[graph].bucket_files[exporter.fmt] = path
            else:
                graphs[graph].files[exporter.fmt] = path
    verdicts = {}
    for exporter in exporters:
        verdicts[exporter.fmt] = exporter.validate(ctx)
        ctx.log(f"{exporter.fmt}: {'ok' if verdicts[exporter.fmt].passed else 'FAILED'}")
    return formats, {name: spec for name, spec in graphs.items() if spec.formats()}, verdicts


def _manifest(work: Path, info: dict, tcfg, model: MultiExitBert, r: int, calibration: dict, **sections) -> Manifest:
    """The manifest of the bundle in ``work``; ``sections``: formats, graphs, validation, exporter."""
    relpaths = [p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()]
    return Manifest(
        cartosplit_version=_pkg_version("cartosplit"),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(
            id=tcfg.model,
            task=tcfg.task,
            labels=info["label_names"],
            num_layers=model.config.num_layers,
            hidden_size=model.config.hidden_size,
            vocab_size=model.encoder.config.vocab_size,
            max_length=tcfg.max_length,
            pooling=model.config.pooling,
        ),
        split_points=model.config.split_points(r),
        router=RouterInfo({**calibration["router"], "groups": list(GROUP_NAMES)}),
        tokenizer="tokenizer.json",
        policy=Policy.from_dict(calibration["policy"]),
        cost_profile=CostProfile(**calibration["cost_profile"]),
        calibration_objective=calibration["objective"],
        calibration_guarantee=calibration.get("guarantee"),  # absent for runs calibrated before it
        files=file_entries(work, relpaths),
        **sections,
    )


def tier_bundle_path(out: Path, tier: str) -> Path:
    """Where ``export --tiers`` writes a tier's bundle: ``<out>-<tier>``, beside the full bundle."""
    return out.with_name(f"{out.name}-{tier}")


def write_tier_bundles(
    out: Path, tiers: tuple[str, ...], device_formats: tuple[str, ...] | None, overwrite: bool, log=print
) -> dict[str, Path]:
    """Cut each tier's bundle from the full bundle ``out``, at ``<out>-<tier>`` (replaced when ``overwrite``)."""
    written = {}
    for tier in tiers:
        target = tier_bundle_path(out, tier)
        if target.exists() and overwrite:
            shutil.rmtree(target)
        formats = device_formats if tier == "device" else None
        written[tier] = cut_tier_bundle(out, tier, formats, target)
        log(f"{tier} tier bundle written to {target} ({bundle_size(target) / 1e6:.1f} MB)")
    return written


def export_bundle(cfg: ExportConfig, log=print) -> Path:
    started = time.time()
    run, out = Path(cfg.run), Path(cfg.out)
    info, tcfg = load_run(run)
    if not (run / CALIBRATION_FILE).is_file() or not (run / "router" / "router.json").is_file():
        raise ExportError(f"{run} is not calibrated: run `cartosplit calibrate --run {run}` first")
    for target in (out, *(tier_bundle_path(out, tier) for tier in cfg.tiers)):
        if target.exists() and not cfg.overwrite:
            raise ExportError(f"{target} exists: pass --overwrite to replace it, or choose another --out")
    exporters = _exporters(cfg)
    if tcfg.threads or cfg.threads:
        torch.set_num_threads(cfg.threads or tcfg.threads)

    calibration = json.loads((run / CALIBRATION_FILE).read_text())
    policy = Policy.from_dict(calibration["policy"])
    model = MultiExitBert.load(run / "model").eval()
    router, router_cfg = load_router(run / "router")
    if router_cfg.depth != calibration["router"]["depth"]:
        raise ExportError(f"{run}: router and calibration disagree on the router depth; calibrate again")
    r = router_cfg.depth
    slices = build_slices(model, router, r)
    held_out = _held_out(run, tcfg, cfg.validation_samples, slices, policy, r, model.config.edge_split)

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ctx = ExportContext(held_out, work, model.config.hidden_size, cfg.opset, cfg.threads, log)
    formats, graphs, verdicts = _run_exporters(exporters, ctx)
    shutil.copy(run / "model" / "tokenizer.json", work / "tokenizer.json")
    versions = {"torch": torch.__version__, **{p: _pkg_version(p) for p in ("onnx", "onnxruntime", "litert-torch")}}
    manifest = _manifest(
        work,
        info,
        tcfg,
        model,
        r,
        calibration,
        formats=formats,
        graphs=graphs,
        validation=Validation(len(held_out.encoded), SOURCE, verdicts),
        exporter=ExporterInfo(versions, round(time.time() - started, 1)),
    )
    (work / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")

    failed = {fmt: v.failures for fmt, v in verdicts.items() if not v.passed}
    if failed:
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        work.rename(rejected)
        raise ExportError(
            f"export refused, artifacts differ from the torch model beyond tolerance: {failed}; see {rejected}"
        )
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log(f"bundle written to {out} in {time.time() - started:.0f} s")
    write_tier_bundles(out, cfg.tiers, cfg.device_formats, cfg.overwrite, log)
    return out
