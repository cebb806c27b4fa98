"""Tier bundles: the bytes a device holds against the bytes it loads, and its start-up, tier bundle vs full bundle.

    cartosplit bench tier-bundles --bundle bundles/sst2 --out benchmarks/results/tier-bundles

For each device format the full bundle has (onnx-int8, onnx-fp32, tflite-int8, tflite-fp32), the device tier
bundle in that format alone is cut (``cartosplit bundle split``) into a temporary folder (``--work``), then:

- bytes: the tier bundle on disk; what the device loads from it (the graph files ``DeviceRuntime`` opens,
  ``device_head`` and ``device_tail``, every sequence bucket for TFLite, plus the tokenizer and manifest.json);
  the full bundle on disk. Goal: tier bundle / loaded <= 1.1.
- start-up: ``load_bundle`` (sizes and sha256 of every file the manifest lists) + ``DeviceRuntime``
  construction (onnxruntime for onnx-*, LiteRT for tflite-*) + the first answer on one sentence, device only
  (no edge, no cloud); the median of ``--repeats``, tier and full bundle alternating, in this process, with the
  files in the page cache (a cold start reads from storage every byte it hashes: the full bundle's all).

The edge and cloud tier bundles' bytes are reported beside, per server format (onnx-fp32, onnx-int8): each holds
every ONNX format of its graphs unless cut with ``--formats``, so they are cut here in one format each.
Torch-free: runs on the device itself.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from cartosplit.benchmarks.report import bench_command, bench_parser, bounds_table, check, publish
from cartosplit.device_runtime.bundle import MANIFEST_FILE, Bundle, load_bundle
from cartosplit.device_runtime.manifest import (
    CLOUD_TIER,
    DEVICE_TIER,
    EDGE_TIER,
    FORMATS,
    ONNX_FP32,
    ONNX_INT8,
    graphs_of_tier,
)
from cartosplit.device_runtime.tier_bundles import bundle_size, cut_tier_bundle, tier_formats

NAME = "tier-bundles"
GOAL_RATIO = 1.1  # tier bundle bytes / bytes the device loads
SENTENCE = "a quietly moving film with a few slow stretches"
SERVER_FORMATS = (ONNX_FP32, ONNX_INT8)


def loaded_bytes(bundle: Bundle, tier: str, fmt: str) -> dict[str, int]:
    """Bytes a tier reads from ``bundle`` when it runs ``fmt``: its graph files, the tokenizer (device), manifest."""
    m = bundle.manifest
    paths = []
    for graph in graphs_of_tier(tier, m.split_points):
        spec = m.graphs[graph]
        paths += [spec.files[fmt]] if fmt in spec.files else list(spec.bucket_files[fmt].values())
    parts = {"graphs": sum(m.files[rel].size for rel in paths)}
    parts["tokenizer"] = m.files[m.tokenizer].size if tier == DEVICE_TIER else 0
    parts["manifest"] = bundle.path(MANIFEST_FILE).stat().st_size
    parts["total"] = sum(parts.values())
    return parts


def start_up(folder: Path, fmt: str, threads: int) -> dict[str, float]:
    """Seconds to verify the bundle, build the device runtime, and answer one sentence on the device."""
    from cartosplit.device_runtime.runtime import DeviceRuntime

    began = time.perf_counter()
    bundle = load_bundle(folder)  # verified: every listed file hashed
    verified = time.perf_counter()
    backend = "onnxruntime" if fmt.startswith("onnx") else "litert"
    runtime = DeviceRuntime(bundle, backend=backend, fmt=fmt, threads=threads)
    built = time.perf_counter()
    (answer,) = runtime.predict([SENTENCE])
    answered = time.perf_counter()
    runtime.close()
    assert answer.tier == "device", answer  # no tier is configured: the device answers
    return {
        "verify_ms": 1000 * (verified - began),
        "construct_ms": 1000 * (built - verified),
        "first_answer_ms": 1000 * (answered - built),
        "total_ms": 1000 * (answered - began),
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def _backend_missing(fmt: str) -> str | None:
    try:
        if fmt.startswith("onnx"):
            import onnxruntime  # noqa: F401
        else:
            import ai_edge_litert  # noqa: F401

            from cartosplit.device_runtime.litert_backend import LiteRTSession  # noqa: F401
    except ImportError as exc:
        return f"{fmt}: its runtime is not installed ({exc}); skipped"
    return None


def measure_device(full: Bundle, fmt: str, work: Path, repeats: int, threads: int) -> dict:
    began = time.perf_counter()
    folder = cut_tier_bundle(full.folder, DEVICE_TIER, [fmt], work / f"device-{fmt}")
    cut_s = time.perf_counter() - began
    tier = load_bundle(folder, verify=False)  # verified by the cut
    tier_bytes, full_bytes = bundle_size(folder), bundle_size(full.folder)
    loaded = loaded_bytes(tier, DEVICE_TIER, fmt)
    runs: dict[str, list] = {"tier": [], "full": []}
    for i in range(repeats):
        order = ("tier", "full") if i % 2 == 0 else ("full", "tier")  # neither always goes first
        for which in order:
            runs[which].append(start_up(folder if which == "tier" else full.folder, fmt, threads))
    tier_up, full_up = _median(runs["tier"]), _median(runs["full"])
    return {
        "format": fmt,
        "cut_s": round(cut_s, 3),
        "tier_bundle_bytes": tier_bytes,
        "tier_bundle_files": len(tier.manifest.files) + 1,
        "loaded_bytes": loaded,
        "full_loaded_bytes": loaded_bytes(full, DEVICE_TIER, fmt)["total"],
        "full_bundle_bytes": full_bytes,
        "full_bundle_files": len(full.manifest.files) + 1,
        "ratio_tier_to_loaded": round(tier_bytes / loaded["total"], 4),
        "ratio_full_to_loaded": round(full_bytes / loaded["total"], 2),
        "start_up_tier": tier_up,
        "start_up_full": full_up,
        "start_up_speedup": round(full_up["total_ms"] / tier_up["total_ms"], 2) if tier_up["total_ms"] else None,
        "runs": runs,
    }


def measure_server(full: Bundle, tier: str, fmt: str, work: Path) -> dict:
    folder = cut_tier_bundle(full.folder, tier, [fmt], work / f"{tier}-{fmt}")
    cut = load_bundle(folder, verify=False)
    size, loaded = bundle_size(folder), loaded_bytes(cut, tier, fmt)["total"]
    return {
        "tier": tier,
        "format": fmt,
        "tier_bundle_bytes": size,
        "loaded_bytes": loaded,
        "ratio_tier_to_loaded": round(size / loaded, 4),
        "full_bundle_bytes": bundle_size(full.folder),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def markdown(r: dict) -> list[str]:
    lines = [
        "# Tier bundles: bytes held vs bytes loaded, and start-up",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Full bundle: {r['bundle']} (id {r['bundle_id'][:12]}, {r['model']}): {_mb(r['full_bundle_bytes'])} MB, "
        f"{r['full_bundle_files']} files. Start-up: median of {r['repeats']} (tier and full alternating), "
        f"{r['threads']} thread(s), page cache warm; one sentence answered on the device.",
        "",
        "## Device",
        "",
        "| format | tier bundle MB | device loads MB | tier / loaded | full bundle MB | full / loaded "
        "| start-up tier ms (verify + build + answer) | start-up full ms | full / tier |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for d in r["device"]:
        t, f = d["start_up_tier"], d["start_up_full"]
        lines.append(
            f"| {d['format']} | {_mb(d['tier_bundle_bytes'])} | {_mb(d['loaded_bytes']['total'])} "
            f"| {d['ratio_tier_to_loaded']:.3f} | {_mb(d['full_bundle_bytes'])} | {d['ratio_full_to_loaded']:.1f} "
            f"| {t['total_ms']:.1f} ({t['verify_ms']:.1f} + {t['construct_ms']:.1f} + {t['first_answer_ms']:.1f}) "
            f"| {f['total_ms']:.1f} ({f['verify_ms']:.1f} + {f['construct_ms']:.1f} + {f['first_answer_ms']:.1f}) "
            f"| {d['start_up_speedup']} |"
        )
    for note in r["skipped"]:
        lines.append(f"\n- {note}")
    if r["servers"]:
        lines += [
            "",
            "## Edge and cloud (bytes only; one format per tier bundle)",
            "",
            "| tier | format | tier bundle MB | server loads MB | tier / loaded | full bundle MB |",
            "|---|---|---|---|---|---|",
        ]
        for s in r["servers"]:
            lines.append(
                f"| {s['tier']} | {s['format']} | {_mb(s['tier_bundle_bytes'])} | {_mb(s['loaded_bytes'])} "
                f"| {s['ratio_tier_to_loaded']:.3f} | {_mb(s['full_bundle_bytes'])} |"
            )
    lines += ["", *bounds_table(r["checks"]), "", f"Took {r['seconds']:.1f} s."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--bundle", required=True, help="a full bundle (as `cartosplit export` wrote it)")
    parser.add_argument("--out", default=f"benchmarks/results/{NAME}", help="path prefix for .json and .md")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, help="device formats (default: all it has)")
    parser.add_argument("--repeats", type=int, default=5, help="start-ups per bundle and format (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="device runtime threads (default: 1)")
    parser.add_argument("--work", help="where the tier bundles are cut (default: a temporary folder)")
    parser.add_argument("--no-servers", action="store_true", help="skip the edge and cloud tier bundles")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    started = time.time()
    full = load_bundle(args.bundle)  # verified once here; each start-up verifies again
    if full.tier is not None:
        parser.error(f"{args.bundle} is a {full.tier} tier bundle; give the full bundle it was cut from")
    available = tier_formats(full.manifest, DEVICE_TIER)
    formats = [f for f in (args.formats or available) if f in available]
    skipped = [f"{f}: not in the bundle" for f in (args.formats or []) if f not in available]
    device, servers, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="tier-bundles-", dir=args.work) as tmp:
        for fmt in formats:
            missing = _backend_missing(fmt)
            if missing:
                skipped.append(missing)
                continue
            row = measure_device(full, fmt, Path(tmp), args.repeats, args.threads)
            device.append(row)
            ratio = row["ratio_tier_to_loaded"]
            checks.append(
                check(f"{fmt}: device tier bundle / bytes loaded", ratio, f"<= {GOAL_RATIO}", ratio <= GOAL_RATIO)
            )
        if not args.no_servers:
            for tier in (EDGE_TIER, CLOUD_TIER):
                for fmt in SERVER_FORMATS:
                    if fmt in tier_formats(full.manifest, tier):
                        servers.append(measure_server(full, tier, fmt, Path(tmp)))
    report = {
        "bundle": str(args.bundle),
        "bundle_id": full.bundle_id,
        "model": full.manifest.model.id,
        "full_bundle_bytes": bundle_size(full.folder),
        "full_bundle_files": len(full.manifest.files) + 1,
        "repeats": args.repeats,
        "threads": args.threads,
        "sentence": SENTENCE,
        "device": device,
        "servers": servers,
        "skipped": skipped,
        "checks": checks,
        "seconds": round(time.time() - started, 1),
    }
    publish(report, args.out, bench_command(NAME, argv), markdown)
    return 0 if all(c["held"] for c in checks) else 1
