"""The device slice measured on the device itself: latency per format, length and threads, cold start, peak
memory, energy, the CPU features that decide int8's worth, advice, and a cost profile for calibration.

    pip install 'cartosplit[device]'          # numpy, tokenizers, onnxruntime, ai-edge-litert: no torch
    cartosplit bench device --bundle /opt/cartosplit/bundle
    cartosplit run --bundle B --format auto --advice benchmarks/results/device-aarch64.json
    cartosplit calibrate --run runs/sst2 --costs benchmarks/results/device-aarch64-cost-ms.json   # workstation

What is measured, on this machine, for a full or a device tier bundle:

- latency: ``device_head`` then ``device_tail`` at batch 1 (every token real) in every device format the
  bundle holds (onnx-int8, onnx-fp32, tflite-int8, tflite-fp32), at each ``--lengths`` (default 16, 32, 64,
  128, capped at the model's max length; ``--texts FILE`` takes the 10th/50th/90th percentile and the
  longest of real inputs' token counts instead), threads 1..N (N = the cores this process may use), the
  process pinned to that many cores. p50 / p90 ms per sample, head and tail apart. TFLite pads to a bucket;
  a length above its largest bucket is skipped.
- cold start and peak memory: a fresh Python process per (int8 format x ``--memory`` preset) imports the
  runtime, loads and verifies the bundle, opens the sessions, answers the first input, then ``--inputs``
  more; cold start is spawn to first answer (imports count), peak RSS is the child's VmHWM (``/proc``; else
  ``getrusage``). The OS page cache is warm after the first run: ``--cold-runs`` gives the median.
- energy: measured where a meter is readable (RAPL, INA2xx/INA3221 under hwmon, a battery's power_supply:
  ``cartosplit.benchmarks.energy``; its idle power too), else ESTIMATED as measured time x the active watts of
  the cited profile of this board (``--power-profile``, or a Raspberry Pi found by name), else of every profile.
- CPU: model, board and the int8 features (x86 avx2, avx512f, avx512_vnni, avx_vnni, amx; ARM asimd,
  asimddp, i8mm) from /proc/cpuinfo (``cartosplit.device_runtime.cpu_features``), recorded with every table.

Writes ``<out>.json`` and ``<out>.md`` (then ``<out>.png`` where matplotlib is installed), and
``<out>-cost-ms.json`` / ``<out>-cost-mJ.json``: ``CostProfile`` files whose device_per_layer is measured
here (the advised format, a typical length: the median of ``--texts`` or the length nearest 32, its best
threads); edge, cloud and link entries come from ``--base-profile`` or the bundle's profile, as their
``source`` says. The advice (fastest format here, and why) is what ``--format auto --advice FILE`` reads.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.energy import (
    DEVICE_PROFILES,
    POWER_PROFILES,
    EnergyMeter,
    all_power_profiles,
    estimate_energy,
    find_meters,
    idle_watts,
    profile_for_board,
)
from cartosplit.benchmarks.report import bench_command, bench_parser, publish, pyplot
from cartosplit.benchmarks.timing import DeviceSlice, available_cores, pinned, summarize_ms, time_calls
from cartosplit.cli_args import positive_int_list
from cartosplit.device_runtime.cpu_features import CpuFeatures, int8_note, read_cpu_features
from cartosplit.device_runtime.manifest import TFLITE_FP32, TFLITE_INT8

NAME = "device"
DEVICE_FORMATS = ("onnx-int8", "onnx-fp32", "tflite-int8", "tflite-fp32")  # manifest.FORMATS, int8 first
DEFAULT_LENGTHS = (16, 32, 64, 128)
TYPICAL = 32  # without --texts: the measured length nearest this (SST-2 dev: 25 tokens on average)
ONNX_MEMORY = ("default", "low", "no-arena", "no-mem-pattern", "basic-optimization", "no-prepacking")
ONNX_MEMORY += ("initializers-on-device-allocator", "low+no-prepacking")
LITERT_MEMORY = ("default", "low", "no-xnnpack")

# A fresh process: what a device pays to start answering. Prints one JSON line.
_CHILD = r"""
import json, resource, sys, time
t_start = time.time()
cfg = json.loads(sys.argv[1])
from cartosplit.device_runtime.bundle import load_bundle
from cartosplit.device_runtime.runtime import DeviceRuntime
t_imported = time.time()
bundle = load_bundle(cfg["bundle"])
t_loaded = time.time()
runtime = DeviceRuntime(bundle, fmt=cfg["format"], threads=cfg["threads"], low_memory=cfg["memory"])
t_open = time.time()
with open(cfg["inputs"], encoding="utf-8") as f:
    texts = json.load(f)
runtime.predict([texts[0]])
t_first = time.time()
ms = []
for text in texts[1:]:
    began = time.perf_counter()
    runtime.predict([text])
    ms.append(1000 * (time.perf_counter() - began))
