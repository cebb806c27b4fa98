"""``cartosplit bench NAME ...``: one entry point for the committed benchmarks.

Each benchmark is a module with ``main(argv) -> int`` and its own ``--help``; the CLI hands it the
arguments after its name. Modules import their heavy dependencies (torch, ray) inside ``main`` so that
``cartosplit --help`` stays fast and works on a device install.
"""

from __future__ import annotations

import argparse
import importlib

# name -> (module, one-line help). Keep in the order a reader would run them.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "tradeoff": (
        "cartosplit.benchmarks.tradeoff",
        "accuracy vs cost on a GLUE task: cartosplit against every baseline",
    ),
    "router": (
        "cartosplit.benchmarks.router_gain",
        "every router variant vs the cascade at the same guarantee, per cost profile",
    ),
    "router-size": (
        "cartosplit.benchmarks.router_size",
        "each router kind's bundle size and device latency (ONNX, TFLite)",
    ),
    "export-formats": ("cartosplit.benchmarks.export_formats", "dev accuracy and device latency per exported format"),
    "latency": ("cartosplit.benchmarks.latency", "device/edge/cloud slice latency per runtime, batch and length"),
    "device": (
        "cartosplit.benchmarks.device_bench",
        "on the device itself, no torch: latency per format, cold start, peak RSS, energy, advice, costs",
    ),
    "bytes": (
        "cartosplit.benchmarks.wire_bytes",
        "bytes per offloaded sample per activation encoding, accuracy change",
    ),
    "e2e": ("cartosplit.benchmarks.e2e", "device, edge and cloud processes over emulated network links"),
    "cost-profile": (
        "cartosplit.benchmarks.cost_profile",
        "a measured cost profile (ms, mJ) from the latency and bytes results",
    ),
    "device-profiles": (
        "cartosplit.benchmarks.device_profiles",
        "cost profiles per cited device (Pi Zero 2 W, Pi 4/5, phone) x link",
    ),
    "int8-batch": (
        "cartosplit.benchmarks.int8_batch",
        "does an int8 answer depend on its batch: static vs dynamic int8 vs fp32 (labels moved, accuracy, speed)",
    ),
    "int8-host": (
        "cartosplit.benchmarks.int8_host",
        "does an int8 answer depend on the CPU: natively vs an emulated x86 without VNNI (qemu)",
    ),
    "drift": (
        "cartosplit.benchmarks.drift",
        "a stream that shifts (typos): audit sampling, the live bound, threshold adaptation, audit cost and p99",
    ),
    "fuzz": ("cartosplit.benchmarks.fuzz_server", "malformed requests against live servers"),
    "http-fuzz": (
        "cartosplit.benchmarks.http_fuzz",
        "raw-socket garbage against serve-device's HTTP API, fuzzed JSONL through `cartosplit run`: 5xx, lost lines",
    ),
    "load": ("cartosplit.benchmarks.load", "many concurrent device runtimes against live servers"),
    "chaos": (
        "cartosplit.benchmarks.chaos",
        "load while the edge and the cloud are killed, frozen and restarted at random: lost, duplicates, phases",
    ),
    "tier-bundles": (
        "cartosplit.benchmarks.tier_bundles",
        "device tier bundle vs full bundle: bytes held vs loaded, start-up time",
    ),
    "cloud-scale": (
        "cartosplit.benchmarks.cloud_scale",
        "the cloud tier plain vs on Ray Serve (1, 2 replicas): latency, memory",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit bench``: the benchmark's name; the rest goes to the benchmark.

    The parser is made without ``-h`` (the command table's ``own_help``): ``bench NAME --help`` is the
    benchmark's own help, so ``--help`` is only recorded here and handed on.
    """
    parser.description = description()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "-h", "--help", action="store_true", dest="bench_help", help="this help; NAME --help: its options"
    )
    parser.add_argument("name", nargs="?", choices=sorted(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS))
    parser.set_defaults(accepts_any_arguments=True, bench_parser=parser)


def description() -> str:
    width = max(len(n) for n in BENCHMARKS)
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in BENCHMARKS.items()]
    return (
        "Run a committed benchmark; `cartosplit bench NAME --help` shows its options. Results go to "
        "benchmarks/results/ as JSON + Markdown (+ PNG) with the command and the machine.\n\n" + "\n".join(lines)
    )


def run(args: argparse.Namespace) -> int:
    """``cartosplit bench [NAME] ...``: the named benchmark over the arguments after its name."""
    if args.name is None:
        args.bench_parser.print_help()
        return 0 if args.bench_help else 2
    argv = list(args.extra_argv) + (["--help"] if args.bench_help else [])
    return run_benchmark(args.name, argv)


def run_benchmark(name: str, argv: list[str]) -> int:
    module = importlib.import_module(BENCHMARKS[name][0])
    return int(module.main(argv) or 0)
