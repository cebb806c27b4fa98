"""Bytes on the wire per offloaded sample, per activation encoding, and what each encoding does to accuracy.

    cartosplit bench bytes --bundle bundles/sst2-4k-all --out benchmarks/results/bytes

For every dev sample of the bundle's task (GLUE via the usual resolution, ``--data-dir``; or your own
``--data-file``) the device slice runs on onnxruntime fp32, and each offload a sample can make is built
as the tiers send it and measured as ``len(request.SerializeToString())`` (the serialized protobuf;
gRPC adds a 5-byte message prefix and HTTP/2 frame and header bytes on top):

- device -> edge: ``InferRequest`` with the hidden state at the device exit depth d;
- edge -> cloud: the edge's onward request, hidden state at depth e (plus the edge's timing record);
- device -> cloud: hidden state at the router depth r (a hard sample), when r > 0;
- for comparison, raw input: the text as UTF-8 (payload only), and the all-cloud request of token ids.

Encodings of a hidden state [S, H]: ``fp32-padded-max`` and ``fp32-padded-bucket`` (padded to the
bundle's max length, or to the smallest TFLite bucket that fits: what a device would send without
trimming; the wire has no mask field, so the receiver would also need the real length, not counted),
``fp32`` (trimmed to the real tokens: what cartosplit sends), ``fp16`` (the runtime's default), ``int8``
(per-tensor affine, ``cartosplit.protos.codec``).

Accuracy on dev, per encoding: the hidden state is encoded and decoded with ``cartosplit.protos.codec`` on every
hop it crosses, and the edge and cloud slices finish on onnxruntime fp32; labels and accuracy are
compared with the unencoded fp32 path (same graphs, no codec). Padded encodings run the whole chain at
the padded width with the mask marking the padding, as a receiver given the length would.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.report import bench_command, bench_parser, publish, pyplot
from cartosplit.device_runtime.manifest import Manifest, cloud_graph

HOPS = ("device_to_edge", "edge_to_cloud", "device_to_cloud")
HOP_NAMES = {
    "device_to_edge": "device → edge (d)",
    "edge_to_cloud": "edge → cloud (e)",
    "device_to_cloud": "device → cloud (r)",
}
ENCODINGS = ("fp32-padded-max", "fp32-padded-bucket", "fp32", "fp16", "int8")
EXITS = {
    "edge_exit": "edge exit",
    "final_via_edge": "final exit via the edge",
    "final_from_router": "final exit from r",
}
BATCH = 64  # rows per onnxruntime call; samples are grouped by length so nothing is padded unless asked


# -- requests as the tiers build them (pure) ---------------------------------------------------------------------


def hidden_request(bundle_id: str, depth: int, hidden: np.ndarray, encoding: int, edge_timing: bool = False):
    """The ``InferRequest`` carrying ``hidden`` [S, H], as ``DeviceRuntime._request`` builds it (and, with
    ``edge_timing``, as the edge forwards it: the edge's ``TierTiming`` attached)."""
    from cartosplit.protos import tiers_pb2 as pb
    from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor

    request = pb.InferRequest(
        request_id=uuid.uuid4().hex, bundle_id=bundle_id, protocol_version=PROTOCOL_VERSION, depth=depth
    )
    request.hidden.CopyFrom(encode_tensor(hidden, encoding))
    if edge_timing:
        request.timings.append(pb.TierTiming(tier=pb.EDGE, compute_ms=1.25, queue_ms=0.5))
    return request


def token_request(bundle_id: str, input_ids: list[int], token_type_ids: list[int]):
    """The all-cloud request: token ids as INT32, depth 0 (``DeviceRuntime._request(0, tokens=...)``)."""
    from cartosplit.protos import tiers_pb2 as pb
    from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor

    request = pb.InferRequest(
        request_id=uuid.uuid4().hex, bundle_id=bundle_id, protocol_version=PROTOCOL_VERSION, depth=0
    )
    request.input_ids.CopyFrom(encode_tensor(np.asarray(input_ids), pb.INT32))
    request.token_type_ids.CopyFrom(encode_tensor(np.asarray(token_type_ids), pb.INT32))
    return request


def wire_size(request) -> int:
    return len(request.SerializeToString())


def round_trip(hidden: np.ndarray, encoding: int) -> np.ndarray:
    """``hidden`` as the receiver decodes it after ``encoding`` (the codec the servers use)."""
    from cartosplit.protos import tiers_pb2 as pb
    from cartosplit.protos.codec import decode_tensor, encode_tensor

    return decode_tensor(encode_tensor(hidden, encoding), "hidden", 2, (pb.FP32, pb.FP16, pb.INT8), hidden.size)


def bucket_of(length: int, buckets: list[int]) -> int:
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(f"a sequence of {length} tokens fits no bucket {sorted(buckets)}")
    return fitting[0]


def compare(reference: np.ndarray, encoded: np.ndarray, labels: np.ndarray) -> dict:
    """Accuracy of both logits against gold labels, the change in points, label flips, max abs logit diff."""
    ref_pred, enc_pred = reference.argmax(1), encoded.argmax(1)
    ref_acc, enc_acc = float((ref_pred == labels).mean()), float((enc_pred == labels).mean())
    return {
        "reference_accuracy": ref_acc,
        "accuracy": enc_acc,
        "delta_points": 100 * (enc_acc - ref_acc),
        "label_flips": int((ref_pred != enc_pred).sum()),
        "max_abs_logit_diff": float(np.abs(reference - encoded).max()),
    }


def byte_stats(sizes: list[int]) -> dict:
    values = np.asarray(sizes, dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "min": int(values.min()),
        "max": int(values.max()),
    }


# -- the chain ----------------------------------------------------------------------------------------------------


class Chain:
    """Device slice, edge, cloud from e and cloud from r on onnxruntime fp32, batched over same-width samples."""

    def __init__(self, bundle, threads: int | None) -> None:
        from cartosplit.benchmarks.timing import DeviceSlice
        from cartosplit.device_runtime.onnx_backend import OnnxSession

        sp = bundle.split_points
        self.r, self.d, self.e = sp.router_depth, sp.device, sp.edge
        self.device = DeviceSlice(bundle, "onnx-fp32", threads)
        self.edge = OnnxSession(bundle.graph_file("edge", "onnx-fp32"), threads)
        self.cloud_e = OnnxSession(bundle.graph_file(cloud_graph(self.e), "onnx-fp32"), threads)
        self.cloud_r = OnnxSession(bundle.graph_file(cloud_graph(self.r), "onnx-fp32"), threads) if self.r else None

    def run(self, tokens: dict[str, np.ndarray], transform=None) -> dict[str, np.ndarray]:
        """Logits at each receiving exit, hidden states at r, d, e; ``transform(hidden [B,S,H], mask)`` stands
        for the wire on each hop (None: no wire)."""
        mask = tokens["attention_mask"]
        wire = transform or (lambda hidden, _mask: hidden)
        out = self.device.run(tokens)
        hidden_e, edge_logits = self.edge.run([wire(out.hidden_d, mask), mask])
        (final,) = self.cloud_e.run([wire(hidden_e, mask), mask])
        result = {"edge_exit": edge_logits, "final_via_edge": final, "hidden_r": out.hidden_r}
        result |= {"hidden_d": out.hidden_d, "hidden_e": hidden_e}
        if self.cloud_r is not None:
            (result["final_from_router"],) = self.cloud_r.run([wire(out.hidden_r, mask), mask])
        return result


def _codec_wire(encoding: int):
    """Each row trimmed to its real tokens, encoded and decoded as one request, then put back."""

    def wire(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = hidden.copy()
        for row in range(hidden.shape[0]):
            real = int(mask[row].sum())
            out[row, :real] = round_trip(hidden[row, :real], encoding)
        return out

    return wire


def _pad_tokens(tokens: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    from cartosplit.device_runtime.buckets import pad_to

    return {k: pad_to(v, width) for k, v in tokens.items()}


def measure(bundle, encoded: list, texts: list[str], labels: np.ndarray, threads: int | None, buckets) -> dict:
    """Bytes per hop and encoding for every sample, and accuracy per encoding (see the module docstring)."""
    from cartosplit.device_runtime.text import pad_batch
    from cartosplit.protos import tiers_pb2 as pb

    max_length = bundle.manifest.model.max_length
    chain = Chain(bundle, threads)
    codes = {"fp32": pb.FP32, "fp16": pb.FP16, "int8": pb.INT8}
    encodings = [e for e in ENCODINGS if e != "fp32-padded-bucket" or buckets]
    widths = {"fp32-padded-max": lambda n: max_length, "fp32-padded-bucket": lambda n: bucket_of(n, buckets)}
    hops = [h for h in HOPS if h != "device_to_cloud" or chain.r > 0]
    exits = [x for x in EXITS if x != "final_from_router" or chain.r > 0]
    depth_of = {"device_to_edge": chain.d, "edge_to_cloud": chain.e, "device_to_cloud": chain.r}
    hidden_of = {"device_to_edge": "hidden_d", "edge_to_cloud": "hidden_e", "device_to_cloud": "hidden_r"}

    n = len(encoded)
    sizes = {(hop, enc): [0] * n for hop in hops for enc in encodings}
    logits = {enc: {x: [None] * n for x in exits} for enc in ("reference", *encodings)}
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, (ids, _) in enumerate(encoded):
        by_length[len(ids)].append(i)
    for length, members in sorted(by_length.items()):
        for start in range(0, len(members), BATCH):
            idx = members[start : start + BATCH]
            tokens = pad_batch([encoded[i] for i in idx])
            runs = {"reference": chain.run(tokens)}
            for enc in ("fp32", "fp16", "int8"):
                runs[enc] = chain.run(tokens, _codec_wire(codes[enc]))
            for enc in encodings:
                if enc.startswith("fp32-padded"):
                    runs[enc] = chain.run(_pad_tokens(tokens, widths[enc](length)))
            for enc, result in runs.items():
                for x in exits:
                    for row, i in enumerate(idx):
                        logits[enc][x][i] = result[x][row]
            for hop in hops:
                for enc in encodings:
                    padded = enc.startswith("fp32-padded")
                    hidden = runs[enc if padded else "reference"][hidden_of[hop]]
                    code = pb.FP32 if padded else codes[enc]
                    for row, i in enumerate(idx):
                        request = hidden_request(
                            bundle.bundle_id, depth_of[hop], hidden[row], code, edge_timing=hop == "edge_to_cloud"
                        )
                        sizes[(hop, enc)][i] = wire_size(request)

    raw = {
        "text_utf8": [len(t.encode("utf-8")) for t in texts],
        "token_ids_all_cloud": [wire_size(token_request(bundle.bundle_id, ids, types)) for ids, types in encoded],
    }
    reference = {x: np.stack(logits["reference"][x]) for x in exits}
    accuracy = {enc: {x: compare(reference[x], np.stack(logits[enc][x]), labels) for x in exits} for enc in encodings}
    fp32_mean = {hop: float(np.mean(sizes[(hop, "fp32")])) for hop in hops}
    return {
        "samples": n,
        "tokens_mean": float(np.mean([len(ids) for ids, _ in encoded])),
        "tokens_max": int(max(len(ids) for ids, _ in encoded)),
        "encodings": encodings,
        "hops": hops,
        "bytes": {
            hop: {
                enc: {**byte_stats(sizes[(hop, enc)]), "vs_fp32": float(np.mean(sizes[(hop, enc)])) / fp32_mean[hop]}
                for enc in encodings
            }
            for hop in hops
        },
        "raw_input_bytes": {k: byte_stats(v) for k, v in raw.items()},
        "accuracy": accuracy,
    }


# -- report ---------------------------------------------------------------------------------------------------------


def markdown(r: dict) -> list[str]:
    hops = r["hops"]
    lines = [
        f"# Bytes on the wire per offloaded sample — {r['model']}, bundle `{r['bundle']}`",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Data: {r['data']}: {r['samples']} samples, {r['tokens_mean']:.1f} tokens on average (max "
        f"{r['tokens_max']}). Split r={r['split_points']['router_depth']}, d={r['split_points']['device']}, "
        f"e={r['split_points']['edge']}, L={r['split_points']['total']}; hidden {r['hidden_size']}. "
        f"Took {r['seconds']} s.",
        "",
        "Bytes = `len(InferRequest.SerializeToString())` as the device (or, for e, the edge) sends it: request id, "
        "bundle id, protocol version, depth, the tensor (raw bytes + encoding + shape). gRPC framing is not counted. "
        "`fp32` = trimmed to the real tokens (what cartosplit sends); `fp16` is the runtime's default.",
        "",
        "## Bytes per sample (mean; median / p95 in brackets)",
        "",
        "| encoding | " + " | ".join(HOP_NAMES[h] for h in hops) + " | vs fp32 |",
        "|---|" + "---|" * (len(hops) + 1),
    ]
    for enc in r["encodings"]:
        cells = [f"{b['mean']:,.0f} ({b['median']:,.0f} / {b['p95']:,.0f})" for b in (r["bytes"][h][enc] for h in hops)]
        lines.append(f"| {enc} | " + " | ".join(cells) + f" | {r['bytes'][hops[0]][enc]['vs_fp32']:.2f}x |")
    raw = r["raw_input_bytes"]
    lines += [
        "",
        "Raw input, for comparison: text as UTF-8 (payload only) "
        f"{raw['text_utf8']['mean']:,.0f} bytes on average ({raw['text_utf8']['median']:,.0f} / "
        f"{raw['text_utf8']['p95']:,.0f}); the all-cloud request of token ids (INT32) "
        f"{raw['token_ids_all_cloud']['mean']:,.0f} bytes ({raw['token_ids_all_cloud']['median']:,.0f} / "
        f"{raw['token_ids_all_cloud']['p95']:,.0f}).",
        "",
        "## Accuracy change on dev per encoding (vs the unencoded fp32 path)",
        "",
        "The hidden state goes through the codec on every hop it crosses; edge and cloud finish on onnxruntime "
        "fp32. Δ in accuracy points; flips = dev samples whose label changes; max |Δlogit| over all samples.",
        "",
    ]
    exits = list(next(iter(r["accuracy"].values())))
    lines += [
        "| encoding | " + " | ".join(f"{EXITS[x]}: acc (Δ pt, flips, max abs Δlogit)" for x in exits) + " |",
        "|---|" + "---|" * len(exits),
    ]
    for enc, per_exit in r["accuracy"].items():
        cells = [
            f"{a['accuracy']:.4f} ({a['delta_points']:+.2f}, {a['label_flips']}, {a['max_abs_logit_diff']:.1e})"
            for a in (per_exit[x] for x in exits)
        ]
        lines.append(f"| {enc} | " + " | ".join(cells) + " |")
    reference = next(iter(r["accuracy"].values()))
    lines += [
        "",
        "Reference (unencoded fp32) accuracy: "
        + ", ".join(f"{EXITS[x]} {reference[x]['reference_accuracy']:.4f}" for x in exits)
        + ".",
    ]
    if r.get("skipped"):
        lines += [""] + [f"- Skipped {s['what']}: {s['reason']}" for s in r["skipped"]]
    if r.get("plot"):
        lines += ["", f"![bytes per encoding]({Path(r['plot']).name})"]
    return lines


def plot(r: dict, path: Path) -> None:
    plt = pyplot()

    hops, encodings = r["hops"], r["encodings"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(encodings)
    for k, enc in enumerate(encodings):
        means = [r["bytes"][h][enc]["mean"] for h in hops]
        ax.bar(np.arange(len(hops)) + (k - (len(encodings) - 1) / 2) * width, means, width, label=enc)
    raw = r["raw_input_bytes"]
    x = len(hops)
    ax.bar(x - 0.2, raw["text_utf8"]["mean"], 0.35, color="0.55", label="text (UTF-8)")
    ax.bar(x + 0.2, raw["token_ids_all_cloud"]["mean"], 0.35, color="0.3", label="token ids (all-cloud)")
    ax.set_xticks(range(len(hops) + 1), [HOP_NAMES[h] for h in hops] + ["raw input"])
    ax.set_yscale("log")
    ax.set_ylabel("bytes per sample (mean, log scale)")
    ax.set_title(f"Bytes on the wire per offloaded sample ({r['samples']} samples)")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("bytes", __doc__)
    parser.add_argument("--bundle", required=True, help="bundle folder (needs onnx-fp32 graphs)")
    parser.add_argument("--data-dir", help="GLUE folder (default: the usual resolution, see cartosplit.export.data)")
    parser.add_argument("--data-file", help="your own labelled CSV / JSON Lines instead of the task's GLUE dev set")
    parser.add_argument("--limit", type=int, help="only the first N samples")
    parser.add_argument("--threads", type=int, help="onnxruntime threads (default: its own choice)")
    parser.add_argument("--out", default="benchmarks/results/bytes", help="path prefix for .json, .md and .png")
    return parser


def _load_data(args: argparse.Namespace, manifest: Manifest):
    """The labelled samples and a description, or (None, reason) when there is no data to use."""
    from cartosplit.export.data import DataError, load_file, load_glue

    labels = manifest.model.labels
    if args.data_file:
        return load_file(args.data_file, label_names=labels), f"`{args.data_file}`"
    task = manifest.model.task
    if not task:
        return None, "the bundle names no GLUE task: pass --data-file with labelled texts"
    try:
        return load_glue(task, "dev", args.data_dir), f"{task} dev (GLUE)"
    except (DataError, ImportError, OSError) as exc:
        return None, f"no {task} dev data ({exc}); pass --data-dir or --data-file"


def main(argv: list[str] | None = None) -> int:
    from cartosplit.device_runtime.bundle import load_bundle
    from cartosplit.device_runtime.text import encode, load_tokenizer

    args = build_parser().parse_args(argv)
    if args.limit is not None and args.limit < 1:
        raise SystemExit("--limit must be >= 1")
    started = time.time()
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    if "onnx-fp32" not in m.formats:
        raise SystemExit(f"{args.bundle} has no onnx-fp32 graphs, which this benchmark runs")
    data, what = _load_data(args, m)
    if data is None:
        print(f"cartosplit bench bytes: skipped, nothing written: {what}", file=sys.stderr)
        return 0
    if args.limit is not None:
        data = data.subset(range(min(args.limit, len(data))))
    tokenizer = load_tokenizer(bundle.path(m.tokenizer), m.model.max_length)
    encoded = encode(tokenizer, data.texts, data.text_pairs)
    texts = data.texts if data.text_pairs is None else [a + b for a, b in zip(data.texts, data.text_pairs, strict=True)]
    tflite = [f for f in ("tflite-fp32", "tflite-int8") if f in m.formats]
    buckets = sorted(m.formats[tflite[0]].buckets) if tflite else []
    report = measure(bundle, encoded, texts, np.asarray(data.labels), args.threads, buckets)
    skipped = []
    if not buckets:
        skipped.append({"what": "fp32-padded-bucket", "reason": "the bundle has no TFLite buckets"})
    if m.split_points.router_depth == 0:
        skipped.append({"what": "device → cloud (r)", "reason": "r = 0: a hard sample goes as tokens"})
    report = {
        "bundle": args.bundle,
        "model": m.model.id,
        "data": what,
        "split_points": asdict(m.split_points),
        "hidden_size": m.model.hidden_size,
        "buckets": buckets,
        "max_length": m.model.max_length,
        **report,
        "skipped": skipped,
        "seconds": round(time.time() - started, 1),
    }
    publish(report, args.out, bench_command("bytes", argv), markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