status = {}
try:
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            status[key] = int(value.split()[0]) / 1024
except OSError:
    pass
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
maxrss_mb = maxrss / (1 << 20) if sys.platform == "darwin" else maxrss / 1024
heavy = sorted(m for m in ("torch", "matplotlib", "transformers") if m in sys.modules)
print("RESULT " + json.dumps({
    "t_start": t_start, "t_imported": t_imported, "t_loaded": t_loaded, "t_open": t_open, "t_first": t_first,
    "ms": ms, "vm_hwm_mb": status.get("VmHWM"), "vm_rss_mb": status.get("VmRSS"), "ru_maxrss_mb": maxrss_mb,
    "format": runtime.fmt, "heavy_modules_loaded": heavy,
}))
"""


def installed(module: str) -> bool:
    """Whether ``module`` could be imported, without importing it (an import blocker counts as absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- inputs and lengths -----------------------------------------------------------------------------------------


def read_texts(path: str | Path) -> list[str]:
    """Non-blank lines of a text file or JSON Lines ({"text": ...}); JSON lines without a text are skipped."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                text = json.loads(line).get("text")
            except (json.JSONDecodeError, AttributeError):
                text = None
            if isinstance(text, str) and text.strip():
                texts.append(text)
        else:
            texts.append(line)
    if not texts:
        raise ValueError(f"--texts {path}: no text in it")
    return texts


def lengths_seen(token_counts: list[int], max_length: int) -> list[int]:
    """The lengths to time for real inputs: the 10th, 50th and 90th percentile of their token counts, and the
    longest (each capped at ``max_length``, at least 2)."""
    counts = np.minimum(np.asarray(token_counts), max_length)
    picks = [*np.percentile(counts, [10, 50, 90]), counts.max()]
    return sorted({max(2, min(round(float(p)), max_length)) for p in picks})


def capped_lengths(lengths: list[int], max_length: int) -> list[int]:
    kept = sorted({n for n in lengths if n <= max_length})
    return kept or [max_length]


def nearest(lengths: list[int], target: float) -> int:
    return min(lengths, key=lambda n: (abs(n - target), n))


def synthetic_texts(tokenizer, count: int, low: int, high: int, seed: int = 0) -> list[str]:
    """``count`` texts of whole vocabulary words, spread between ``low`` and ``high`` words long."""
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and not w.startswith("##"))
    if not words:
        words = ["the", "movie", "was", "good"]
    rng = np.random.default_rng(seed)
    sizes = np.linspace(max(low, 1), max(high, low, 1), num=count).round().astype(int)
    rng.shuffle(sizes)
    return [" ".join(rng.choice(words, size=int(n))) for n in sizes]


def _tokens(rng: np.random.Generator, length: int, vocab: int) -> dict[str, np.ndarray]:
    return {
        "input_ids": rng.integers(1, max(vocab, 2), size=(1, length), dtype=np.int64),
        "attention_mask": np.ones((1, length), dtype=np.int64),
        "token_type_ids": np.zeros((1, length), dtype=np.int64),
    }


# -- sizes ------------------------------------------------------------------------------------------------------


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def loaded_files(bundle, fmt: str) -> list[Path]:
    """The files a device opens for ``fmt``: its device graphs (every bucket for TFLite), tokenizer, manifest."""
    m = bundle.manifest
    graphs = []
    for graph in ("device_head", "device_tail"):
        if fmt in (TFLITE_FP32, TFLITE_INT8):
            graphs += [bundle.graph_file(graph, fmt, b) for b in sorted(m.formats[fmt].buckets)]
        else:
            graphs.append(bundle.graph_file(graph, fmt))
    return [*graphs, bundle.path(m.tokenizer), bundle.folder / "manifest.json"]


# -- latency ----------------------------------------------------------------------------------------------------


def _energy_of(stats: dict, threads: int, joules: float | None, meter, profiles: dict) -> list[dict]:
    if meter is not None and joules is not None:
        per = 1000 * joules / stats["runs"]
        return [{"label": "measured", "meter": meter.spec.description, "mj_per_sample": per}]
    return [estimate_energy(stats["mean_ms"], 1, n, p, threads) for n, p in profiles.items()]


def time_format(bundle, fmt: str, threads_list: list[int], lengths: list[int], args, meter, profiles) -> dict:
    """One format's latency table: a row per (threads, length), or ``skipped`` with the reason."""
    m = bundle.manifest
    vocab = int(m.model.vocab_size or 1000)
    cores = available_cores()
    rows, skipped = [], []
    buckets = sorted(m.formats[fmt].buckets) if fmt in (TFLITE_FP32, TFLITE_INT8) else None
    for threads in threads_list:
        with pinned(cores[:threads]) as pinned_to:
            try:
                device = DeviceSlice(bundle, fmt, threads)
            except ImportError as exc:  # LiteRT or onnxruntime not installed
                return {"skipped": f"{fmt}: its runtime is not importable ({exc})", "rows": []}
            rng = np.random.default_rng(args.seed)
            for length in lengths:
                if buckets is not None and length > buckets[-1]:
                    skipped.append(f"length {length}: above the largest TFLite bucket {buckets[-1]}")
                    continue
                tokens = _tokens(rng, length, vocab)

                def call(tokens=tokens, device=device):
                    out = device.run(tokens)
                    return out.head_s, out.tail_s

                for _ in range(args.warmup):
                    call()
                if meter is not None:
                    meter.start()
                timed = time_calls(call, args.runs, args.min_seconds, warmup=0)
                joules = meter.stop() if meter is not None else None
                stats = summarize_ms(timed.ms)
                row = {
                    "threads": threads,
                    "pinned_cores": pinned_to,
                    "length": length,
                    **stats,
                    "p90_ms": float(np.percentile(timed.ms, 90)),
                    "head_p50_ms": 1000 * float(np.median([h for h, _ in timed.results])),
                    "tail_p50_ms": 1000 * float(np.median([t for _, t in timed.results])),
                }
                if buckets is not None:
                    row["bucket"] = min(b for b in buckets if b >= length)
                if args.energy:
                    row["energy"] = _energy_of(stats, threads, joules, meter, profiles)
                rows.append(row)
                print(f"{fmt}, {threads} thread(s), length {length}: p50 {stats['p50_ms']:.2f} ms", file=sys.stderr)
        del device
    return {"rows": rows, "skipped_lengths": sorted(set(skipped))}


def best_row(table: dict, length: int) -> dict | None:
    """The fastest thread count's row at ``length``."""
    rows = [r for r in table.get("rows", []) if r["length"] == length]
    return min(rows, key=lambda r: r["p50_ms"]) if rows else None


def advise(formats: dict, length: int, cpu: CpuFeatures) -> dict:
    """The fastest format here at ``length`` (each at its best thread count), and why."""
    ranking = []
    for fmt, table in formats.items():
        row = best_row(table, length)
        if row is not None:
            ranking.append({"format": fmt, "threads": row["threads"], "p50_ms": row["p50_ms"], "p90_ms": row["p90_ms"]})
    if not ranking:
        raise ValueError(f"no format was timed at length {length}")
    ranking.sort(key=lambda r: r["p50_ms"])
    best = ranking[0]
    others = ", ".join(f"{r['format']} {r['p50_ms']:.2f} ms ({r['p50_ms'] / best['p50_ms']:.2f}x)" for r in ranking[1:])
    why = f"{best['format']} at {best['threads']} thread(s): {best['p50_ms']:.2f} ms p50 at length {length}"
    why += f" (vs {others})" if others else ""
    fp32 = [r for r in ranking if r["format"].endswith("fp32")]
    int8 = [r for r in ranking if r["format"].endswith("int8")]
    if int8 and fp32:
        speedup = fp32[0]["p50_ms"] / int8[0]["p50_ms"]
        verdict = (
            f"int8 {speedup:.2f}x the speed of fp32" if speedup >= 1 else f"int8 slower than fp32 ({speedup:.2f}x)"
        )
        why += f"; {verdict} on this CPU: {int8_note(cpu)}"
    else:
        why += f"; CPU: {int8_note(cpu)}"
    return {
        "format": best["format"],
        "threads": best["threads"],
        "length": length,
        "p50_ms": best["p50_ms"],
        "why": why,
        "ranking": ranking,
    }


# -- cold start and memory ----------------------------------------------------------------------------------------


def run_child(bundle: Path, fmt: str, threads: int | None, memory: str, inputs: Path, timeout: float) -> dict:
    """One fresh process (see ``_CHILD``): phases in ms from spawn, peak RSS, per-input latency."""
    cfg = {"bundle": str(bundle), "format": fmt, "threads": threads, "memory": memory, "inputs": str(inputs)}
    spawned = time.time()
    # -I: the child sees the installed kit only; from a checkout's folder, `-c` would put the checkout's
    # cartosplit/ (the root alone) first on sys.path and hide the installed packages
    done = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, json.dumps(cfg)], capture_output=True, text=True, timeout=timeout
    )
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"the cold-start process for {fmt}/{memory} failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    r = json.loads(lines[-1][len("RESULT ") :])
    ms = r["ms"] or [float("nan")]
    peak = r["vm_hwm_mb"] if r["vm_hwm_mb"] is not None else r["ru_maxrss_mb"]
    return {
        "cold_start_ms": 1000 * (r["t_first"] - spawned),
        "phases_ms": {
            "interpreter_start": 1000 * (r["t_start"] - spawned),
            "imports": 1000 * (r["t_imported"] - r["t_start"]),
            "load_and_verify_bundle": 1000 * (r["t_loaded"] - r["t_imported"]),
            "open_sessions_and_tokenizer": 1000 * (r["t_open"] - r["t_loaded"]),
            "first_answer": 1000 * (r["t_first"] - r["t_open"]),
        },
        "peak_rss_mb": peak,
        "peak_rss_from": "VmHWM" if r["vm_hwm_mb"] is not None else "getrusage ru_maxrss",
        "rss_end_mb": r["vm_rss_mb"],
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "inputs": len(r["ms"]) + 1,
        "heavy_modules_loaded": r["heavy_modules_loaded"],
    }


