"""``cartosplit export``: a calibrated run -> a validated, hashed bundle of ONNX (fp32, int8) and TFLite graphs.

Every artifact is run against the torch model on held-out samples (the run's calibration split) before
the bundle is written. As optimum's exporters do: every format is exported, then every one validated, every
failure collected, and only then decided. The bundle holds the formats that passed; a refused format keeps its
verdict (``passed: false`` and its failures) in the manifest's validation section, but its files are deleted and
``formats`` and ``graphs`` do not list it, so no tier tries to load it (``refused_formats`` reads them back). Each
refusal is reported with the flag that sets the bar it missed, and ``cartosplit export`` then exits 1 with a
usable bundle. Only when no format passes is no bundle written (``ExportRefused``, every failure listed); the
artifacts are left as ``<out>.rejected`` with their report for inspection.

onnx-int8 is quantized from onnx-fp32's files: when onnx-fp32 fails to *export*, onnx-int8 is not attempted. When
onnx-fp32 exports but fails *validation*, onnx-int8 still stands on its own verdict: it is judged against torch,
not against fp32, and its graphs are complete files that need none of fp32's. The formats' exporters are in
``cartosplit.export.exporters`` and ``cartosplit.export.tflite``; this module orchestrates them and writes the
manifest.

With ``tiers`` (``--tiers device,edge,cloud``), each tier's bundle is then cut from the full one at
``<out>-<tier>`` (``cartosplit.device_runtime.tier_bundles``): the device's in ``device_formats`` (default: every
format of the export), the edge's and the cloud's in every format that holds their graphs (ONNX); all of them
from the formats kept, a tier none of whose formats passed is not cut (and said so).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from cartosplit.device_runtime.bundle import FORMATS, MANIFEST_FILE, file_entries
from cartosplit.device_runtime.costs import CostProfile
from cartosplit.device_runtime.cpu_features import read_cpu_features
from cartosplit.device_runtime.manifest import (
    ONNX_FP32,
    ONNX_INT8,
    TFLITE_FP32,
    TFLITE_INT8,
    TIERS,
    ExporterInfo,
    FormatVerdict,
    GraphSpec,
    Manifest,
    ModelInfo,
    RouterInfo,
    Validation,
    format_folder,
)
from cartosplit.device_runtime.policy import GROUP_NAMES, Policy
from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch
from cartosplit.device_runtime.tier_bundles import bundle_size, cut_tier_bundle
from cartosplit.export.calibrate import CALIBRATION_FILE
from cartosplit.export.exporters import ExportContext, Exporter, ExportError, OnnxFp32Exporter, OnnxInt8Exporter
from cartosplit.export.model import MultiExitBert
from cartosplit.export.onnx_export import DEFAULT_OPSET
from cartosplit.export.quiet import quiet_known_noise
from cartosplit.export.router import load_router
from cartosplit.export.slices import build_slices
from cartosplit.export.train import load_datasets, load_run
from cartosplit.export.validation import AGREEMENT, SOURCE, TOLERANCE, HeldOut, failed_bar

# a format quantized from another's files: it cannot be exported when that one's export failed
QUANTIZED_FROM = {ONNX_INT8: ONNX_FP32}
INT8_FORMATS = (ONNX_INT8, TFLITE_INT8)
# the flag that sets each bar judge() holds a format to (fp32 formats: both; int8: agreement only)
BAR_FLAGS = {
    ("fp32", TOLERANCE): "--fp32-tolerance",
    ("fp32", AGREEMENT): "--fp32-min-agreement",
    ("int8", AGREEMENT): "--int8-min-agreement",
}


class ExportRefused(ExportError):
    """No format passed validation: no bundle was written; the message lists every format's failures."""


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
    int8_calibration_samples: int = 256  # training samples static int8's activation scales are set on
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
        quiet_known_noise()  # litert-torch imports torchao, which logs harmless lines on a CPU torch
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


def _held_out(run: Path, tcfg, samples: int, slices: dict, policy: Policy, r: int, e: int) -> tuple[HeldOut, bool]:
    """The first ``samples`` of the run's calibration split (never trained on) and the torch reference on them;
    and whether the run's data are text pairs (the training file's rows, which the model was fitted to)."""
    pool, _ = load_datasets(tcfg)
    with np.load(run / "split.npz") as split:
        calib = pool.subset(split["calib"][:samples])
    tokenizer = load_tokenizer(run / "model" / "tokenizer.json", tcfg.max_length)
    held_out = HeldOut.build(slices, encode(tokenizer, calib.texts, calib.text_pairs), policy, r, e)
    return held_out, pool.text_pairs is not None


