"""Dev accuracy of every exit in each exported format, next to torch; file sizes; device-graph latency.

    cartosplit bench export-formats --bundle bundles/sst2-4k --run runs/sst2-4k \
        --out benchmarks/results/sst2-4k-export-formats

ONNX graphs run as the tiers chain them (device head -> device tail -> edge -> cloud), in batches
of 32; TFLite graphs (device only) run at batch 1, each sample padded to the smallest bucket that
fits, as a phone would. Latency: median over the first 200 dev samples, batch 1, device graphs
only (head + tail), on this machine's CPU with --threads threads.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cartosplit.benchmarks.machine import describe_machine
from cartosplit.benchmarks.report import bench_command, bench_parser
from cartosplit.benchmarks.timing import DeviceSlice
from cartosplit.device_runtime.bundle import FORMATS, Bundle, load_bundle
from cartosplit.device_runtime.manifest import cloud_graph
from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch

EXITS = ("device", "edge", "final")


def _onnx_accuracy(bundle: Bundle, fmt: str, encoded: list, labels: np.ndarray, threads: int) -> dict:
    from cartosplit.device_runtime.onnx_backend import OnnxSession

    cloud = cloud_graph(bundle.split_points.edge)
    names = ("device_head", "device_tail", "edge", cloud, "full")
    sessions = {n: OnnxSession(bundle.graph_file(n, fmt), threads) for n in names}
    preds = {k: np.zeros(len(encoded), dtype=np.int64) for k in (*EXITS, "full")}
    router = np.zeros(len(encoded), dtype=np.int64)
    order = np.argsort([len(ids) for ids, _ in encoded], kind="stable")
    for start in tqdm(range(0, len(order), 32), desc=fmt, leave=False):
        idx = order[start : start + 32]
        batch = pad_batch([encoded[i] for i in idx])
        tokens = [batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]]
        mask = batch["attention_mask"]
        router_logits, hidden_r = sessions["device_head"].run(tokens)
        hidden_d, device_logits = sessions["device_tail"].run([hidden_r, mask])
        hidden_e, edge_logits = sessions["edge"].run([hidden_d, mask])
        (final_logits,) = sessions[cloud].run([hidden_e, mask])
        (full_logits,) = sessions["full"].run(tokens)
        for key, logits in zip((*EXITS, "full"), (device_logits, edge_logits, final_logits, full_logits), strict=True):
            preds[key][idx] = logits.argmax(1)
        router[idx] = router_logits.argmax(1)
    device = DeviceSlice(bundle, fmt, threads)
    latency = []
    for ids, types in encoded[:200]:
        single = pad_batch([(ids, types)])
        began = time.perf_counter()
        device.run(single)
        latency.append(1000 * (time.perf_counter() - began))
    return {
        "accuracy": {k: float((v == labels).mean()) for k, v in preds.items()},
        "router_groups": router.tolist(),
        "device_ms_median": float(np.median(latency)),
    }


def _tflite_accuracy(bundle: Bundle, fmt: str, encoded: list, labels: np.ndarray, threads: int) -> dict:
    device = DeviceSlice(bundle, fmt, threads)  # pads each sample to the smallest bucket that fits
    preds = np.zeros(len(encoded), dtype=np.int64)
    router = np.zeros(len(encoded), dtype=np.int64)
    latency = []
    for i, (ids, types) in enumerate(tqdm(encoded, desc=fmt, leave=False)):
        single = pad_batch([(ids, types)])
        began = time.perf_counter()
        out = device.run(single)
        if i < 200:
            latency.append(1000 * (time.perf_counter() - began))
        preds[i] = out.device_logits.argmax(1)[0]
        router[i] = out.router_logits.argmax(1)[0]
    return {
        "accuracy": {"device": float((preds == labels).mean())},
        "router_groups": router.tolist(),
        "device_ms_median": float(np.median(latency)),
    }


def _torch_accuracy(run: Path, encoded: list, labels: np.ndarray) -> dict:
    from cartosplit.export.model import MultiExitBert
    from cartosplit.export.train import predict_probs

    probs, _ = predict_probs(MultiExitBert.load(run / "model"), encoded)
    return {"accuracy": {k: float((probs[i].argmax(1) == labels).mean()) for i, k in enumerate(EXITS)}}


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("export-formats", __doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--run", help="the run the bundle came from: adds the torch reference")
    parser.add_argument("--data-dir", help="GLUE folder (default: the usual resolution)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True, help="path prefix for .json and .md")
    args = parser.parse_args(argv)

    from cartosplit.export.data import load_glue

    started = time.time()
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if not m.model.task:
        raise SystemExit("export-formats scores GLUE dev accuracy; this bundle was trained on its own data files")
    dev = load_glue(m.model.task, "dev", args.data_dir)
    tokenizer = load_tokenizer(bundle.path(m.tokenizer), m.model.max_length)
    encoded = encode(tokenizer, dev.texts, dev.text_pairs)
    labels = dev.labels

    results: dict[str, dict] = {}
    if args.run:
        results["torch"] = _torch_accuracy(Path(args.run), encoded, labels)
    for fmt in FORMATS:
        if fmt not in m.formats:
            continue
        runner = _onnx_accuracy if fmt.startswith("onnx") else _tflite_accuracy
        results[fmt] = runner(bundle, fmt, encoded, labels, args.threads)
    reference = results.get("onnx-fp32", {}).get("router_groups")
    for r in results.values():
        groups = r.pop("router_groups", None)
        if groups is not None and reference is not None:
            r["router_argmax_agreement_with_onnx_fp32"] = float(np.mean(np.array(groups) == np.array(reference)))

    sizes: dict[str, dict[str, float]] = {}
    for graph, spec in m.graphs.items():
        for fmt, rel in spec.files.items():
            sizes.setdefault(fmt, {})[graph] = m.files[rel].size / 1e6
        for fmt, by_bucket in spec.bucket_files.items():
            for bucket, rel in by_bucket.items():
                sizes.setdefault(fmt, {})[f"{graph} ({bucket})"] = m.files[rel].size / 1e6

    command = bench_command("export-formats", argv)
    int8 = m.formats.get("onnx-int8")
    report = {
        "command": command,
        "machine": describe_machine(),
        "seconds": round(time.time() - started, 1),
        "bundle": args.bundle,
        "task": m.model.task,
        "model": m.model.id,
        "dev_samples": len(labels),
        "results": results,
        "sizes_mb": sizes,
        "validation": m.validation.to_dict(),
        "int8_choice": {k: v for k, v in int8.to_dict().items() if k != "opset"} if int8 else {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")

    lines = [
        f"# Exported formats — {m.model.task}, {m.model.id}",
        "",
        f"Command: `{command}`  ",
        f"Machine: {report['machine']}  ",
        f"Dev samples: {len(labels)}. Took {report['seconds']} s.",
        "",
        "## Dev accuracy per exit",
        "",
        "| format | device exit | edge exit | final exit | full graph | router argmax = fp32 "
        "| device ms (b=1, median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for fmt, r in results.items():
        acc = r["accuracy"]
        cells = [f"{acc[k]:.4f}" if k in acc else "—" for k in (*EXITS, "full")]
        agree = r.get("router_argmax_agreement_with_onnx_fp32")
        ms = r.get("device_ms_median")
        lines.append(
            f"| {fmt} | " + " | ".join(cells) + f" | {'—' if agree is None else f'{agree:.4f}'} "
            f"| {'—' if ms is None else f'{ms:.2f}'} |"
        )
    lines += ["", "## File sizes (MB)", "", "| format | graph | MB |", "|---|---|---|"]
    for fmt, graphs in sizes.items():
        for graph, mb in graphs.items():
            lines.append(f"| {fmt} | {graph} | {mb:.2f} |")
    lines += ["", "## Parity at export (held-out calibration samples, vs torch)", ""]
    for fmt, v in m.validation.formats.items():
        if not v.max_abs_diff:  # refused before it could be measured (its export raised)
            lines.append(f"- {fmt}: refused, not measured: {'; '.join(v.failures)}")
            continue
        worst = max(v.max_abs_diff.values())
        agree = ", ".join(f"{k} {x:.4f}" for k, x in v.agreement.items())
        refused = "" if v.passed else f" (refused: {'; '.join(v.failures)})"
        lines.append(f"- {fmt}: max abs logit diff {worst:.2e}; agreement {agree}{refused}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