def memory_presets(fmt: str, wanted: list[str]) -> list[str]:
    valid = LITERT_MEMORY if fmt.startswith("tflite") else ONNX_MEMORY
    return [p for p in wanted if p in valid]


def measure_memory(bundle, formats: list[str], presets: list[str], threads: int, texts: list[str], args) -> list:
    """Cold start and peak RSS per (format, preset): the median over ``--cold-runs`` fresh processes."""
    out = []
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs.json"
        inputs.write_text(json.dumps(texts), encoding="utf-8")
        for fmt in formats:
            for preset in memory_presets(fmt, presets):
                runs = [
                    run_child(bundle.folder, fmt, threads, preset, inputs, args.child_timeout)
                    for _ in range(args.cold_runs)
                ]
                median = statistics.median
                out.append(
                    {
                        "format": fmt,
                        "memory": preset,
                        "threads": threads,
                        "cold_start_ms": median(r["cold_start_ms"] for r in runs),
                        "phases_ms": {k: median(r["phases_ms"][k] for r in runs) for k in runs[0]["phases_ms"]},
                        "peak_rss_mb": median(r["peak_rss_mb"] for r in runs),
                        "peak_rss_from": runs[0]["peak_rss_from"],
                        "rss_end_mb": median(r["rss_end_mb"] for r in runs) if runs[0]["rss_end_mb"] else None,
                        "p50_ms": median(r["p50_ms"] for r in runs),
                        "p90_ms": median(r["p90_ms"] for r in runs),
                        "inputs": runs[0]["inputs"],
                        "runs": len(runs),
                        "cold_start_each_ms": [r["cold_start_ms"] for r in runs],
                        "heavy_modules_loaded": sorted({m for r in runs for m in r["heavy_modules_loaded"]}),
                    }
                )
                print(
                    f"{fmt} memory={preset}: cold start {out[-1]['cold_start_ms']:.0f} ms, "
                    f"peak RSS {out[-1]['peak_rss_mb']:.1f} MB",
                    file=sys.stderr,
                )
    return out