def _quantization_batches(run: Path, tcfg, samples: int) -> list[dict[str, np.ndarray]]:
    """The first ``samples`` of the run's training split as padded token batches: what static int8's activation
    scales are set on (the model was fitted to these; the held-out samples stay for judging the result)."""
    pool, _ = load_datasets(tcfg)
    with np.load(run / "split.npz") as split:
        train = pool.subset(split["train"][:samples])
    tokenizer = load_tokenizer(run / "model" / "tokenizer.json", tcfg.max_length)
    encoded = sorted(encode(tokenizer, train.texts, train.text_pairs), key=lambda x: len(x[0]))
    return [pad_batch(encoded[i : i + 16]) for i in range(0, len(encoded), 16)]


def _run_exporters(exporters: list[Exporter], ctx: ExportContext) -> tuple[dict, dict[str, GraphSpec], dict]:
    """Every format exported, then every one judged: nothing is decided before all verdicts are in, so that a
    refusal names every failure. Returns the manifest's formats, graphs (those with files) and verdicts."""
    graphs = {name: GraphSpec(list(ins), list(outs)) for name, (_, ins, outs) in ctx.slices.items()}
    formats, verdicts = {}, {}
    for exporter in exporters:
        source = QUANTIZED_FROM.get(exporter.fmt)
        if source in verdicts:  # only failed exports have a verdict yet: nothing to quantize
            verdicts[exporter.fmt] = _not_exported(f"not exported: quantized from {source}, whose export failed")
            continue
        try:
            exported = exporter.export(ctx)
        except Exception as exc:  # one format's failure must not throw away the others: it is collected
            verdicts[exporter.fmt] = _not_exported(f"export failed: {type(exc).__name__}: {exc}")
            ctx.log(f"{exporter.fmt}: export FAILED ({type(exc).__name__}: {exc})")
            continue
        formats[exporter.fmt] = exported.info
        for graph, path in exported.files.items():
            if isinstance(path, dict):
                graphs[graph].bucket_files[exporter.fmt] = path
            else:
                graphs[graph].files[exporter.fmt] = path
    for exporter in exporters:
        if exporter.fmt in verdicts:
            continue
        try:
            verdicts[exporter.fmt] = exporter.validate(ctx)
        except Exception as exc:  # as for export: collected, the other formats are still judged
            verdicts[exporter.fmt] = _not_exported(f"validation failed: {type(exc).__name__}: {exc}")
        ctx.log(f"{exporter.fmt}: {'ok' if verdicts[exporter.fmt].passed else 'FAILED'}")
    verdicts = {e.fmt: verdicts[e.fmt] for e in exporters}  # FORMATS order, whatever failed when
    return formats, {name: spec for name, spec in graphs.items() if spec.formats()}, verdicts


def _not_exported(why: str) -> FormatVerdict:
    """The verdict of a format that has no graphs to judge."""
    return FormatVerdict(max_abs_diff={}, agreement={}, passed=False, failures=[why])


def _graphs_in(graphs: dict[str, GraphSpec], kept: list[str]) -> dict[str, GraphSpec]:
    """``graphs`` with only the files of the ``kept`` formats; a graph left without any is dropped."""
    cut = {
        name: GraphSpec(
            list(spec.inputs),
            list(spec.outputs),
            {f: rel for f, rel in spec.files.items() if f in kept},
            {f: dict(by) for f, by in spec.bucket_files.items() if f in kept},
        )
        for name, spec in graphs.items()
    }
    return {name: spec for name, spec in cut.items() if spec.formats()}


def _delete_all_but(work: Path, kept: list[str], keep_files: tuple[str, ...]) -> None:
    """Delete every file in ``work`` outside the ``kept`` formats' folders and ``keep_files``: the refused formats'
    graphs and anything an exporter left behind (the manifest lists every file of the folder)."""
    folders = tuple(format_folder(f) + "/" for f in kept)
    for path in sorted(work.rglob("*"), reverse=True):  # a folder's files before the folder
        rel = path.relative_to(work).as_posix()
        if path.is_file() and rel not in keep_files and not rel.startswith(folders):
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


def _decided_by(fmt: str, verdict: FormatVerdict) -> str:
    """The flags that set the bars ``verdict`` missed, or why none does (an export that raised)."""
    precision = "int8" if fmt in INT8_FORMATS else "fp32"
    bars = {failed_bar(failure) for failure in verdict.failures}
    flags = [
        BAR_FLAGS[precision, bar] for bar in (TOLERANCE, AGREEMENT) if bar in bars and (precision, bar) in BAR_FLAGS
    ]
    if None in bars:
        flags.append("no threshold decides this: fix the cause, or leave the format out with --formats")
    return ", ".join(flags)


