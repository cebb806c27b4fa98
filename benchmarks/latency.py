"""Slice latency per runtime, batch and sequence length: p50/p95, achieved GFLOPS against a measured
sgemm peak, and (``--energy``) joules per inference, measured or estimated.

    cartosplit bench latency --bundle bundles/sst2-4k-all --run runs/sst2-4k --energy \\
        --out benchmarks/results/latency

What is timed, on this machine's CPU:
- the device slice, as the device runs it: ``device_head`` (embeddings, layers 1..r, router) then
  ``device_tail`` (layers r+1..d, device exit), on torch eager fp32 (the run's own modules,
  ``cartosplit.export.slices``; needs ``--run``), onnxruntime fp32 and int8, LiteRT fp32 and int8. Every token is
  real (mask of ones). TFLite graphs are batch 1 with fixed buckets: a length that is not a bucket is
  padded up to one, and batch B is B calls (see ``cartosplit.benchmarks.timing``);
- the edge slice (layers d+1..e) and the cloud graphs (``cloud_from_<k>``, ``full``) on onnxruntime
  fp32 and int8, fed with the hidden states the device slice produces.

Threads: for each ``--threads`` N the process is pinned to N cores (``os.sched_setaffinity``) and every
runtime is told N (torch ``set_num_threads``, onnxruntime ``intra_op_num_threads``, LiteRT
``num_threads``, BLAS through threadpoolctl when installed); both are recorded. Each configuration runs
``--warmup`` untimed calls, then at least ``--runs`` calls and ``--min-seconds`` seconds.

FLOPs are analytic (``matmul_flops``: the matrix products of the encoder layers and the linear heads
at that batch x length); achieved GFLOPS = FLOPs / p50. The peak is numpy float32 matmul (``--gemm-n``
square, best of ``--gemm-repeats``) with the same threads, measured in the same run.

Energy (``--energy``): measured when a meter is readable (Linux RAPL powercap package counters, an INA2xx or
INA3221 sensor under hwmon, e.g. on a Pi, or a battery's power_supply readings:
``cartosplit.benchmarks.energy``), else ESTIMATED for each profile in ``benchmarks/power_profiles.json`` as
this machine's mean time x that device's watts. Such an estimate multiplies x86 time by a Pi's or a phone's
power: it is not a measurement on that device (which is slower), only a cost profile to calibrate with until
one is measured. Every figure says which it is."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.energy import (  # noqa: F401  (the meter API, re-exported for its users)
    INA_NAME,
    POWER_PROFILES,
    EnergyMeter,
    MeterSpec,
    estimate_energy,
    find_meters,
    load_power_profiles,
    profile_watts,
)
from cartosplit.benchmarks.report import bench_command, bench_parser, publish, pyplot
from cartosplit.benchmarks.timing import DeviceSlice, available_cores, pinned, summarize_ms, time_calls
from cartosplit.cli_args import positive_int_list
from cartosplit.device_runtime.manifest import FULL, cloud_graph_depth

DEVICE_RUNTIMES = ("torch-fp32", "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8")
SERVER_FORMATS = ("onnx-fp32", "onnx-int8")
RUNTIME_NAMES = {"torch": "torch eager", "onnx": "onnxruntime", "tflite": "LiteRT"}
ROUTER_OUTPUTS = 3  # easy / medium / hard


# -- FLOPs (pure) ---------------------------------------------------------------------------------------------


def encoder_layer_flops(batch: int, seq: int, hidden: int, intermediate: int) -> int:
    """Matrix-product FLOPs (2 per multiply-add) of one BERT layer on [batch, seq] tokens.

    Q, K, V and attention-output projections 4 x (2·B·S·H·H); attention scores Q·Kᵀ and weights·V
    2 x (2·B·S·S·H) over all heads together; feed-forward 2 x (2·B·S·H·I). Softmax, GELU, LayerNorm,
    biases and embeddings (lookups) are not counted: they are a few percent at these sizes.
    """
    for name, value in (("batch", batch), ("seq", seq), ("hidden", hidden), ("intermediate", intermediate)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    tokens = batch * seq
    projections = 4 * 2 * tokens * hidden * hidden
    attention = 2 * 2 * batch * seq * seq * hidden
    feed_forward = 2 * 2 * tokens * hidden * intermediate
    return projections + attention + feed_forward


def matmul_flops(
    batch: int, seq: int, hidden: int, intermediate: int, layers: int, head_outputs: tuple[int, ...] = ()
) -> int:
    """FLOPs of ``layers`` encoder layers plus one linear head [H -> k] on the pooled vector per ``k``."""
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    heads = sum(2 * batch * hidden * k for k in head_outputs)
    return layers * encoder_layer_flops(batch, seq, hidden, intermediate) + heads


def graph_layers(graph: str, split: dict) -> tuple[int, tuple[str, ...]]:
    """Encoder layers of a bundle graph and the heads it ends in ("router", "exit").

    ``device`` is device_head + device_tail, the device slice this benchmark times.
    """
    r, d, e, total = split["router_depth"], split["device"], split["edge"], split["total"]
    if graph == "device":
        return d, ("router", "exit")
    if graph == "device_head":
        return r, ("router",)
    if graph == "device_tail":
        return d - r, ("exit",)
    if graph == "edge":
        return e - d, ("exit",)
    if graph == "full":
        return total, ("exit",)
    depth = cloud_graph_depth(graph)
    if depth is not None:
        return total - depth, ("exit",)
    raise ValueError(f"unknown graph {graph!r}")


def graph_flops(graph: str, split: dict, batch: int, seq: int, hidden: int, intermediate: int, labels: int) -> int:
    layers, heads = graph_layers(graph, split)
    outputs = tuple(ROUTER_OUTPUTS if h == "router" else labels for h in heads)
    return matmul_flops(batch, seq, hidden, intermediate, layers, outputs)


def intermediate_size(onnx_path: Path, hidden: int) -> tuple[int, str]:
    """The feed-forward width, read from a layer graph's weights: the other dimension of the [H, X] matrices
    with X > H. Falls back to 4·H (BERT's ratio) when the file cannot be read, and says so."""
    try:
        import onnx

        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx missing or unreadable: the FLOP count still needs a number
        return 4 * hidden, f"4 x hidden (could not read {onnx_path.name}: {type(exc).__name__})"
    widths = Counter()
    for init in model.graph.initializer:
        dims = tuple(init.dims)
        if len(dims) == 2 and hidden in dims:
            other = dims[1] if dims[0] == hidden else dims[0]
            if other > hidden:
                widths[other] += 1
    if not widths:
        return 4 * hidden, f"4 x hidden (no [H, X > H] weight in {onnx_path.name})"
    width, _ = widths.most_common(1)[0]
    return int(width), f"read from the weights of {onnx_path.name}"


# -- sgemm peak -------------------------------------------------------------------------------------------------


def _blas_limits(threads: int):
    """A context that caps BLAS threads (threadpoolctl), and what it found; a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:
        import contextlib

        return contextlib.nullcontext(), "threadpoolctl not installed: BLAS threads not capped"
    blas = [
        f"{i.get('internal_api')} ({i.get('num_threads')} threads)"
        for i in threadpool_info()
        if i["user_api"] == "blas"
    ]
    note = f"capped at {threads} ({', '.join(blas) or 'none found'})"
    return threadpool_limits(limits=threads, user_api="blas"), note


def sgemm_peak(threads: int, n: int = 1024, repeats: int = 10, seed: int = 0) -> dict:
    """numpy float32 ``n x n @ n x n``: best and median GFLOPS over ``repeats`` (after one warm-up)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    limit, note = _blas_limits(threads)
    seconds = []
    with limit:
        a @ b
        for _ in range(repeats):
            began = time.perf_counter()
            a @ b
            seconds.append(time.perf_counter() - began)
    flops = 2 * n**3
    return {
        "n": n,
        "repeats": repeats,
        "best_gflops": flops / min(seconds) / 1e9,
        "median_gflops": flops / float(np.median(seconds)) / 1e9,
        "blas_threads": note,
    }


# -- the benchmark ------------------------------------------------------------------------------------------------


def _allowed_cores_of_threads() -> list[tuple[str, set[int]]]:
    """Name and allowed cores of each thread of this process (Linux /proc), to check that pinning held."""
    out = []
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip()
            line = next(x for x in (task / "status").read_text().splitlines() if x.startswith("Cpus_allowed_list:"))
        except (OSError, StopIteration):
            continue
        cores: set[int] = set()
        for part in line.split(":", 1)[1].strip().split(","):
            low, _, high = part.partition("-")
            cores.update(range(int(low), int(high or low) + 1))
        out.append((name, cores))
    return out


def _tokens(rng: np.random.Generator, batch: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(1, max(vocab, 2), size=(batch, length), dtype=np.int64),
        "attention_mask": np.ones((batch, length), dtype=np.int64),
        "token_type_ids": np.zeros((batch, length), dtype=np.int64),
    }


class TorchDevice:
    """The run's own device_head and device_tail modules (``cartosplit.export.slices``) in eager fp32."""

    def __init__(self, run: Path, split: dict) -> None:
        import torch

        torch.set_num_threads(1)  # no worker pool before pinning: pools created later inherit the pinned set
        from cartosplit.export.model import MultiExitBert
        from cartosplit.export.router import load_router
        from cartosplit.export.slices import build_slices

        model = MultiExitBert.load(run / "model").eval()
        router, router_cfg = load_router(run / "router")
        got = (router_cfg.depth, model.config.device_split, model.config.edge_split, model.config.num_layers)
        want = tuple(split[k] for k in ("router_depth", "device", "edge", "total"))
        if got != want:
            raise ValueError(f"--run {run} splits at r,d,e,L = {got} but the bundle at {want}: not the same model")
        slices = build_slices(model, router, router_cfg.depth)
        self.head, self.tail = slices["device_head"][0], slices["device_tail"][0]
        self.torch = torch

    def caller(self, tokens: dict[str, np.ndarray]) -> tuple[Callable[[], tuple[float, float]], np.ndarray]:
        torch = self.torch
        ids, mask, types = (torch.from_numpy(tokens[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))

        def call() -> tuple[float, float]:
            with torch.inference_mode():
                began = time.perf_counter()
                _, hidden = self.head(ids, mask, types)
                middle = time.perf_counter()
                self.tail(hidden, mask)
                return middle - began, time.perf_counter() - middle

        with torch.inference_mode():
            _, hidden = self.head(ids, mask, types)
            _, logits = self.tail(hidden, mask)
        return call, logits.numpy()


@dataclass
class Settings:
    batches: list[int]
    lengths: list[int]
    runs: int
    min_seconds: float
    warmup: int
    gemm_n: int
    gemm_repeats: int


def _measure(
    fn: Callable[[], object], settings: Settings, meter: EnergyMeter | None
) -> tuple[dict, list, float | None]:
    for _ in range(settings.warmup):
        fn()
    if meter is not None:
        meter.start()
    timed = time_calls(fn, settings.runs, settings.min_seconds, warmup=0)
    joules = meter.stop() if meter is not None else None
    return summarize_ms(timed.ms), timed.results, joules


def _energy(stats: dict, batch: int, threads: int, joules: float | None, meter: EnergyMeter | None, profiles) -> list:
    if meter is not None and joules is not None:
        per_call = 1000 * joules / stats["runs"]
        return [
            {
                "label": "measured",
                "meter": meter.spec.description,
                "basis": "the meter's total over the timed calls (includes every process on what it meters)",
                "mj_per_call": per_call,
                "mj_per_sample": per_call / batch,
            }
        ]
    return [estimate_energy(stats["mean_ms"], batch, n, p, threads) for n, p in profiles.items()]


def _slice_caller(device: DeviceSlice, tokens: dict[str, np.ndarray]) -> Callable[[], tuple[float, float]]:
    def call() -> tuple[float, float]:
        out = device.run(tokens)
        return out.head_s, out.tail_s

    return call


@dataclass
class Context:
    """What every configuration of one run shares."""

    split: dict
    hidden: int
    intermediate: int
    labels: int
    settings: Settings
    meter: EnergyMeter | None
    profiles: dict
    energy: bool


def _rate(flops: int, p50_ms: float, peak_gflops: float) -> dict:
    gflops = flops / (p50_ms / 1000) / 1e9
    return {"flops": flops, "gflops_p50": gflops, "pct_of_sgemm_peak": 100 * gflops / peak_gflops}


def _time_device(
    ctx: Context, key: str, fn: Callable[[], tuple[float, float]], common: dict, peak: dict, extra: dict
) -> dict:
    stats, parts, joules = _measure(fn, ctx.settings, ctx.meter)
    family, precision = key.split("-")
    flops = graph_flops(
        "device", ctx.split, common["batch"], common["length"], ctx.hidden, ctx.intermediate, ctx.labels
    )
    row = {
        "tier": "device",
        "graph": "device_head+device_tail",
        "runtime": RUNTIME_NAMES[family],
        "precision": precision,
        "key": key,
        **common,
        **stats,
        "head_p50_ms": 1000 * float(np.median([p[0] for p in parts])),
        "tail_p50_ms": 1000 * float(np.median([p[1] for p in parts])),
        **_rate(flops, stats["p50_ms"], peak["best_gflops"]),
        **extra,
    }
    if ctx.energy:
        row["energy"] = _energy(stats, common["batch"], common["threads"], joules, ctx.meter, ctx.profiles)
    return row


def _time_server(ctx: Context, graph: str, fmt: str, session, inputs: list, common: dict, peak: dict) -> dict:
    stats, _, _ = _measure(lambda: session.run(inputs), ctx.settings, None)
    flops = graph_flops(graph, ctx.split, common["batch"], common["length"], ctx.hidden, ctx.intermediate, ctx.labels)
    return {
        "tier": "edge" if graph == "edge" else "cloud",
        "graph": graph,
        "runtime": "onnxruntime",
        "precision": fmt.split("-")[1],
        "key": fmt,
        **common,
        **stats,
        **_rate(flops, stats["p50_ms"], peak["best_gflops"]),
    }


def _time_threads(ctx: Context, bundle, threads: int, cloud_graphs: list[str], torch_device, seed: int) -> tuple:
    """Every configuration at one thread count (the caller has pinned the process): rows and the sgemm peak."""
    from cartosplit.device_runtime.onnx_backend import OnnxSession

    formats = bundle.manifest.formats
    vocab = int(bundle.manifest.model.vocab_size or 1000)
    if torch_device is not None:
        torch_device.torch.set_num_threads(threads)
    peak = sgemm_peak(threads, ctx.settings.gemm_n, ctx.settings.gemm_repeats, seed)
    slices = {fmt: DeviceSlice(bundle, fmt, threads) for fmt in DEVICE_RUNTIMES[1:] if fmt in formats}
    server = {
        (graph, fmt): OnnxSession(bundle.graph_file(graph, fmt), threads)
        for fmt in SERVER_FORMATS
        if fmt in formats
        for graph in ("edge", *cloud_graphs)
    }
    rng = np.random.default_rng(seed)
    rows = []
    for batch in ctx.settings.batches:
        for length in ctx.settings.lengths:
            tokens = _tokens(rng, batch, length, vocab)
            mask = tokens["attention_mask"]
            reference = slices["onnx-fp32"].run(tokens)
            hidden_e, _ = server[("edge", "onnx-fp32")].run([reference.hidden_d, mask])
            common = {"batch": batch, "length": length, "threads": threads}
            if torch_device is not None:
                fn, logits = torch_device.caller(tokens)
                parity = {"max_abs_logit_diff_vs_onnx_fp32": float(np.abs(logits - reference.device_logits).max())}
                rows.append(_time_device(ctx, "torch-fp32", fn, common, peak, parity))
            for key, device in slices.items():
                extra = {}
                if device.buckets is not None:
                    bucket = min(b for b in device.buckets if b >= length)
                    extra["note"] = f"{batch} call(s) of batch 1 at bucket {bucket}"
                rows.append(_time_device(ctx, key, _slice_caller(device, tokens), common, peak, extra))
            start_of = {ctx.split["router_depth"]: reference.hidden_r, ctx.split["edge"]: hidden_e}
            for (graph, fmt), session in server.items():
                if graph == "edge":
                    inputs = [reference.hidden_d, mask]
                elif graph == "full":
                    inputs = [tokens["input_ids"], mask, tokens["token_type_ids"]]
                else:
                    inputs = [start_of[cloud_graph_depth(graph)], mask]
                rows.append(_time_server(ctx, graph, fmt, session, inputs, common, peak))
            print(f"threads {threads}, batch {batch}, length {length}: timed", file=sys.stderr)
    return rows, peak


def run_benchmark(args: argparse.Namespace) -> dict:
    from cartosplit.device_runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    split = asdict(m.split_points)  # the report's and graph_layers' plain form
    hidden = m.model.hidden_size
    settings = Settings(
        args.batches, args.lengths, args.runs, args.min_seconds, args.warmup, args.gemm_n, args.gemm_repeats
    )
    too_long = [n for n in settings.lengths if n > m.model.max_length]
    if too_long:
        raise ValueError(f"lengths {too_long} exceed the bundle's max length {m.model.max_length}")
    if "onnx-fp32" not in m.formats:
        raise ValueError(f"{args.bundle} has no onnx-fp32 graphs: they feed the edge and cloud slices")
    width, width_note = intermediate_size(bundle.graph_file("edge", "onnx-fp32"), hidden)
    cloud_graphs = [g for g in m.graphs if cloud_graph_depth(g) is not None] + ([FULL] if FULL in m.graphs else [])

    skipped: list[dict] = []
    torch_device = None
    if not args.run:
        skipped.append({"what": "torch-fp32 device slice", "reason": "no --run given (torch eager needs the run)"})
    else:
        try:
            torch_device = TorchDevice(Path(args.run), split)
        except ImportError as exc:
            skipped.append({"what": "torch-fp32 device slice", "reason": f"torch/export not importable: {exc}"})
    for fmt in DEVICE_RUNTIMES[1:]:
        if fmt not in m.formats:
            skipped.append({"what": f"{fmt} device slice", "reason": f"the bundle has no {fmt} graphs"})
    if "onnx-int8" not in m.formats:
        skipped.append({"what": "onnx-int8 edge/cloud slices", "reason": "the bundle has no onnx-int8 graphs"})

    meter, energy_note, profiles = None, "not requested (--energy)", {}
    if args.energy:
        specs = find_meters(args.sysfs_root)
        if specs:
            meter = EnergyMeter(specs[0])
            energy_note = f"MEASURED with {specs[0].description}"
        else:
            profiles = load_power_profiles(args.power_profiles)
            energy_note = (
                "No readable meter (no RAPL powercap energy_uj, no INA2xx/INA3221 hwmon input, no power_supply "
                "power_now/current_now): every energy "
                f"figure is ESTIMATED as measured time x the watts of a profile in {args.power_profiles}."
            )
    ctx = Context(split, hidden, width, len(m.model.labels), settings, meter, profiles, args.energy)

    cores = available_cores()
    rows: list[dict] = []
    thread_settings: list[dict] = []
    for threads in sorted(set(args.threads)):  # ascending: a pool made for N threads never outlives its pin
        if threads > len(cores):
            raise ValueError(f"--threads {threads}: this process may only use {len(cores)} cores {cores}")
        with pinned(cores[:threads]) as pinned_to:
            found, peak = _time_threads(ctx, bundle, threads, cloud_graphs, torch_device, args.seed)
            strays = [name for name, c in _allowed_cores_of_threads() if not c <= set(pinned_to or cores)]
        rows += found
        thread_settings.append(
            {
                "threads": threads,
                "pinned_cores": pinned_to,
                "process_threads_allowed_outside_pin": len(strays),
                "their_names": sorted(strays),  # pools made before pinning (e.g. BLAS at import), idle here
                "torch_threads": threads if torch_device is not None else None,
                "onnxruntime_intra_op_threads": threads,
                "litert_num_threads": threads,
                "sgemm_peak": peak,
            }
        )
    kept = ("device", "basis", "idle_w", "active_w")
    return {
        "bundle": args.bundle,
        "run": args.run,
        "model": m.model.id,
        "split_points": split,
        "hidden_size": hidden,
        "intermediate_size": width,
        "intermediate_size_from": width_note,
        "settings": {
            "threads": sorted(set(args.threads)),
            "batches": settings.batches,
            "lengths": settings.lengths,
            "min_runs": settings.runs,
            "min_seconds": settings.min_seconds,
            "warmup": settings.warmup,
            "inputs": "random token ids, every token real (mask of ones); edge/cloud take the device's hidden states",
        },
        "thread_settings": thread_settings,
        "energy": energy_note,
        "power_profiles": {n: {k: p[k] for k in kept} for n, p in profiles.items()},
        "skipped": skipped,
        "rows": rows,
        "int8_vs_torch": int8_vs_torch(rows),
    }


def int8_vs_torch(rows: list[dict]) -> list[dict]:
    """Per (threads, batch, length): p50 of each int8 runtime over torch eager fp32's (< 1 = faster than torch)."""
    device = {(r["key"], r["threads"], r["batch"], r["length"]): r["p50_ms"] for r in rows if r["tier"] == "device"}
    out = []
    for (key, threads, batch, length), torch_ms in sorted(device.items()):
        if key != "torch-fp32":
            continue
        entry = {"threads": threads, "batch": batch, "length": length, "torch_p50_ms": torch_ms}
        for other in ("onnx-int8", "tflite-int8", "onnx-fp32", "tflite-fp32"):
            ms = device.get((other, threads, batch, length))
            if ms is not None:
                entry[f"{other}_p50_ms"] = ms
                entry[f"{other}_over_torch"] = ms / torch_ms
        out.append(entry)
    return out


# -- report ---------------------------------------------------------------------------------------------------------


def _ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} ({1 / x:.1f}x {'faster' if x < 1 else 'slower'})"


def markdown(r: dict) -> list[str]:
    sp = r["split_points"]
    s = r["settings"]
    lines = [
        f"# Slice latency — {r['model']}, bundle `{r['bundle']}`",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Split: router r={sp['router_depth']}, device d={sp['device']}, edge e={sp['edge']}, L={sp['total']}; "
        f"hidden {r['hidden_size']}, feed-forward {r['intermediate_size']} ({r['intermediate_size_from']}).  ",
        f"Runs: {s['warmup']} warm-up calls, then at least {s['min_runs']} calls and {s['min_seconds']} s per "
        f"configuration; inputs: {s['inputs']}. Took {r['seconds']} s.",
        "",
        "Device slice = `device_head` (embeddings, layers 1..r, router) then `device_tail` (layers r+1..d, device "
        "exit), as the device runs an input it answers or hands to the edge. LiteRT graphs are batch 1 with fixed "
        "buckets: batch 8 is 8 calls. FLOPs: matrix products of the layers and heads at that batch x length "
        "(`matmul_flops`); GFLOPS = FLOPs / p50; peak = numpy float32 matmul, same threads, same run. int8 graphs "
        "can pass 100 % of that fp32 peak: their matrix products run on int8 instructions (VNNI on x86).",
        "",
        "## Threads",
        "",
        "| threads | pinned cores | process threads allowed elsewhere | torch | onnxruntime | LiteRT | sgemm peak "
        "(best / median GFLOPS) | BLAS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in r["thread_settings"]:
        p = t["sgemm_peak"]
        lines.append(
            f"| {t['threads']} | {t['pinned_cores']} | {t['process_threads_allowed_outside_pin']} "
            f"{'(' + ', '.join(t['their_names']) + ')' if t['their_names'] else ''} | "
            f"{t['torch_threads'] if t['torch_threads'] is not None else '—'} | {t['onnxruntime_intra_op_threads']} | "
            f"{t['litert_num_threads']} | {p['best_gflops']:.1f} / {p['median_gflops']:.1f} ({p['n']}², "
            f"best of {p['repeats']}) | {p['blas_threads']} |"
        )
    lines += [
        "",
        "## Device slice",
        "",
        "| threads | batch | length | runtime | p50 ms | p95 ms | mean ms | head / tail p50 ms | GFLOPS | % of peak "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if row["tier"] != "device":
            continue
        lines.append(
            f"| {row['threads']} | {row['batch']} | {row['length']} | {row['runtime']} {row['precision']} | "
            f"{row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['mean_ms']:.2f} | {row['head_p50_ms']:.2f} / "
            f"{row['tail_p50_ms']:.2f} | {row['gflops_p50']:.1f} | {row['pct_of_sgemm_peak']:.0f} % | "
            f"{row.get('note', '')} |"
        )
    lines += [
        "",
        "## int8 vs torch eager fp32 (device slice, p50 ratio; < 1 = faster than torch)",
        "",
    ]
    if r["int8_vs_torch"]:
        lines += [
            "| threads | batch | length | torch fp32 ms | onnxruntime int8 / torch | LiteRT int8 / torch "
            "| onnxruntime fp32 / torch | LiteRT fp32 / torch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in r["int8_vs_torch"]:
            lines.append(
                f"| {e['threads']} | {e['batch']} | {e['length']} | {e['torch_p50_ms']:.2f} | "
                f"{_ratio(e.get('onnx-int8_over_torch'))} | {_ratio(e.get('tflite-int8_over_torch'))} | "
                f"{_ratio(e.get('onnx-fp32_over_torch'))} | {_ratio(e.get('tflite-fp32_over_torch'))} |"
            )
    else:
        lines.append("No torch row (see Skipped), so no ratio.")
    lines += [
        "",
        "## Edge and cloud slices (onnxruntime)",
        "",
        "| threads | batch | length | graph | precision | p50 ms | p95 ms | mean ms | GFLOPS | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if row["tier"] == "device":
            continue
        lines.append(
            f"| {row['threads']} | {row['batch']} | {row['length']} | {row['graph']} | {row['precision']} | "
            f"{row['p50_ms']:.2f} | {row['p95_ms']:.2f} | {row['mean_ms']:.2f} | {row['gflops_p50']:.1f} | "
            f"{row['pct_of_sgemm_peak']:.0f} % |"
        )
    lines += ["", "## Energy per inference (device slice, mJ per sample)", "", r["energy"], ""]
    energy_rows = [row for row in r["rows"] if row.get("energy")]
    if energy_rows:
        sources = [e.get("profile") or e.get("meter") for e in energy_rows[0]["energy"]]
        lines += [
            "| threads | batch | length | runtime | "
            + " | ".join(f"{e['label']}: {src}" for e, src in zip(energy_rows[0]["energy"], sources, strict=True))
            + " |",
            "|---|---|---|---|" + "---|" * len(sources),
        ]
        for row in energy_rows:
            cells = [
                f"{e['mj_per_sample']:.2f}" + (f" ({e['watts']:.2f} W)" if "watts" in e else "") for e in row["energy"]
            ]
            lines.append(
                f"| {row['threads']} | {row['batch']} | {row['length']} | {row['runtime']} {row['precision']} | "
                + " | ".join(cells)
                + " |"
            )
        if r["power_profiles"]:
            lines += [
                "",
                "Estimated = mean time per call measured on THIS x86 machine x the profile's active watts, divided "
                "by the batch. Not measurements on a Pi or a phone: those run the same slice several times slower, "
                "so their real energy per inference is likely higher. Where a profile gives only an all-core figure "
                "it is used for any thread count (an upper bound on the power). Profiles, what their watts include "
                "and their sources: `benchmarks/power_profiles.json`.",
            ]
    if r["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {x['what']}: {x['reason']}" for x in r["skipped"]]
    if r.get("plot"):
        lines += ["", f"![device slice p50]({Path(r['plot']).name})"]
    return lines


def plot(r: dict, path: Path) -> None:
    plt = pyplot()

    device = [row for row in r["rows"] if row["tier"] == "device"]
    threads, batches = r["settings"]["threads"], r["settings"]["batches"]
    lengths = r["settings"]["lengths"]
    keys = [k for k in DEVICE_RUNTIMES if any(row["key"] == k for row in device)]
    fig, axes = plt.subplots(len(threads), len(batches), figsize=(5 * len(batches), 3.6 * len(threads)), squeeze=False)
    width = 0.8 / max(len(keys), 1)
    for i, t in enumerate(threads):
        for j, b in enumerate(batches):
            ax = axes[i][j]
            for k, key in enumerate(keys):
                values = [
                    next(
                        (
                            row["p50_ms"]
                            for row in device
                            if (row["key"], row["threads"], row["batch"], row["length"]) == (key, t, b, n)
                        ),
                        np.nan,
                    )
                    for n in lengths
                ]
                ax.bar(np.arange(len(lengths)) + (k - (len(keys) - 1) / 2) * width, values, width, label=key)
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_xlabel("sequence length")
            ax.set_ylabel("p50 ms")
            ax.set_title(f"device slice, batch {b}, {t} thread(s)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("latency", __doc__)
    parser.add_argument("--bundle", required=True, help="bundle folder (all formats for every device row)")
    parser.add_argument("--run", help="the run the bundle came from: adds torch eager fp32 (skipped without it)")
    parser.add_argument(
        "--threads", type=positive_int_list, default=[1, 2], help="thread counts, each pinned (default 1,2)"
    )
    parser.add_argument("--batches", type=positive_int_list, default=[1, 8], help="batch sizes (default 1,8)")
    parser.add_argument(
        "--lengths", type=positive_int_list, default=[32, 64, 128], help="sequence lengths (default 32,64,128)"
    )
    parser.add_argument("--runs", type=int, default=50, help="at least this many timed calls per configuration")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="and at least this many seconds of them")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--gemm-n", type=int, default=1024, help="size of the numpy sgemm peak matmul")
    parser.add_argument("--gemm-repeats", type=int, default=10, help="best of this many sgemm calls")
    parser.add_argument("--energy", action="store_true", help="joules per inference (measured, else estimated)")
    parser.add_argument("--power-profiles", default=str(POWER_PROFILES), help="device power profiles for estimates")
    parser.add_argument("--sysfs-root", default="/", help=argparse.SUPPRESS)  # tests point it at a fake tree
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/latency", help="path prefix for .json, .md and .png")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.min_seconds < 0 or args.warmup < 0:
        raise SystemExit("--runs must be >= 1, --min-seconds and --warmup >= 0")
    started = time.time()
    report = run_benchmark(args)
    report["seconds"] = round(time.time() - started, 1)
    publish(report, args.out, bench_command("latency", argv), markdown, plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
