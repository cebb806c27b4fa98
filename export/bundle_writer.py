"""``cartosplit export``: a calibrated run -> a validated, hashed bundle of ONNX (fp32, int8) and TFLite graphs.

Every artifact is run against the torch model on held-out samples (the run's calibration split) before
the bundle is written; beyond tolerance, the bundle is refused and left as ``<out>.rejected`` with its
report for inspection.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch

from cartosplit.device_runtime.bundle import (
    FORMATS,
    MANIFEST_FILE,
    ONNX_FP32,
    ONNX_INT8,
    SCHEMA_VERSION,
    TFLITE_INT8,
    file_entries,
)
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.device_runtime.policy import HARD, MEDIUM, Policy
from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch
from cartosplit.export.calibrate import CALIBRATION_FILE
from cartosplit.export.model import MultiExitBert
from cartosplit.export.onnx_export import DEFAULT_OPSET, INT8_CANDIDATES, export_onnx, quantize_int8
from cartosplit.export.router import load_router
from cartosplit.export.slices import build_slices
from cartosplit.export.train import load_datasets, load_run

DEVICE_GRAPHS = ("device_head", "device_tail")  # what a phone runs; the only graphs exported to TFLite


class ExportError(ValueError):
    """Export refused: a missing prerequisite, or an artifact that does not match the torch model."""


@dataclass
class ExportConfig:
    run: str
    out: str
    formats: tuple[str, ...] = FORMATS
    buckets: tuple[int, ...] = (32, 64, 128)
    opset: int = DEFAULT_OPSET
    validation_samples: int = 256
    fp32_tolerance: float = 1e-3  # max abs diff of any logits
    fp32_min_agreement: float = 0.995  # predicted labels and router decisions
    int8_min_agreement: float = 0.95
    threads: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.formats) - set(FORMATS)
        if unknown:
            raise ExportError(f"unknown formats {sorted(unknown)}; choose from {list(FORMATS)}")
        if ONNX_INT8 in self.formats and ONNX_FP32 not in self.formats:
            raise ExportError(f"{ONNX_INT8} is quantized from {ONNX_FP32}: include both")
        if not self.buckets or any(b < 2 for b in self.buckets):
            raise ExportError(f"buckets must be sequence lengths >= 2, got {self.buckets}")


# --- reference outputs and chained execution -------------------------------------------------------------


def _chain(run_graph, batch: dict[str, np.ndarray], graphs: set[str], r: int, e: int) -> dict[str, np.ndarray]:
    """Run the tier chain with ``run_graph(name, inputs) -> outputs``: what the tiers compute in order."""
    tokens = [batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]]
    mask = batch["attention_mask"]
    out: dict[str, np.ndarray] = {}
    out["router_logits"], hidden_r = run_graph("device_head", tokens)
    hidden_d, out["device_logits"] = run_graph("device_tail", [hidden_r, mask])
    if "edge" in graphs:
        hidden_e, out["edge_logits"] = run_graph("edge", [hidden_d, mask])
        (out["final_logits"],) = run_graph(f"cloud_from_{e}", [hidden_e, mask])
        if r > 0:
            (out["final_from_router_logits"],) = run_graph(f"cloud_from_{r}", [hidden_r, mask])
        (out["full_logits"],) = run_graph("full", tokens)
    return out


def _torch_runner(slices):
    def run(name, inputs):
        module = slices[name][0]
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.asarray(x)) for x in inputs])
        result = result if isinstance(result, tuple) else (result,)
        return [t.numpy() for t in result]

    return run


def _router_decisions(router_logits: np.ndarray, policy: Policy) -> np.ndarray:
    z = router_logits - router_logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    direct = p[:, HARD] >= policy.hard_margin
    skip = ~direct & (p[:, MEDIUM] >= policy.medium_margin)
    return direct * 2 + skip


def _compare(reference: list[dict], produced: list[dict], policy: Policy) -> dict:
    """Max abs diff of every logits output; agreement of labels at each exit and of router decisions."""
    diffs, agree = {}, {}
    for key in produced[0]:
        ref = np.concatenate([r[key] for r in reference])
        got = np.concatenate([p[key] for p in produced])
        diffs[key] = float(np.abs(ref - got).max())
        if key == "router_logits":
            agree["router_argmax"] = float((ref.argmax(1) == got.argmax(1)).mean())
            agree["router_decisions"] = float((_router_decisions(ref, policy) == _router_decisions(got, policy)).mean())
        else:
            agree[key.replace("_logits", "")] = float((ref.argmax(1) == got.argmax(1)).mean())
    return {"max_abs_diff": diffs, "agreement": agree}


def _verdict(report: dict, max_diff: float | None, min_agreement: float) -> dict:
    failures = []
    if max_diff is not None:
        failures += [
            f"{k} max abs diff {v:.2e} > {max_diff:.0e}" for k, v in report["max_abs_diff"].items() if v > max_diff
        ]
    failures += [
        f"{k} agreement {v:.4f} < {min_agreement}"
        for k, v in report["agreement"].items()
        if k != "router_argmax" and v < min_agreement
    ]
    return {**report, "passed": not failures, "failures": failures}


# --- the export --------------------------------------------------------------------------------------------


def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def export_bundle(cfg: ExportConfig, log=print) -> Path:
    started = time.time()
    run = Path(cfg.run)
    out = Path(cfg.out)
    info, tcfg = load_run(run)
    if not (run / CALIBRATION_FILE).is_file() or not (run / "router" / "router.json").is_file():
        raise ExportError(f"{run} is not calibrated: run `cartosplit calibrate --run {run}` first")
    if out.exists() and not cfg.overwrite:
        raise ExportError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    want_tflite = [f for f in cfg.formats if f.startswith("tflite")]
    if want_tflite:
        try:
            from cartosplit.export.tflite import convert_to_tflite
        except ImportError as exc:
            raise ExportError(
                f"TFLite export needs litert-torch ({exc}): pip install 'cartosplit[tflite]', "
                f"or pass --formats {ONNX_FP32},{ONNX_INT8}"
            ) from None
    if tcfg.threads or cfg.threads:
        torch.set_num_threads(cfg.threads or tcfg.threads)

    calibration = json.loads((run / CALIBRATION_FILE).read_text())
    policy = Policy.from_dict(calibration["policy"])
    model = MultiExitBert.load(run / "model").eval()
    router, router_cfg = load_router(run / "router")
    if router_cfg.depth != calibration["router"]["depth"]:
        raise ExportError(f"{run}: router and calibration disagree on the router depth; calibrate again")
    r, e = router_cfg.depth, model.config.edge_split
    slices = build_slices(model, router, r)
    graph_names = set(slices)

    # held-out validation samples: the calibration split (never trained on), sorted by length in batches
    pool, _ = load_datasets(tcfg)
    with np.load(run / "split.npz") as split:
        calib_idx = split["calib"][: cfg.validation_samples]
    held_out = pool.subset(calib_idx)
    tokenizer = load_tokenizer(run / "model" / "tokenizer.json", tcfg.max_length)
    encoded = encode(tokenizer, held_out.texts, held_out.text_pairs)
    encoded.sort(key=lambda x: len(x[0]))
    batches = [pad_batch(encoded[i : i + 32]) for i in range(0, len(encoded), 32)]
    reference = [_chain(_torch_runner(slices), b, graph_names, r, e) for b in batches]

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest_graphs = {
        name: {"inputs": list(ins), "outputs": list(outs), "files": {}} for name, (_, ins, outs) in slices.items()
    }
    formats_meta: dict[str, dict] = {}
    validation: dict[str, dict] = {}

    example = batches[0]
    hidden_example = torch.zeros((*example["input_ids"].shape, model.config.hidden_size))
    mask_example = torch.from_numpy(example["attention_mask"])

    def example_for(name):
        ins = slices[name][1]
        if ins[0] == "input_ids":
            return tuple(torch.from_numpy(example[k]) for k in ins)
        return (hidden_example, mask_example)

    def onnx_runner(folder: Path):
        sessions = {name: OnnxSession(folder / f"{name}.onnx", cfg.threads) for name in slices}
        return lambda name, inputs: sessions[name].run(inputs)

    if ONNX_FP32 in cfg.formats:
        fp32_dir = work / "onnx" / "fp32"
        for name, (module, ins, outs) in slices.items():
            export_onnx(module, example_for(name), ins, outs, fp32_dir / f"{name}.onnx", cfg.opset)
            session = OnnxSession(fp32_dir / f"{name}.onnx")
            if (tuple(session.input_names), tuple(session.output_names)) != (ins, outs):
                raise ExportError(f"{name}.onnx has inputs {session.input_names} / outputs {session.output_names}")
            manifest_graphs[name]["files"][ONNX_FP32] = f"onnx/fp32/{name}.onnx"
        produced = [_chain(onnx_runner(fp32_dir), b, graph_names, r, e) for b in batches]
        validation[ONNX_FP32] = _verdict(
            _compare(reference, produced, policy), cfg.fp32_tolerance, cfg.fp32_min_agreement
        )
        formats_meta[ONNX_FP32] = {"opset": cfg.opset, "dynamic_axes": ["batch", "sequence"]}
        log(f"{ONNX_FP32}: {'ok' if validation[ONNX_FP32]['passed'] else 'FAILED'}")

    if ONNX_INT8 in cfg.formats:
        # pick weight type and per-channel setting by measured agreement with torch (BERT is sensitive to both)
        candidates = []
        for weight_type, per_channel in INT8_CANDIDATES:
            folder = work / "onnx" / f"int8-{weight_type}-{'pc' if per_channel else 'pt'}"
            for name in slices:
                quantize_int8(
                    work / "onnx" / "fp32" / f"{name}.onnx", folder / f"{name}.onnx", weight_type, per_channel
                )
            produced = [_chain(onnx_runner(folder), b, graph_names, r, e) for b in batches]
            report = _compare(reference, produced, policy)
            labels = [v for k, v in report["agreement"].items() if not k.startswith("router")]
            candidates.append((float(np.mean(labels)), weight_type, per_channel, folder, report))
            log(f"  int8 {weight_type} per_channel={per_channel}: mean label agreement {np.mean(labels):.4f}")
        _, weight_type, per_channel, folder, report = max(candidates, key=lambda c: c[0])
        folder.rename(work / "onnx" / "int8")
        for _, _, _, other, _ in candidates:
            shutil.rmtree(other, ignore_errors=True)
        for name in slices:
            manifest_graphs[name]["files"][ONNX_INT8] = f"onnx/int8/{name}.onnx"
        validation[ONNX_INT8] = _verdict(report, None, cfg.int8_min_agreement)
        formats_meta[ONNX_INT8] = {
            "opset": cfg.opset,
            "quantization": "onnxruntime dynamic",
            "weight_type": weight_type,
            "per_channel": per_channel,
            "candidates": [
                {"weight_type": w, "per_channel": p, "mean_label_agreement": s} for s, w, p, _, _ in candidates
            ],
        }
        verdict = "ok" if validation[ONNX_INT8]["passed"] else "FAILED"
        log(f"{ONNX_INT8}: chose {weight_type} per_channel={per_channel}; {verdict}")

    if want_tflite:
        from cartosplit.device_runtime.litert_backend import LiteRTSession, bucket_for, pad_to

        buckets = tuple(sorted(cfg.buckets))
        for fmt in want_tflite:
            int8 = fmt == TFLITE_INT8
            tag = "int8" if int8 else "fp32"
            sessions: dict[tuple[str, int], LiteRTSession] = {}
            for name in DEVICE_GRAPHS:
                module, ins, _ = slices[name]
                manifest_graphs[name]["files"][fmt] = {}
                for bucket in buckets:
                    if ins[0] == "input_ids":
                        ex = tuple(torch.zeros(1, bucket, dtype=torch.long) for _ in ins)
                    else:
                        ex = (torch.zeros(1, bucket, model.config.hidden_size), torch.ones(1, bucket, dtype=torch.long))
                    rel = f"tflite/{tag}/{name}_s{bucket}.tflite"
                    convert_to_tflite(module, ex, work / rel, int8=int8)
                    manifest_graphs[name]["files"][fmt][str(bucket)] = rel
                    sessions[(name, bucket)] = LiteRTSession(work / rel, cfg.threads)
            # batch 1, each sample padded to the smallest bucket that fits, as the device runtime does;
            # buckets no held-out sample needs are checked with short samples padded up to them
            ref_rows, got_rows = [], []
            for bucket in buckets:
                fits = [x for x in encoded if len(x[0]) <= bucket]
                chosen = [x for x in fits if bucket_for(len(x[0]), buckets) == bucket] or fits[:16]
                for ids, types in chosen[:64]:
                    single = pad_batch([(ids, types)])
                    ref = _chain(_torch_runner(slices), single, {"device_head", "device_tail"}, r, e)
                    padded = {k: pad_to(v, bucket) for k, v in single.items()}
                    got = _chain(
                        lambda n, inputs, b=bucket, s=sessions: s[(n, b)].run(inputs),
                        padded,
                        {"device_head", "device_tail"},
                        r,
                        e,
                    )
                    ref_rows.append(ref)
                    got_rows.append(got)
            tolerance = None if int8 else cfg.fp32_tolerance
            minimum = cfg.int8_min_agreement if int8 else cfg.fp32_min_agreement
            validation[fmt] = _verdict(_compare(ref_rows, got_rows, policy), tolerance, minimum)
            formats_meta[fmt] = {
                "buckets": list(buckets),
                "batch": 1,
                "graphs": list(DEVICE_GRAPHS),
                "quantization": "dynamic_wi8_afp32" if int8 else None,
            }
            log(f"{fmt}: {'ok' if validation[fmt]['passed'] else 'FAILED'}")

    shutil.copy(run / "model" / "tokenizer.json", work / "tokenizer.json")
    for name in list(manifest_graphs):
        if not manifest_graphs[name]["files"]:
            del manifest_graphs[name]
    relpaths = [p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "cartosplit_version": _pkg_version("cartosplit"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "id": tcfg.model,
            "task": tcfg.task,
            "labels": info["label_names"],
            "num_layers": model.config.num_layers,
            "hidden_size": model.config.hidden_size,
            "vocab_size": model.encoder.config.vocab_size,
            "max_length": tcfg.max_length,
            "pooling": model.config.pooling,
        },
        "split_points": asdict(model.config.split_points(r)),
        "router": {**calibration["router"], "groups": ["easy", "medium", "hard"]},
        "tokenizer": "tokenizer.json",
        "policy": calibration["policy"],
        "cost_profile": calibration["cost_profile"],
        "calibration_objective": calibration["objective"],
        # what the policy was certified to hold, on which samples (absent for runs calibrated before it)
        "calibration_guarantee": calibration.get("guarantee"),
        "formats": formats_meta,
        "graphs": manifest_graphs,
        "validation": {
            "samples": len(encoded),
            "source": "calibration split (held out from training)",
            "formats": validation,
        },
        "exporter": {
            "torch": torch.__version__,
            "onnx": _pkg_version("onnx"),
            "onnxruntime": _pkg_version("onnxruntime"),
            "litert-torch": _pkg_version("litert-torch"),
            "seconds": round(time.time() - started, 1),
        },
        "files": file_entries(work, relpaths),
    }
    (work / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")

    failed = {fmt: v["failures"] for fmt, v in validation.items() if not v["passed"]}
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
    return out
