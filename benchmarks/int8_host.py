"""Does an int8 answer depend on the CPU? The bundle's graphs natively and on an emulated x86 CPU without VNNI.

    cartosplit bench int8-host --bundle bundles/demo-static --cpu Haswell --limit 200 \
        --out benchmarks/results/int8-host

onnxruntime picks its int8 kernels from the CPU's features. Without VNNI (AVX2 only, e.g. Haswell) its
u8 x s8 kernels add pairs of products into 16 bits, which saturates with 8-bit weights; with VNNI, or on ARM,
they do not. This runs the bundle's tier chain (device head, tail, edge, cloud) one input at a time, here
and under ``qemu-x86_64 -cpu CPU`` (user-mode emulation of that CPU model, same binaries), and compares
each exit's logits and labels, for:

- ``onnx-fp32`` (float rounding only);
- ``onnx-int8`` (the bundle's; static with 7-bit weights since static int8);
- ``onnx-int8 dynamic QInt8`` (the same fp32 graphs quantized here dynamically with 8-bit QInt8 weights per
  channel: what an older bundle could hold).

Needs ``qemu-x86_64`` (Debian: ``apt install qemu-user``) on an x86-64 host; emulation is slow (~10-30x).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.machine import describe_machine
from cartosplit.benchmarks.report import bench_command, bench_parser, bounds_table, check, publish
from cartosplit.device_runtime.cpu_features import read_cpu_features
from cartosplit.device_runtime.manifest import DEVICE_HEAD, DEVICE_TAIL, EDGE, ONNX_FP32, ONNX_INT8, cloud_graph

EXITS = ("router", "device", "edge", "final")
# static int8: exact integer products everywhere; only float rounding in its fp32 parts can move a value
# across one quantization step (the bound the aarch64 check uses too)
STATIC_INT8_CROSS_HOST_ATOL = 0.05


def probe(folders: dict[str, str], texts_file: str, tokenizer: str, max_length: int, e: int, out: str) -> None:
    """Every exit's logits, one input at a time, per graph folder; written as JSON to ``out``."""
    from cartosplit.benchmarks.int8_batch import chain_logits
    from cartosplit.device_runtime.onnx_backend import OnnxSession
    from cartosplit.device_runtime.text import encode, load_tokenizer, pad_batch

    texts = Path(texts_file).read_text(encoding="utf-8").splitlines()
    encoded = encode(load_tokenizer(tokenizer, max_length), texts, None)
    graphs = (DEVICE_HEAD, DEVICE_TAIL, EDGE, cloud_graph(e))
    result = {}
    for name, folder in folders.items():
        sessions = {g: OnnxSession(Path(folder) / f"{g}.onnx", 1) for g in graphs}
        rows: dict[str, list] = {k: [] for k in EXITS}
        for x in encoded:
            logits = chain_logits(sessions, pad_batch([x]), e)
            for k in EXITS:
                rows[k].append(logits[k][0].tolist())
        result[name] = rows
    Path(out).write_text(json.dumps(result))