def memory_advice(memory: list[dict], fmt: str) -> str | None:
    """A line on the low-memory preset for ``fmt``, from the measurements (None without both presets)."""
    by = {m["memory"]: m for m in memory if m["format"] == fmt}
    if "default" not in by or "low" not in by:
        return None
    d, low = by["default"], by["low"]
    saved = d["peak_rss_mb"] - low["peak_rss_mb"]
    slower = low["p50_ms"] / d["p50_ms"] if d["p50_ms"] else float("nan")
    return (
        f"{fmt}: low memory peaks at {low['peak_rss_mb']:.1f} MB vs {d['peak_rss_mb']:.1f} MB "
        f"({saved:+.1f} MB saved), p50 per input {low['p50_ms']:.2f} vs {d['p50_ms']:.2f} ms ({slower:.2f}x)"
    )


# -- energy and cost profiles -------------------------------------------------------------------------------------


def board_name(cpu: CpuFeatures, root: Path) -> str | None:
    model = root / "proc/device-tree/model"
    try:
        return model.read_text(errors="replace").strip("\x00\n ") or cpu.board
    except OSError:
        return cpu.board


def setup_energy(args, cpu: CpuFeatures) -> tuple[EnergyMeter | None, dict, dict]:
    """The meter (or None), the profiles estimates use, and the ``energy`` section's header."""
    if not args.energy:
        return None, {}, {"label": "not requested", "source": "--no-energy"}
    specs = find_meters(args.sysfs_root)
    if specs:
        meter = EnergyMeter(specs[0])
        idle = idle_watts(meter, args.idle_seconds) if args.idle_seconds > 0 else None
        return (
            meter,
            {},
            {
                "label": "measured",
                "source": specs[0].description,
                "meters_found": [s.description for s in specs],
                "idle_w": idle,
                "idle_basis": f"mean over {args.idle_seconds:g} s with this process asleep"
                if idle is not None
                else None,
                "basis": "the meter's total over each row's timed calls / calls (every process on what it meters)",
            },
        )
    profiles = all_power_profiles(args.power_profiles, args.device_profiles)
    board = board_name(cpu, Path(args.sysfs_root))
    name = args.power_profile or profile_for_board(board, profiles)
    if args.power_profile and name not in profiles:
        raise ValueError(f"--power-profile {name!r}: known profiles are {sorted(profiles)}")
    chosen = {name: profiles[name]} if name else profiles
    if name:
        why = "as given (--power-profile)" if args.power_profile else f"matched to this board ({board})"
        note = f"ESTIMATED: measured time here x {name} active watts, {why}"
    else:
        note = (
            f"ESTIMATED for every cited profile: no meter, and no profile matches this board ({board or cpu.model}); "
            "none of them is this machine. Give --power-profile NAME for this board's"
        )
    header = {
        "label": "estimated",
        "source": f"{Path(args.power_profiles).name} + {Path(args.device_profiles).name}: " + ", ".join(chosen),
        "profile": name,
        "idle_w": profiles[name].get("idle_w") if name else None,
        "note": note,
        "sources": {n: [s["url"] for s in p["sources"]] for n, p in chosen.items()},
    }
    return None, chosen, header


