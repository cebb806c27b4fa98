"""``cartosplit``: one command line for the whole kit, importing only the command it runs.

``COMMANDS`` lists every subcommand with the module that implements it. ``cartosplit --help`` prints the list
from the table alone; ``cartosplit NAME ...`` imports NAME's module, which adds its options and runs it. So a
device install (no torch, no server extra) runs ``cartosplit run``, and a missing extra is one line naming it.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

DESCRIPTION = """\
Split a BERT classifier over device, edge and cloud (DIMEC-DC: multi-exit BERT + data-cartography router).

Workflow on a workstation:
  cartosplit train --task sst2              fine-tune a multi-exit model, record training dynamics, map the data
  cartosplit calibrate --run runs/sst2      fit the router, choose thresholds on held-out data, print the table
  cartosplit export --run runs/sst2 --out bundles/sst2
                                            ONNX (fp32, int8) + TFLite slices, validated, in a hashed bundle
  cartosplit inspect bundles/sst2           verify a bundle and print its manifest readably
  cartosplit bundle split bundles/sst2 --tier device --formats tflite-int8
                                            only what the device opens, in bundles/sst2-device (no torch)

Serving (no torch needed):
  cartosplit serve-cloud --bundle B --port 50052
  cartosplit serve-edge --bundle B --port 50051 --cloud 127.0.0.1:50052
  cartosplit run --bundle B --edge 127.0.0.1:50051 --cloud 127.0.0.1:50052 < texts.txt > answers.jsonl
  cartosplit serve-device --config /etc/cartosplit/device.toml
                                            the device as a local HTTP service (a Pi's systemd unit)
  cartosplit demo                           train + calibrate, quickly, on a small SST-2 subset
"""


@dataclass(frozen=True)
class Command:
    """One subcommand. ``arguments`` and ``run`` name attributes of ``module``: ``(parser) -> None`` adds the
    options, ``(args) -> int`` runs the command and returns the exit code."""

    name: str
    help: str  # the line in `cartosplit --help`
    module: str  # imported only when this command is given
    arguments: str
    run: str
    extra: str  # the pip extra that brings the module's third-party imports
    description: str | None = None  # None: the module sets it (bench lists its benchmarks)
    own_help: bool = False  # no -h on the subparser: the module handles --help (bench hands it to the benchmark)


_WORKSTATION = "cartosplit.export.commands"
_DEVICE = "cartosplit.device_runtime.commands"

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "train",
            "fine-tune a multi-exit model, record training dynamics, map the data",
            _WORKSTATION,
            "add_train_arguments",
            "cmd_train",
            "export",
            "Fine-tune one multi-exit BERT (exits after the device slice, the edge slice and the last layer), "
            "record each training sample's gold-label probability at every exit every epoch, then group samples "
            "easy/medium/hard by data cartography and draw the data map. Checkpoints every epoch; --resume "
            "continues an interrupted run.",
        ),
        Command(
            "calibrate",
            "fit the router and choose thresholds on held-out data; print the cost/accuracy table",
            _WORKSTATION,
            "add_calibrate_arguments",
            "cmd_calibrate",
            "export",
            "Fit the router on the run's cartography groups, choose the policy thresholds on the held-out "
            "calibration split (never the dev set), and report accuracy, mean cost, cost cut vs all-cloud and "
            "tier shares on the dev set next to all-device, all-edge, all-cloud, the oracle and the max-softmax "
            "cascade. Writes calibration.json into the run.",
        ),
        Command(
            "export",
            "export a calibrated run to a validated bundle (ONNX fp32/int8, TFLite)",
            _WORKSTATION,
            "add_export_arguments",
            "cmd_export",
            "export",
            "Slice the trained model into the graphs each tier runs (device head up to the router, device tail, "
            "edge, cloud from each entry depth, full model), export them to ONNX fp32 (dynamic batch and "
            "sequence) and int8 (onnxruntime static quantization, calibrated on training samples: answers do not "
            "depend on the batch or the CPU; recipe chosen by measured agreement), and the device graphs to "
            "TFLite fp32/int8 (one file per sequence bucket). "
            "Every artifact is checked against torch on held-out samples; a format beyond tolerance is left out "
            "of the bundle and named with the flag that decides (exit status 1); if none passes, no bundle is "
            "written (the artifacts are kept as OUT.rejected). The bundle's manifest.json lists split points, "
            "policy, costs, validation and the size and sha256 of every file.",
        ),
        Command(
            "inspect",
            "verify a bundle (schema, sizes, sha256) and print its manifest",
            _DEVICE,
            "add_inspect_arguments",
            "cmd_inspect",
            "device",
            "Load a bundle as a device or server would: refuse an unknown schema version or any missing, "
            "truncated or modified file; then print split points, policy, costs, formats, graphs, validation "
            "figures and files. Needs no torch.",
        ),
        Command(
            "bundle",
            "tier bundles: `bundle split` cuts from a full bundle what one tier opens",
            "cartosplit.device_runtime.tier_bundles",
            "add_bundle_arguments",
            "cmd_bundle",
            "device",
            "`cartosplit bundle split SOURCE --tier device|edge|cloud [--formats F,...] [--out DIR]`: copy from a "
            "full bundle only the graphs one tier opens (device: device_head, device_tail and the tokenizer; edge: "
            "edge; cloud: cloud_from_* and full), in the formats asked, into a bundle whose manifest hashes only "
            "those files and names the tier and its source bundle's id. A device, an edge and a cloud bundle cut "
            "from one export work together; bundles of different exports refuse each other. Needs no torch.",
        ),
        Command(
            "serve-cloud",
            "serve the cloud tier: the rest of the model from any entry depth, and the full model from tokens",
            "cartosplit.cloud_server.server",
            "add_arguments",
            "serve",
            "server",
            "gRPC CloudTier server (protos/tiers.proto) for a bundle: runs cloud_from_<depth> for activations "
            "from the edge or straight from the device's router, and the full model from tokens (all-cloud "
            "mode). Dynamic batching, gRPC health checking and reflection, Prometheus metrics (--metrics-port), "
            "max message size, deadlines, graceful shutdown on SIGTERM (drains in-flight requests), JSON logs "
            "on stderr. Every request is validated against the bundle before a model sees it. Binds 127.0.0.1 "
            "unless --host says otherwise. Needs no torch.",
        ),
        Command(
            "serve-edge",
            "serve the edge tier: the edge slice and its exit; forward the unsure to the cloud",
            "cartosplit.edge_server.server",
            "add_arguments",
            "serve",
            "server",
            "gRPC EdgeTier server for a bundle: runs the edge slice on activations from the device, answers "
            "when its exit is confident (the bundle's alpha_edge, or --alpha-edge) and forwards the rest to "
            "--cloud (fp16 activations by default). If the cloud is unreachable it answers from its own exit "
            "and marks the reply degraded. Same batching, health, reflection, metrics, limits and shutdown as "
            "serve-cloud. Needs no torch.",
        ),
        Command(
            "run",
            "the device: classify text with a bundle, offloading to edge/cloud servers as the policy says",
            _DEVICE,
            "add_run_arguments",
            "cmd_run",
            "device",
            'Read text lines or JSON Lines ({"text": ..., "text_pair": ...}) and write one JSON line per '
            "input: label, score, the tier that answered, the route, latency (ms), bytes sent, cost, and "
            "degraded=true when a tier the policy wanted was unreachable. Runs the device graphs and the router "
            "locally (onnxruntime or LiteRT, no torch); easy inputs never leave the device. Edge down: the "
            "cloud answers; both down: the device's own exit answers.",
        ),
        Command(
            "serve-device",
            "the device as a local HTTP service (e.g. a systemd unit on a Pi), configured by one TOML file",
            _DEVICE,
            "add_serve_device_arguments",
            "cmd_serve_device",
            "device",
            "Load the bundle once and answer local apps over HTTP: POST /v1/classify with "
            '{"texts": [...], "text_pairs": [...]} returns the same per-input objects `cartosplit run` writes; '
            "GET /healthz names the bundle and the configured tiers. Bundle, edge and cloud servers, backend, "
            "TLS files, listen address and request limits come from one TOML file (deploy/pi/device.toml is an "
            "example; unknown keys are errors). Listens on 127.0.0.1 by default; bad requests get a 4xx and the "
            "service keeps serving; SIGTERM stops it. Standard library HTTP, no torch.",
        ),
        Command(
            "bench",
            "run a committed benchmark (tradeoff, latency, bytes, e2e, device, ...)",
            "cartosplit.benchmarks.cli",
            "add_arguments",
            "run",
            # most benchmarks measure the exported model with torch beside it; the table module imports nothing,
            # so `bench device` (numpy, onnxruntime, LiteRT: the device extra) runs on a device install
            "export",
            own_help=True,
        ),
        Command(
            "demo",
            "end to end on one machine: train, calibrate, export, serve edge + cloud, run the device",
            _WORKSTATION,
            "add_demo_arguments",
            "cmd_demo",
            "export",
            "Train (or reuse) a quick multi-exit run of the default model on 2,000 SST-2 sentences, calibrate "
            "it, export an ONNX bundle, start a cloud and an edge server as subprocesses on free loopback ports, "
            "run the device runtime over the SST-2 dev set through them, and print accuracy, tier shares, mean "
            "cost, latency and bytes sent next to all-cloud. Each step reuses what an earlier demo left when "
            "nothing changed.",
        ),
    )
}

# how to install an extra; torch goes first and pinned, or pip pulls a multi-GB CUDA build
_INSTALL = {"export": "pip install torch==2.13.0 && pip install 'cartosplit[export,default-model]'"}


def build_parser(*commands: str) -> argparse.ArgumentParser:
    """The parser with every command listed; only the modules of ``commands`` are imported and their options added.

    Raises ImportError when such a module (or a dependency of it) cannot be imported.
    """
    parser = argparse.ArgumentParser(
        prog="cartosplit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for c in COMMANDS.values():
        p = sub.add_parser(c.name, help=c.help, description=c.description, add_help=not c.own_help)
        if c.name in commands:
            module = importlib.import_module(c.module)
            getattr(module, c.arguments)(p)
            p.set_defaults(func=getattr(module, c.run))
    return parser


def missing_dependency_message(command: Command, error: ImportError) -> str:
    """The one line for a command whose module cannot be imported; re-raises ``error`` when it is a bug of ours."""
    missing = error.name or ""
    if missing.split(".")[0] == "cartosplit":
        if not isinstance(error, ModuleNotFoundError):
            raise error  # a name missing from one of our modules: a bug, keep the traceback
        # a tier image copies only its own folders (deploy/docker): the command's package is not installed
        return f"cartosplit {command.name} is not part of this install ({error})"
    install = _INSTALL.get(command.extra, f"pip install 'cartosplit[{command.extra}]'")
    return f"cartosplit {command.name} needs the {command.extra} extra ({error}): {install}"


def _command_name(argv: list[str]) -> str | None:
    # the top-level parser has no option taking a value, so the first word is the command
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    """``cartosplit ...``; the exit code (2: bad input or a missing extra)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = _command_name(argv)
    try:
        parser = build_parser(name) if name else build_parser()
    except ImportError as exc:
        print(missing_dependency_message(COMMANDS[name], exc), file=sys.stderr)
        return 2
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.extra_argv = unknown
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; `--resume` continues from the last finished epoch", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # DataError, RunError, ModelError, BundleError are ValueErrors
        print(f"cartosplit {args.command}: error: {exc}", file=sys.stderr)
        return 2
