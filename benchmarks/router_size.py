"""What each router kind costs on the device: bytes, graph file sizes, batch-1 latency.

    cartosplit bench router-size --run runs/bench/sst2 --out benchmarks/results/router-size

Each variant is fitted (``cartosplit.export.router.fit_router``) on the run's cached training-subset features at
``--depth`` and its cartography groups, as calibration fits it; free-feature routers also get the task
labels and each sample's token count. The router alone is then exported (a graph taking pooled
features [B, H], plus token counts [B] for free features, giving router logits [B, 3]) to ONNX fp32,
ONNX int8 (the bundle writer's onnxruntime dynamic quantization) and, unless ``--no-tflite``, TFLite
fp32 / int8 at batch 1 (``cartosplit.export.tflite``). Latency: median wall time of one call at batch 1 over
held-out calibration-split samples, ``--threads`` intra-op threads, after a warm-up; it includes the
Python call into the runtime (a few microseconds). int8 agreement: argmax of the int8 graph against
the fp32 graph on the calibration split.

Writes <out>.json and <out>.md with the command, the machine and the time. The run is only read.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cartosplit.benchmarks.machine import describe_machine
from cartosplit.benchmarks.report import bench_command, bench_parser
from cartosplit.benchmarks.timing import time_calls
from cartosplit.device_runtime.numerics import softmax
from cartosplit.export.onnx_export import DEFAULT_OPSET, quantize_int8
from cartosplit.export.router import Router, RouterConfig, fit_router

VARIANTS: dict[str, dict] = {
    "logreg": {"kind": "logreg"},
    "mlp": {"kind": "mlp"},
    "centroid": {"kind": "centroid"},
    "knn fp32": {"kind": "knn", "pca_dims": None},
    "knn fp32 pca64": {"kind": "knn", "pca_dims": 64},
    "knn fp16 pca64": {"kind": "knn", "pca_dims": 64, "ref_dtype": "float16"},
    "logreg + free": {"kind": "logreg", "free_features": True},
}


class RouterGraph(nn.Module):
    """The router alone, as the device_head graph holds it: pooled features (+ token counts) -> logits."""

    def __init__(self, router: Router) -> None:
        super().__init__()
        self.router = router

    def forward(self, pooled: torch.Tensor, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
        return self.router(pooled, n_tokens)


def _inputs(router: Router, pooled: np.ndarray, n_tokens: np.ndarray) -> tuple[tuple[str, ...], list[np.ndarray]]:
    names = ("pooled", "n_tokens") if router.free_features else ("pooled",)
    arrays = [pooled.astype(np.float32), n_tokens.astype(np.int64)][: len(names)]
    return names, arrays


def export_router_onnx(router: Router, names: tuple[str, ...], example: list[np.ndarray], path: Path) -> Path:
    axes = {name: {0: "batch"} for name in (*names, "router_logits")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            RouterGraph(router).eval(),
            tuple(torch.from_numpy(a) for a in example),
            str(path),
            input_names=list(names),
            output_names=["router_logits"],
            dynamic_axes=axes,
            opset_version=DEFAULT_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return path


def _onnx_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _latency_us(call, feeds: list, min_runs: int, min_seconds: float) -> dict:
    state = {"i": 0}

    def one():
        feed = feeds[state["i"] % len(feeds)]
        state["i"] += 1
        return call(feed)

    timed = time_calls(one, min_runs=min_runs, min_seconds=min_seconds, warmup=200)
    us = 1000.0 * np.asarray(timed.ms)
    return {"p50_us": float(np.median(us)), "p90_us": float(np.percentile(us, 90)), "runs": len(us)}


def _onnx_run_all(session, names, arrays, batch: int = 1024) -> np.ndarray:
    out = []
    for i in range(0, len(arrays[0]), batch):
        out.append(session.run(None, {n: a[i : i + batch] for n, a in zip(names, arrays, strict=True)})[0])
    return np.concatenate(out)


def _agreement(reference: np.ndarray, got: np.ndarray) -> dict:
    return {
        "argmax_agreement": float((reference.argmax(1) == got.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(softmax(reference) - softmax(got)).max()),
    }


def _onnx_ops(path: Path) -> list[str]:
    import onnx

    return sorted({node.op_type for node in onnx.load(str(path)).graph.node})


def _tflite(router, names, arrays, folder: Path, threads: int, min_runs: int, min_seconds: float) -> dict:
    """fp32 and int8 TFLite of the router at batch 1: size, latency, agreement with the fp32 ONNX graph."""
    from ai_edge_litert.interpreter import Interpreter

    from cartosplit.export.tflite import convert_to_tflite

    example = tuple(torch.from_numpy(a[:1]) for a in arrays)
    result: dict = {}
    for tag, int8 in (("fp32", False), ("int8", True)):
        path = folder / f"router-{tag}.tflite"
        try:
            started = time.time()
            convert_to_tflite(RouterGraph(router).eval(), example, path, int8=int8)
        except Exception as exc:  # report what fails (an op the converter cannot lower, say) and go on
            result[tag] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            continue
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
        runner = interpreter.get_signature_runner()
        details = runner.get_input_details()
        order = sorted(details, key=lambda n: int(n.rsplit("_", 1)[1]))  # args_0, args_1: forward's order
        feeds = [
            {n: a[i : i + 1].astype(details[n]["dtype"]) for n, a in zip(order, arrays, strict=True)}
            for i in range(min(256, len(arrays[0])))
        ]
        (out_name,) = runner.get_output_details()

        def call(feed, runner=runner, out_name=out_name):
            return runner(**feed)[out_name]

        logits = np.concatenate([call(feed) for feed in feeds])
        result[tag] = {
            "bytes": path.stat().st_size,
            "convert_seconds": round(time.time() - started, 2),
            "latency": _latency_us(call, feeds, min_runs, min_seconds),
            "logits_first_256": logits,  # compared by the caller, then dropped
        }
    return result


def measure(name: str, router: Router, calib_pooled, calib_tokens, folder: Path, args) -> dict:
    names, arrays = _inputs(router, calib_pooled, calib_tokens)
    params = sum(p.numel() * p.element_size() for p in router.parameters())
    buffers = sum(b.numel() * b.element_size() for b in router.buffers())
    fp32 = export_router_onnx(router, names, [a[:2] for a in arrays], folder / "router.onnx")
    int8 = quantize_int8(fp32, folder / "router.int8.onnx")
    with torch.no_grad():
        torch_logits = router(*(torch.from_numpy(a) for a in arrays)).numpy()
    row: dict = {
        "name": name,
        "inputs": list(names),
        "bytes": {"parameters": int(params), "buffers": int(buffers), "total": int(params + buffers)},
        "onnx": {},
    }
    feeds = [{n: a[i : i + 1] for n, a in zip(names, arrays, strict=True)} for i in range(min(256, len(arrays[0])))]
    reference = None
    for tag, path in (("fp32", fp32), ("int8", int8)):
        session = _onnx_session(path, args.threads)
        logits = _onnx_run_all(session, names, arrays)
        call = lambda feed, s=session: s.run(None, feed)[0]  # noqa: E731
        entry = {
            "bytes": path.stat().st_size,
            "ops": _onnx_ops(path),
            "latency": _latency_us(call, feeds, args.min_runs, args.min_seconds),
        }
        if tag == "fp32":
            reference = logits
            entry["max_abs_logit_diff_vs_torch"] = float(np.abs(logits - torch_logits).max())
        else:
            entry["vs_fp32"] = _agreement(reference, logits)
        row["onnx"][tag] = entry
    if not args.no_tflite:
        tfl = _tflite(router, names, arrays, folder, args.threads, args.min_runs, args.min_seconds)
        for entry in tfl.values():
            got = entry.pop("logits_first_256", None)
            if got is not None:
                entry["vs_onnx_fp32_first_256"] = _agreement(reference[: len(got)], got)
        row["tflite"] = tfl
    return row


def _token_counts(tokenizer, dataset) -> np.ndarray:
    from cartosplit.device_runtime.text import encode

    return np.array([len(ids) for ids, _ in encode(tokenizer, dataset.texts, dataset.text_pairs)], dtype=np.int64)


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def _markdown(header: dict, rows: list[dict]) -> str:
    lines = [
        f"# Router size and latency — {header['task']}, depth {header['depth']}",
        "",
        f"Command: `{header['command']}`  ",
        f"Machine: {header['machine']}  ",
        f"Time: {header['created']} ({header['seconds']} s; load average at start {header['load_average']})  ",
        f"Fitted on {header['fit_samples']} training-subset samples (+ {header['holdout_samples']} held out for "
        f"the router's report), hidden size {header['hidden_size']}; latency at batch 1, {header['threads']} "
        f"thread, median over {header['calib_samples']} calibration-split samples cycled "
        "(includes the Python call into the runtime); int8 agreement: argmax vs the fp32 graph on the "
        "calibration split.",
        "",
        "| router | params + buffers | ONNX fp32 | ORT fp32 µs | ONNX int8 | ORT int8 µs | int8 argmax agr. "
        "| TFLite fp32 | LiteRT fp32 µs | TFLite int8 | held-out acc. (majority) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o32, o8 = r["onnx"]["fp32"], r["onnx"]["int8"]
        t = r.get("tflite", {})

        def tfl(tag, t=t):
            entry = t.get(tag)
            if entry is None:
                return "—"
            return "fails" if "error" in entry else _fmt_bytes(entry["bytes"])

        t32 = t.get("fp32", {})
        t32_us = f"{t32['latency']['p50_us']:.1f}" if "latency" in t32 else "—"
        rep = r["report"]
        lines.append(
            f"| {r['name']} | {_fmt_bytes(r['bytes']['total'])} | {_fmt_bytes(o32['bytes'])} "
            f"| {o32['latency']['p50_us']:.1f} | {_fmt_bytes(o8['bytes'])} | {o8['latency']['p50_us']:.1f} "
            f"| {o8['vs_fp32']['argmax_agreement']:.4f} | {tfl('fp32')} | {t32_us} | {tfl('int8')} "
            f"| {rep['holdout_accuracy']:.4f} ({rep['majority_accuracy']:.4f}) |"
        )
    failures = [
        f"- {r['name']} TFLite {tag}: {e['error']}"
        for r in rows
        for tag, e in r.get("tflite", {}).items()
        if "error" in e
    ]
    if failures:
        lines += ["", "TFLite conversions that failed:", *failures]
    lines += [
        "",
        "knn: k = 25 neighbours by cosine among at most 4,096 references (a seeded subset stratified by group), "
        "Laplace smoothing 1. fp16 stores the references in half precision and casts them to float32 in the "
        "graph (ONNX CastLike, which onnxruntime folds once at load; LiteRT runs the cast on every call, hence "
        "its latency). The int8 ONNX graph of an fp32 knn quantizes the references' MatMul (int8 "
        "similarities); that of an fp16 knn leaves it in float (its input is a cast, not a weight). "
        "Free features: + the max probability and the entropy of a linear label head at depth r, "
        "+ log(1 + token count).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("router-size", __doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    parser.add_argument("--depth", type=int, default=1, help="router depth (default: %(default)s)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=1, help="torch and runtime threads (default: 1)")
    parser.add_argument("--min-runs", type=int, default=3000, help="timed calls per graph (default: %(default)s)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="and at least this long (default: 1 s)")
    parser.add_argument("--no-tflite", action="store_true", help="skip the TFLite conversions")
    args = parser.parse_args(argv)

    from cartosplit.device_runtime.text import load_tokenizer
    from cartosplit.export.calibrate import load_calibration_data

    started = time.time()
    load_average = tuple(round(x, 2) for x in os.getloadavg())
    data = load_calibration_data(args.run)
    torch.set_num_threads(args.threads)  # after loading: the run's own thread setting is applied there
    tcfg = data.train_config
    if args.depth not in data.forward["train"][1]:
        parser.error(f"--depth {args.depth}: the run caches depths {sorted(data.forward['train'][1])}")
    tokenizer = load_tokenizer(data.run / "model" / "tokenizer.json", tcfg.max_length)
    train, calib = data.sets["train"], data.sets["calib"]
    train_tokens, calib_tokens = _token_counts(tokenizer, train), _token_counts(tokenizer, calib)
    features, calib_pooled = data.forward["train"][1][args.depth], data.forward["calib"][1][args.depth]

    rows = []
    with tempfile.TemporaryDirectory(prefix="router-size-") as tmp:
        for name in args.variants:
            cfg = RouterConfig(depth=args.depth, **VARIANTS[name])
            fit_started = time.time()
            router, report = fit_router(features, data.groups, cfg, labels=train.labels, n_tokens=train_tokens)
            fit_seconds = round(time.time() - fit_started, 2)
            folder = Path(tmp) / name.replace(" ", "_").replace("+", "plus")
            folder.mkdir()
            with contextlib.redirect_stdout(sys.stderr):  # converter chatter stays off the result lines
                row = measure(name, router, calib_pooled, calib_tokens, folder, args)
            row = {"config": asdict(cfg), "fit_seconds": fit_seconds, "report": report.to_dict(), **row}
            rows.append(row)
            o32, o8 = row["onnx"]["fp32"], row["onnx"]["int8"]
            print(
                f"{name:<16} {_fmt_bytes(row['bytes']['total']):>11}  onnx {_fmt_bytes(o32['bytes']):>10}"
                f"  {o32['latency']['p50_us']:7.1f} us  int8 agreement {o8['vs_fp32']['argmax_agreement']:.4f}",
                flush=True,
            )

    command = bench_command("router-size", argv)
    header = {
        "command": command,
        "machine": describe_machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        "load_average": load_average,
        "run": args.run,
        "task": tcfg.task,
        "model": tcfg.model,
        "depth": args.depth,
        "hidden_size": int(features.shape[1]),
        "fit_samples": rows[0]["report"]["fit_samples"],
        "holdout_samples": rows[0]["report"]["holdout_samples"],
        "calib_samples": len(calib_pooled),
        "threads": args.threads,
        "tflite": not args.no_tflite,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**header, "variants": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(header, rows))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} in {header['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