def cost_profiles(bundle, row: dict, fmt: str, energy: dict, cpu: str, args) -> dict:
    """The ms (and, with energy, mJ) ``CostProfile`` of this board: device measured here, the rest from the base."""
    from cartosplit.device_runtime.costs import CostProfile

    d = bundle.manifest.split_points.device
    if args.base_profile:
        base, base_name = CostProfile.from_json(args.base_profile), args.base_profile
    else:
        base, base_name = bundle.manifest.cost_profile, "the bundle's cost profile"
    others = ("edge_per_layer", "cloud_per_layer", "device_to_edge", "edge_to_cloud", "device_to_cloud")
    others += ("device_to_cloud_tokens",)
    where = f"{fmt}, batch 1, length {row['length']}, {row['threads']} thread(s), on {cpu}"
    made = {}

    def build(unit: str, device_value: float, device_how: str, convert) -> CostProfile:
        if base.unit == unit:
            values, how = {k: getattr(base, k) for k in others}, f"kept from {base_name} (unit {unit})"
        else:
            values, how = convert()
        source = (
            f"measured here by `cartosplit bench device`: device_per_layer ({device_how}; {where}). "
            f"Not measured here: {', '.join(others)}: {how}."
        )
        return CostProfile(device_per_layer=device_value, **values, unit=unit, source=source)

    def scaled(device_value: float, unit: str):
        if not base.device_per_layer > 0:
            raise ValueError(f"{base_name} has device_per_layer 0: cannot keep its ratios in {unit}")
        k = device_value / base.device_per_layer
        values = {n: (None if getattr(base, n) is None else getattr(base, n) * k) for n in others}
        how = (
            f"SCALED from {base_name} (unit {base.unit!r}) by {k:.4g}, so that its ratios to device_per_layer "
            "are kept; "
            f"give --base-profile in {unit} (e.g. the workstation's cost-profile-{unit}.json) for real ones"
        )
        return values, how

    device_ms = row["p50_ms"] / d
    made["ms"] = build(
        "ms", device_ms, f"p50 {row['p50_ms']:.3f} ms of head+tail / {d} layers", lambda: scaled(device_ms, "ms")
    )
    mj = None
    for e in row.get("energy", []):
        if e["label"] == "measured":
            mj = (e["mj_per_sample"], f"measured with {e['meter']}: {e['mj_per_sample']:.3f} mJ per sample / {d}")
        elif energy.get("profile") and e.get("profile") == energy["profile"]:
            mj = (e["mj_per_sample"], f"ESTIMATED: mean ms here x {e['profile']} {e['watts']:g} W / {d}")
    if mj is not None:
        device_mj = mj[0] / d
        idle = energy.get("idle_w")

        def from_ms():
            if base.unit != "ms":
                return scaled(device_mj, "mJ")
            w = idle or 0.0
            values = {n: (None if getattr(base, n) is None else getattr(base, n) * w) for n in others}
            label = f"{w:g} W idle ({'measured' if energy['label'] == 'measured' else 'the profile'})"
            if idle is None:
                label = "0 W above idle (no idle figure)"
            return values, f"the device waits: {base_name}'s ms x {label} (radio not included)"

        made["mJ"] = build("mJ", device_mj, mj[1], from_ms)
    paths = {}
    for unit, profile in made.items():
        path = Path(f"{args.out}-cost-{unit}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
        CostProfile.from_json(path)  # what `cartosplit calibrate --costs` reads: fail here, not there
        paths[unit] = {"path": str(path), **profile.to_dict()}
    if "mJ" not in made:
        paths["mJ"] = {"path": None, "why": "no meter and no power profile for this board (give --power-profile)"}
    return paths


# -- the benchmark ----------------------------------------------------------------------------------------------


def run_benchmark(args) -> dict:
    from cartosplit.device_runtime.bundle import load_bundle
    from cartosplit.device_runtime.text import encode, load_tokenizer

    began = time.time()
    bundle = load_bundle(args.bundle)
    m = bundle.manifest
    # a sample cpuinfo (tests) is not this machine's: its family is told from its flags, not platform.machine()
    cpu = read_cpu_features(args.cpuinfo, arch="") if args.cpuinfo else read_cpu_features()
    max_length = m.model.max_length
    held = [f for f in DEVICE_FORMATS if f in m.formats]
    formats = [f for f in (args.formats or held) if f in held]
    missing = sorted(set(args.formats or []) - set(held))
    if not formats:
        raise ValueError(f"{args.bundle} holds no device format of {args.formats or list(DEVICE_FORMATS)}")
    tokenizer = load_tokenizer(bundle.path(m.tokenizer), max_length)
    seen = None
    if args.texts:
        texts = read_texts(args.texts)
        counts = [len(ids) for ids, _ in encode(tokenizer, texts)]
        lengths = lengths_seen(counts, max_length)
        typical = round(float(np.median(counts)))
        seen = {
            "file": args.texts,
            "texts": len(texts),
            "token_counts": {"min": min(counts), "median": typical, "mean": float(np.mean(counts)), "max": max(counts)},
        }
        inputs = [texts[i % len(texts)] for i in range(args.inputs)]
    else:
        lengths = capped_lengths(args.lengths, max_length)
        typical = TYPICAL
        inputs = synthetic_texts(tokenizer, args.inputs, max(min(lengths) - 2, 1), max(lengths) - 2, args.seed)
    typical = nearest(lengths, args.typical_length or typical)
    cores = available_cores()
    threads_list = sorted(set(args.threads or range(1, len(cores) + 1)))
    too_many = [t for t in threads_list if t > len(cores)]
    if too_many:
        raise ValueError(f"--threads {too_many}: this process may only use {len(cores)} cores {cores}")

    meter, profiles, energy = setup_energy(args, cpu)
    tables = {}
    skipped = [f"{f}: the bundle does not hold it" for f in missing]
    for fmt in formats:
        table = time_format(bundle, fmt, threads_list, lengths, args, meter, profiles)
        if table.get("skipped"):
            skipped.append(table["skipped"])
            continue
        loaded = loaded_files(bundle, fmt)
        tables[fmt] = {
            "threads": threads_list,
            "lengths": lengths,
            "loaded_bytes": sum(p.stat().st_size for p in loaded),
            "cpu": cpu.describe(),
            **table,
        }
    advice = advise(tables, typical, cpu)
    fmt = advice["format"]
    int8 = [f for f in tables if f.endswith("int8")]
    rss_formats = [f for f in (args.rss_formats or int8 or [fmt]) if f in tables]
    memory = measure_memory(bundle, rss_formats, args.memory, advice["threads"], inputs, args) if args.inputs else []
    memory_line = memory_advice(memory, fmt if fmt in rss_formats else (rss_formats[0] if rss_formats else fmt))
    if memory_line:
        advice["memory"] = memory_line
    rss_format = fmt if fmt.endswith("int8") else (int8[0] if int8 else fmt)
    chosen = [r for r in memory if r["format"] == rss_format]
    headline = next((r for r in chosen if r["memory"] == "default"), chosen[0] if chosen else None)
    row = best_row(tables[fmt], typical)
    report = {
        "bundle": str(args.bundle),
        "bundle_id": bundle.bundle_id,
        "model": m.model.id,
        "split_points": {"router_depth": m.split_points.router_depth, "device": m.split_points.device},
        "bundle_bytes": folder_bytes(bundle.folder),
        "loaded_bytes": tables[fmt]["loaded_bytes"],
        "loaded_format": fmt,
        "peak_rss_mb": headline["peak_rss_mb"] if headline else None,
        "peak_rss_of": (
            {k: headline[k] for k in ("format", "memory", "threads", "inputs", "peak_rss_from")} if headline else None
        ),
        "torch_installed": installed("torch"),
        "matplotlib_installed": installed("matplotlib"),
        "cpu": cpu.summary(),
        "settings": {
            "lengths": lengths,
            "typical_length": typical,
            "threads": threads_list,
            "cores": cores,
            "runs": args.runs,
            "min_seconds": args.min_seconds,
            "warmup": args.warmup,
            "inputs": args.inputs,
            "cold_runs": args.cold_runs,
            "memory_presets": args.memory,
            "timed_inputs": "random token ids, batch 1, every token real (mask of ones)",
        },
        "lengths_seen": seen,
        "formats": tables,
        "advice": advice,
        "cold_start": (
            {k: headline[k] for k in ("format", "memory", "cold_start_ms", "phases_ms", "cold_start_each_ms", "runs")}
            if headline
            else None
        ),
        "memory": memory,
        "energy": energy,
        "skipped": skipped,
    }
    report["cost_profiles"] = cost_profiles(bundle, row, fmt, energy, cpu.describe(), args)
    report["seconds"] = round(time.time() - began, 1)
    return report


# -- report -------------------------------------------------------------------------------------------------------


def _mj(row: dict, profile: str | None) -> str:
    """The row's energy: measured, or the estimate of this board's profile ("est. ..." in the Energy section when
    there is none: one per cited profile)."""
    for e in row.get("energy", []):
        if e["label"] == "measured":
            return f"{e['mj_per_sample']:.3f}"
        if e.get("profile") == profile:
            return f"{e['mj_per_sample']:.3f} (est.)"
    return "est.: see Energy" if row.get("energy") else "—"


def markdown(r: dict) -> list[str]:
    cpu, s, a = r["cpu"], r["settings"], r["advice"]
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["features"].items())
    lines = [
        f"# Device benchmark — {r['model']}, bundle `{r['bundle']}`",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"CPU: {cpu['model']}{' on ' + cpu['board'] if cpu['board'] else ''} ({cpu['arch']}); {features}; "
        f"int8 dot product: {cpu['int8_dot'] or 'none'}.  ",
        f"torch installed: {r['torch_installed']}; matplotlib installed: {r['matplotlib_installed']}.  ",
        f"Bundle: {r['bundle_bytes'] / 1e6:.2f} MB on disk; the device opens {r['loaded_bytes'] / 1e6:.2f} MB for "
        f"{r['loaded_format']} (device graphs + tokenizer + manifest). Took {r['seconds']} s.",
        "",
        "## Advice",
        "",
        f"**{a['format']}** with {a['threads']} thread(s): {a['why']}.",
    ]
    if a.get("memory"):
        lines += ["", f"Memory: {a['memory']}."]
    lines += [
        "",
        f"Use it: `cartosplit run --bundle B --format auto --advice {r.get('out', 'RESULT')}.json` "
        '(or serve-device\'s `format = "auto"` with `advice = ...`).',
    ]
    seen = r.get("lengths_seen")
    lines += [
        "",
        "## Latency (device_head + device_tail, batch 1, ms per sample)",
        "",
        f"Lengths {s['lengths']}"
        + (
            f" (from {seen['texts']} texts of `{seen['file']}`: 10th/50th/90th percentile and longest token count; "
            f"median {seen['token_counts']['median']})"
            if seen
            else ""
        )
        + f"; typical length {s['typical_length']}; threads {s['threads']} (process pinned to that many cores); "
        f"{s['warmup']} warm-up calls, then at least {s['runs']} calls and {s['min_seconds']} s each. "
        f"CPU: {cpu['int8_note']}.",
        "",
        "| format | threads | length | p50 ms | p90 ms | head / tail p50 ms | mJ per sample | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fmt, table in r["formats"].items():
        for row in table["rows"]:
            note = f"bucket {row['bucket']}" if "bucket" in row else ""
            lines.append(
                f"| {fmt} | {row['threads']} | {row['length']} | {row['p50_ms']:.3f} | {row['p90_ms']:.3f} | "
                f"{row['head_p50_ms']:.3f} / {row['tail_p50_ms']:.3f} | {_mj(row, r['energy'].get('profile'))} | "
                f"{note} |"
            )
        for why in table.get("skipped_lengths", []):
            lines.append(f"| {fmt} | — | — | — | — | — | — | skipped: {why} |")
    lines += [
        "",
        "## Cold start and peak memory (a fresh process each)",
        "",
        "Cold start = spawn to the first answer: interpreter, imports, load + verify the bundle (sha256 of every "
        "file), open the sessions and the tokenizer, answer one input. Peak RSS = the process's VmHWM after "
        f"answering {s['inputs']} inputs. Median of {s['cold_runs']} run(s); the page cache is warm after the "
        "first.",
        "",
        "| format | memory | threads | cold start ms | imports / load+verify / open / first answer ms | peak RSS MB "
        "| RSS at end MB | p50 / p90 ms per input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r["memory"]:
        p = x["phases_ms"]
        lines.append(
            f"| {x['format']} | {x['memory']} | {x['threads']} | {x['cold_start_ms']:.0f} | "
            f"{p['interpreter_start'] + p['imports']:.0f} / {p['load_and_verify_bundle']:.0f} / "
            f"{p['open_sessions_and_tokenizer']:.0f} / {p['first_answer']:.0f} | {x['peak_rss_mb']:.1f} | "
            f"{x['rss_end_mb'] if x['rss_end_mb'] is None else round(x['rss_end_mb'], 1)} | "
            f"{x['p50_ms']:.2f} / {x['p90_ms']:.2f} |"
        )
    if not r["memory"]:
        lines.append("| — | — | — | not measured (--inputs 0) | | | | |")
    e = r["energy"]
    lines += ["", "## Energy", "", (e.get("note") or f"{e['label'].upper()}: {e.get('source')}").rstrip(".") + "."]
    row = best_row(r["formats"][a["format"]], a["length"])
    estimates = [x for x in (row or {}).get("energy", []) if x["label"] == "estimated"]
    if len(estimates) > 1:
        lines += [
            "",
            f"{a['format']}, length {a['length']}, {a['threads']} thread(s), per profile: "
            + "; ".join(f"{x['profile']} {x['mj_per_sample']:.3f} mJ ({x['watts']:g} W)" for x in estimates)
            + ".",
            "",
        ]
    if e.get("idle_w") is not None:
        lines.append(f"Idle: {e['idle_w']:.2f} W ({e.get('idle_basis') or 'the profile'}).")
    for name, urls in (e.get("sources") or {}).items():
        lines.append(f"- {name}: " + ", ".join(urls))
    lines += ["", "## Cost profiles for `cartosplit calibrate --costs FILE`", ""]
    for unit, c in r["cost_profiles"].items():
        if c.get("path") is None:
            lines.append(f"- {unit}: not written ({c['why']})")
            continue
        values = ", ".join(
            f"{k} {c[k]:.4g}" for k in ("device_per_layer", "edge_per_layer", "cloud_per_layer") if c[k] is not None
        )
        lines.append(f"- `{c['path']}` ({unit}): {values}. {c['source']}")
    if r["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {x}" for x in r["skipped"]]
    if r.get("plot"):
        lines += ["", f"![device slice p50]({Path(r['plot']).name})"]
    return lines


def plot(r: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for fmt, table in r["formats"].items():
        lengths = table["lengths"]
        best = [min((x["p50_ms"] for x in table["rows"] if x["length"] == n), default=np.nan) for n in lengths]
        ax.plot(lengths, best, marker="o", label=fmt)
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("p50 ms per sample (best threads)")
    ax.set_title(f"device slice on {r['cpu']['model']}"[:70])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -------------------------------------------------------------------------------------------------


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        wrong = [n for n in names if n not in choices]
        if not names or wrong:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}; got {text!r}")
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser(NAME, __doc__)
    parser.add_argument("--bundle", required=True, help="a full or a device tier bundle (verified first)")
    parser.add_argument("--formats", type=_names(DEVICE_FORMATS), help="device formats (default: all it holds)")
    parser.add_argument(
        "--lengths",
        type=positive_int_list,
        default=list(DEFAULT_LENGTHS),
        help="sequence lengths, capped at the model's max length (default 16,32,64,128)",
    )
    parser.add_argument("--texts", metavar="FILE", help="real inputs (text or JSONL): time the lengths they have")
    parser.add_argument("--typical-length", type=int, help="the length of the advice and the cost profile")
    parser.add_argument("--threads", type=positive_int_list, help="thread counts (default 1..the cores available)")
    parser.add_argument("--runs", type=int, default=20, help="at least this many timed calls per row (default 20)")
    parser.add_argument("--min-seconds", type=float, default=0.3, help="and at least this long (default 0.3)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument(
        "--inputs", type=int, default=100, help="inputs each cold-start process answers (peak RSS; 0: skip)"
    )
    parser.add_argument("--cold-runs", type=int, default=3, help="fresh processes per format and preset (default 3)")
    parser.add_argument(
        "--memory",
        type=_names(tuple(dict.fromkeys(ONNX_MEMORY + LITERT_MEMORY))),
        default=["default", "low"],
        help="memory presets to measure (default default,low; onnxruntime: " + ", ".join(ONNX_MEMORY)
        + "; LiteRT: " + ", ".join(LITERT_MEMORY) + ")",
    )  # fmt: skip
    parser.add_argument("--rss-formats", type=_names(DEVICE_FORMATS), help="formats of the cold-start processes")
    parser.add_argument("--no-energy", dest="energy", action="store_false", help="skip energy")
    parser.add_argument("--power-profile", help="this board's power profile for estimates (default: by board name)")
    parser.add_argument("--power-profiles", default=str(POWER_PROFILES), help=argparse.SUPPRESS)
    parser.add_argument("--device-profiles", default=str(DEVICE_PROFILES), help=argparse.SUPPRESS)
    parser.add_argument("--idle-seconds", type=float, default=1.0, help="with a meter: idle power over this long")
    parser.add_argument("--base-profile", metavar="FILE", help="edge/cloud/link costs (default: the bundle's)")
    parser.add_argument("--child-timeout", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--sysfs-root", default="/", help=argparse.SUPPRESS)  # tests: a fake tree
    parser.add_argument("--cpuinfo", help=argparse.SUPPRESS)  # tests: a sample /proc/cpuinfo
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out",
        default=f"benchmarks/results/device-{platform.machine() or 'unknown'}",
        help="path prefix for .json, .md, .png and -cost-{ms,mJ}.json (default %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.runs < 1 or args.min_seconds < 0 or args.warmup < 0 or args.inputs < 0 or args.cold_runs < 1:
        raise SystemExit("--runs and --cold-runs must be >= 1; --min-seconds, --warmup and --inputs >= 0")
    if args.inputs == 1:
        raise SystemExit("--inputs must be 0 (skip) or >= 2: the first answer is the cold start")
    report = run_benchmark(args)
    report["out"] = args.out
    publish(report, args.out, bench_command(NAME, argv), markdown, plot)  # no matplotlib: no PNG, the rest written
    return 0


if __name__ == "__main__":
    sys.exit(main())