def compare(native: dict, emulated: dict) -> dict:
    out = {}
    for name in native:
        a, b = native[name], emulated[name]
        out[name] = {
            "max_abs_diff": {k: float(np.abs(np.asarray(a[k]) - np.asarray(b[k])).max()) for k in EXITS},
            "label_agreement": {
                k: float((np.asarray(a[k]).argmax(1) == np.asarray(b[k]).argmax(1)).mean()) for k in EXITS
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("int8-host", __doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--cpu", default="Haswell", help="qemu CPU model without VNNI (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=200, help="dev inputs (default: %(default)s)")
    parser.add_argument("--data-dir", help="GLUE folder (default: ../shared/data/glue, then `datasets`)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the emulated run")
    parser.add_argument("--out", default="benchmarks/results/int8-host")
    args = parser.parse_args(argv)
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        print("needs qemu-x86_64 (apt install qemu-user)", file=sys.stderr)
        return 2

    from cartosplit.device_runtime.bundle import load_bundle
    from cartosplit.export.data import load_glue
    from cartosplit.export.onnx_export import quantize_int8

    bundle = load_bundle(args.bundle)
    task = bundle.manifest.model.task or "sst2"
    dev = load_glue(task, "dev", args.data_dir)
    e = bundle.split_points.edge
    graphs = (DEVICE_HEAD, DEVICE_TAIL, EDGE, cloud_graph(e))
    with tempfile.TemporaryDirectory() as tmp:
        texts = Path(tmp) / "texts.txt"
        texts.write_text("\n".join(t.replace("\n", " ") for t in dev.texts[: args.limit]) + "\n", encoding="utf-8")
        dynamic = Path(tmp) / "dynamic"
        for g in graphs:
            quantize_int8(bundle.graph_file(g, ONNX_FP32), dynamic / f"{g}.onnx", "QInt8", True)
        folders = {
            ONNX_FP32: str(bundle.graph_file(DEVICE_HEAD, ONNX_FP32).parent),
            ONNX_INT8: str(bundle.graph_file(DEVICE_HEAD, ONNX_INT8).parent),
            "onnx-int8 dynamic QInt8": str(dynamic),
        }
        spec = json.dumps(
            [folders, str(texts), str(bundle.path(bundle.manifest.tokenizer)), bundle.manifest.model.max_length, e]
        )
        runs = {}
        for where, prefix in (("native", []), ("emulated", [qemu, "-cpu", args.cpu])):
            out = Path(tmp) / f"{where}.json"
            code = (
                "import json, sys; from cartosplit.benchmarks.int8_host import probe; "
                "probe(*json.loads(sys.argv[1]), sys.argv[2])"
            )
            print(f"{where} ...", file=sys.stderr, flush=True)
            subprocess.run(
                [*prefix, sys.executable, "-c", code, spec, str(out)],
                check=True,
                timeout=args.timeout,
                stderr=subprocess.DEVNULL,
            )
            runs[where] = json.loads(out.read_text())
    results = compare(runs["native"], runs["emulated"])
    int8 = bundle.manifest.formats.get(ONNX_INT8)
    static = bool(getattr(int8, "batch_independent", False))
    worst = max(results[ONNX_INT8]["max_abs_diff"].values())
    labels = min(results[ONNX_INT8]["label_agreement"].values())
    checks = [
        check(
            "onnx-fp32: max abs diff across CPUs",
            f"{max(results[ONNX_FP32]['max_abs_diff'].values()):.2e}",
            "<= 1e-3",
            max(results[ONNX_FP32]["max_abs_diff"].values()) <= 1e-3,
        ),
    ]
    if static:
        checks += [
            check(
                "onnx-int8 (static): max abs diff of any logits across CPUs",
                f"{worst:.2e}",
                f"<= {STATIC_INT8_CROSS_HOST_ATOL}",
                worst <= STATIC_INT8_CROSS_HOST_ATOL,
            ),
            check("onnx-int8 (static): label agreement across CPUs, every exit", labels, "== 1.0", labels == 1.0),
        ]
    report = {
        "machine": describe_machine(("onnxruntime",)),
        "cpu": read_cpu_features().summary(),
        "emulated_cpu": f"qemu-x86_64 -cpu {args.cpu}",
        "bundle": str(args.bundle),
        "int8_quantization": getattr(int8, "quantization", None),
        "inputs": min(args.limit, len(dev.texts)),
        "formats": results,
        "checks": checks,
        "passed": all(c["held"] for c in checks),
    }
    publish(report, args.out, bench_command("int8-host", argv), _markdown)
    return 0 if report["passed"] else 1


def _markdown(r: dict) -> list[str]:
    lines = [
        "# int8 answers and the CPU",
        "",
        f"`{r['command']}`  ",
        f"Host: {r['machine']}; int8 dot product here: {r['cpu'].get('int8_dot')}. Emulated: {r['emulated_cpu']} "
        f"(AVX2, no AVX-512, no VNNI). Bundle {r['bundle']} (int8: {r['int8_quantization']}); {r['inputs']} SST-2 dev "
        "inputs, one at a time.",
        "",
        "| graphs | max abs diff of logits (router / device / edge / final) | labels agreeing (same order) |",
        "|---|---|---|",
    ]
    for name, f in r["formats"].items():
        diffs = " / ".join(f"{f['max_abs_diff'][k]:.2e}" for k in EXITS)
        agree = " / ".join(f"{f['label_agreement'][k]:.3f}" for k in EXITS)
        lines.append(f"| {name} | {diffs} | {agree} |")
    lines += ["", *bounds_table(r["checks"])]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