def refusal_report(verdicts: dict[str, FormatVerdict]) -> list[str]:
    """One line per refused format (what failed, which flag decides) and, when some passed, what the bundle holds
    and how to export without the refused ones."""
    kept = [f for f, v in verdicts.items() if v.passed]
    refused = {f: v for f, v in verdicts.items() if not v.passed}
    lines = [f"{f} refused: {'; '.join(v.failures)} ({_decided_by(f, v)})" for f, v in refused.items()]
    if not kept or not refused:
        return lines
    if ONNX_INT8 in kept and ONNX_FP32 in refused:
        lines.append(
            f"{ONNX_INT8} is kept: it was judged against torch on its own, and its graphs need none of "
            f"{ONNX_FP32}'s files; but it is quantized from {ONNX_FP32}, so a re-export needs both"
        )
    without = [f for f in kept if not (f == ONNX_INT8 and ONNX_FP32 not in kept)]  # int8 needs its fp32 source
    it = "it" if len(refused) == 1 else "them"
    hint = f"; export without {it}: --formats {','.join(without)}" if without else ""
    lines.append(f"the bundle holds {', '.join(kept)}, not {', '.join(refused)}{hint}")
    return lines


def _manifest(
    work: Path, info: dict, tcfg, model: MultiExitBert, r: int, calibration: dict, *, text_pairs: bool, **sections
) -> Manifest:
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
            text_pairs=text_pairs,  # the runtime refuses a lone text for a pairs model (and says so)
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


def _cuttable_tiers(
    cfg: ExportConfig, kept: list[str], out: Path
) -> tuple[tuple[str, ...], tuple[str, ...] | None, list[str]]:
    """The tier bundles the kept formats allow, the device's formats among them, and a line per tier not cut (a
    stale one from an earlier export is removed with --overwrite: it would name another bundle id)."""
    device_formats = None if cfg.device_formats is None else tuple(f for f in cfg.device_formats if f in kept)
    tiers, skipped = [], []
    for tier in cfg.tiers:
        if tier == "device" and device_formats == ():
            why = f"its formats {', '.join(cfg.device_formats)} were refused (--device-formats)"
        elif tier != "device" and not any(f in kept for f in (ONNX_FP32, ONNX_INT8)):
            why = "its graphs are ONNX only, and no ONNX format passed"
        else:
            tiers.append(tier)
            continue
        stale = tier_bundle_path(out, tier)
        if stale.exists() and cfg.overwrite:
            shutil.rmtree(stale)
        skipped.append(f"no {tier} tier bundle: {why}")
    return tuple(tiers), device_formats, skipped


def export_bundle(
    cfg: ExportConfig, log: Callable[[str], None] = print, warn: Callable[[str], None] | None = None
) -> Path:
    """Export, validate and write the bundle at ``cfg.out`` with every format that passed; returns its folder.

    Refused formats are reported through ``warn`` (default: ``log``), one line each with the flag that decides,
    and recorded in the manifest (``refused_formats`` of the loaded bundle). Raises ``ExportRefused`` when no
    format passed (nothing written but ``<out>.rejected``), ``ExportError`` for a missing prerequisite."""
    warn = warn or log
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
    held_out, text_pairs = _held_out(run, tcfg, cfg.validation_samples, slices, policy, r, model.config.edge_split)

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    quantization = _quantization_batches(run, tcfg, cfg.int8_calibration_samples) if ONNX_INT8 in cfg.formats else []
    ctx = ExportContext(held_out, work, model.config.hidden_size, cfg.opset, cfg.threads, log, quantization)
    formats, graphs, verdicts = _run_exporters(exporters, ctx)
    kept = [fmt for fmt, verdict in verdicts.items() if verdict.passed]
    if kept and len(kept) < len(verdicts):  # nothing passed: every file stays, for inspection in .rejected
        _delete_all_but(work, kept, ("tokenizer.json",))
        formats, graphs = {f: i for f, i in formats.items() if f in kept}, _graphs_in(graphs, kept)
    shutil.copy(run / "model" / "tokenizer.json", work / "tokenizer.json")
    versions = {"torch": torch.__version__, **{p: _pkg_version(p) for p in ("onnx", "onnxruntime", "litert-torch")}}
    manifest = _manifest(
        work,
        info,
        tcfg,
        model,
        r,
        calibration,
        text_pairs=text_pairs,
        formats=formats,
        graphs=graphs,
        validation=Validation(len(held_out.encoded), SOURCE, verdicts, read_cpu_features().summary()),
        exporter=ExporterInfo(versions, round(time.time() - started, 1)),
    )
    (work / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")

    report = refusal_report(verdicts)
    if not kept:
        rejected = out.with_name(out.name + ".rejected")
        shutil.rmtree(rejected, ignore_errors=True)
        work.rename(rejected)
        raise ExportRefused(
            "export refused: no format passed validation against the torch model; no bundle written, the "
            f"artifacts and their report are in {rejected}\n  " + "\n  ".join(report)
        )
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log(f"bundle written to {out} in {time.time() - started:.0f} s with {', '.join(kept)}")
    tiers, device_formats, skipped = _cuttable_tiers(cfg, kept, out)
    write_tier_bundles(out, tiers, device_formats, cfg.overwrite, log)
    for line in report + skipped:
        warn(line)
    return out
