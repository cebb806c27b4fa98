"""``cartosplit``: one command line for the whole kit.

Lives in the torch-free package so that a device install (no torch) still has the command; the
workstation subcommands import ``export`` lazily and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys

from cartosplit.device_runtime.defaults import DEFAULT_DEVICE_SPLIT, DEFAULT_EDGE_SPLIT, DEFAULT_MODEL

DESCRIPTION = """\
Split a BERT classifier over device, edge and cloud (DIMEC-DC: multi-exit BERT + data-cartography router).

Workflow on a workstation:
  cartosplit train --task sst2              fine-tune a multi-exit model, record training dynamics, map the data
  cartosplit calibrate --run runs/sst2      fit the router, choose thresholds on held-out data, print the table
  cartosplit export --run runs/sst2 --out bundles/sst2
                                            ONNX (fp32, int8) + TFLite slices, validated, in a hashed bundle
  cartosplit inspect bundles/sst2           verify a bundle and print its manifest readably

Serving (no torch needed):
  cartosplit serve-cloud --bundle B --port 50052
  cartosplit serve-edge --bundle B --port 50051 --cloud 127.0.0.1:50052
  cartosplit run --bundle B --edge 127.0.0.1:50051 --cloud 127.0.0.1:50052 < texts.txt > answers.jsonl
  cartosplit serve-device --config /etc/cartosplit/device.toml
                                            the device as a local HTTP service (a Pi's systemd unit)
  cartosplit demo                           train + calibrate, quickly, on a small SST-2 subset
"""


def _need_export_extra(command: str) -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"cartosplit {command} runs on the workstation and needs torch and transformers ({exc}). "
            "Install them with: pip install torch==2.13.0 && pip install 'cartosplit[export,default-model]'"
        ) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (shared with the benchmarks' parsers)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _train_size(text: str) -> int | None:
    return None if text == "all" else positive_int(text)


def _add_train_args(p: argparse.ArgumentParser, out_default: str | None, size: int, calib: int, epochs: int) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--task", default="sst2", help="GLUE task: sst2, cola, mrpc or rte (default: %(default)s)")
    data.add_argument(
        "--data-dir",
        help="folder with <TASK>/train.tsv and dev.tsv in the GLUE layout; default: $CARTOSPLIT_DATA_DIR, "
        "then ../shared/data/glue, then the Hugging Face `datasets` download",
    )
    data.add_argument("--train-file", help="your own CSV/JSONL (text, optional text_pair, label) instead of GLUE")
    data.add_argument("--dev-file", help="the matching dev file, for reporting (needed with --train-file)")
    data.add_argument(
        "--train-size",
        type=_train_size,
        default=size,
        help="training samples drawn from the training file, or 'all' (default: %(default)s)",
    )
    data.add_argument(
        "--calib-size",
        type=positive_int,
        default=calib,
        help="training-file samples held out to calibrate thresholds, never trained on (default: %(default)s)",
    )
    model = p.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face BERT-family id or local folder")
    model.add_argument(
        "--device-split", type=int, default=DEFAULT_DEVICE_SPLIT, help="layers on the device (default: %(default)s)"
    )
    model.add_argument(
        "--edge-split", type=int, default=DEFAULT_EDGE_SPLIT, help="depth reached on the edge (default: %(default)s)"
    )
    model.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="exit pooling (default: mean)")
    model.add_argument("--max-length", type=positive_int, default=128, help="truncate inputs to this many tokens")
    opt = p.add_argument_group("training")
    opt.add_argument("--epochs", type=positive_int, default=epochs, help="(default: %(default)s)")
    opt.add_argument("--batch-size", type=positive_int, default=32, help="(default: %(default)s)")
    opt.add_argument("--lr", type=float, default=5e-5, help="encoder learning rate (default: %(default)s)")
    opt.add_argument("--seed", type=int, default=42, help="(default: %(default)s)")
    opt.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    carto = p.add_argument_group("cartography (easy = learned by the device exit, medium = by the edge exit)")
    carto.add_argument("--min-confidence", type=float, default=0.75, help="learned: mean gold prob >= this")
    carto.add_argument("--max-variability", type=float, default=0.2, help="learned: std of gold prob <= this")
    p.add_argument("--out", default=out_default, help="run folder (default: runs/<task>)")


def _train_config(args: argparse.Namespace):
    from cartosplit.export.cartography import GroupingRule
    from cartosplit.export.train import TrainConfig

    return TrainConfig(
        task=args.task,
        out=args.out or f"runs/{args.task}",
        model=args.model,
        data_dir=args.data_dir,
        train_file=args.train_file,
        dev_file=args.dev_file,
        train_size=args.train_size,
        calib_size=args.calib_size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        device_split=args.device_split,
        edge_split=args.edge_split,
        pooling=args.pooling,
        seed=args.seed,
        threads=args.threads,
        grouping=GroupingRule(args.min_confidence, args.max_variability),
    )


def _add_calibrate_args(p: argparse.ArgumentParser, with_run: bool) -> None:
    if with_run:
        p.add_argument("--run", required=True, help="run folder written by `cartosplit train`")
    r = p.add_argument_group("router")
    r.add_argument(
        "--router",
        choices=("logreg", "mlp", "centroid", "knn"),
        default="logreg",
        help="knn: the k nearest reference samples' groups (default: logreg)",
    )
    r.add_argument(
        "--router-groups",
        choices=("train", "heldout", "outcome"),
        default="train",
        help="what the router learns: train = cartography of the trained samples (the paper's reading); "
        "heldout = cartography of the calibration split's per-epoch dynamics, never trained on; outcome = "
        "the cheapest exit that is right on held-out samples (no cartography). Held-out targets fit the "
        "router on the calibration path samples (default: %(default)s)",
    )
    r.add_argument(
        "--grouping",
        choices=("fixed", "adaptive"),
        default="fixed",
        help="fixed: the run's confidence/variability thresholds; adaptive: by rank, no tier left empty "
        "(default: %(default)s)",
    )
    r.add_argument(
        "--free-features",
        action="store_true",
        help="logreg/mlp: add what costs nothing at the router's depth: a tiny label head's confidence and "
        "entropy, and the token count",
    )
    r.add_argument(
        "--keep-router",
        action="store_true",
        help="deploy the router even if it is no better than the majority group or the device exit's "
        "confidence on held-out data (by default such a router is refused and the policy is the cascade)",
    )
    r.add_argument(
        "--router-depth",
        type=int,
        default=0,
        help="layers run before the router decides; 0 = embedding output, which spares the whole device slice "
        "for a hard sample and won most device regimes in benchmarks/results/router.md (default: %(default)s)",
    )
    c = p.add_argument_group("costs and objective")
    c.add_argument(
        "--costs",
        "--cost-profile",
        dest="costs",
        help="JSON cost profile (per-layer and per-hop costs, e.g. from `cartosplit bench cost-profile`); "
        "default: unit convention",
    )
    c.add_argument("--objective", choices=("max-drop", "reward"), default="max-drop", help="(default: max-drop)")
    c.add_argument(
        "--max-drop",
        type=float,
        default=0.5,
        help="max-drop: lowest cost within this many accuracy points of all-cloud (default: %(default)s)",
    )
    c.add_argument("--beta", type=float, default=1.0, help="reward: accuracy - beta * cost (default: %(default)s)")
    c.add_argument(
        "--metric",
        choices=("accuracy", "mcc", "f1"),
        help="the set metric the objective and reports use (default: the task's: MCC for CoLA, F1 for MRPC, "
        "else accuracy)",
    )
    g = p.add_argument_group("guarantee (docs/method.md, 'The promise')")
    g.add_argument(
        "--guarantee",
        choices=("ltt", "crc", "none"),
        default="ltt",
        help="ltt: P(risk <= max-drop) >= 1 - delta over the calibration draw; crc: E[risk] <= max-drop; none: "
        "the plain search, no guarantee. The risk bounds the accuracy drop; a bound the samples cannot "
        "certify is refused, naming the smallest one they can (default: %(default)s)",
    )
    g.add_argument("--delta", type=float, default=0.1, help="ltt: allowed failure probability (default: %(default)s)")
    g.add_argument(
        "--reference",
        choices=("label", "final"),
        default="label",
        help="label: risk = P(answer wrong and final exit right); final: P(answer differs from the final exit's), "
        "which needs no label (default: %(default)s; unlabelled --calib-file forces final)",
    )
    g.add_argument(
        "--calib-file",
        help="your own in-domain calibration samples: CSV/JSONL as for training (label optional) or plain text "
        "lines (.txt); default: the run's calibration split from the training file",
    )


def _calibrate_config(args: argparse.Namespace, run: str):
    from cartosplit.device_runtime.policy import Objective
    from cartosplit.export.calibrate import CalibrateConfig
    from cartosplit.export.router import RouterConfig

    return CalibrateConfig(
        run=run,
        router=RouterConfig(kind=args.router, depth=args.router_depth, **_router_extras(args)),
        costs=args.costs,
        objective=Objective(args.objective, args.max_drop, args.beta),
        metric=args.metric,
        guarantee=args.guarantee,
        delta=args.delta,
        reference=args.reference,
        calib_file=args.calib_file,
        router_groups=args.router_groups,
        grouping=args.grouping,
        keep_router=args.keep_router,
    )


def _router_extras(args: argparse.Namespace) -> dict:
    if not args.free_features:
        return {}
    if args.router not in ("logreg", "mlp"):
        raise SystemExit("--free-features applies to --router logreg or mlp")
    return {"free_features": True}


def cmd_train(args: argparse.Namespace) -> int:
    from cartosplit.export.train import train

    train(_train_config(args), resume=args.resume)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cartosplit.export.calibrate import calibrate

    calibrate(_calibrate_config(args, args.run))
    return 0


class _MissingServerExtra:
    """Stands in for the server modules on an install without the `server` extra (a phone, a board)."""

    def __init__(self, error: ImportError) -> None:
        self.error = error

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.set_defaults(accepts_any_arguments=True)  # whatever was given, the answer is the install hint

    def serve(self, args: argparse.Namespace) -> int:
        raise SystemExit(
            f"cartosplit {args.command} needs the server extra ({self.error}): pip install 'cartosplit[server]'"
        )


def comma_list(kind):
    """argparse type: a comma-separated list of ``kind``, as a tuple (shared with the benchmarks' parsers)."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(x) for x in text.split(",") if x)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None

    return parse


def cmd_export(args: argparse.Namespace) -> int:
    from cartosplit.export.bundle_writer import ExportConfig, export_bundle

    export_bundle(
        ExportConfig(
            run=args.run,
            out=args.out,
            formats=args.formats,
            buckets=args.buckets,
            opset=args.opset,
            validation_samples=args.validation_samples,
            fp32_tolerance=args.fp32_tolerance,
            int8_min_agreement=args.int8_min_agreement,
            threads=args.threads,
            overwrite=args.overwrite,
        )
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from cartosplit.device_runtime.bundle import describe, load_bundle

    print(describe(load_bundle(args.bundle)))
    print("all files match their sha256")
    return 0


def _read_inputs(source, max_chars: int):
    """(index, text, text_pair, error) per non-blank input line: text lines or JSON Lines, per line.

    A bad line (not UTF-8, invalid JSON, no "text", empty or oversize text) gets its error and the
    rest goes on: one unreadable line never costs the others their answers.
    """
    index = 0
    for number, raw in enumerate(source, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            yield index, None, None, f"line {number}: not UTF-8 ({exc.reason} at byte {exc.start})"
            index += 1
            continue
        if not line.strip():
            continue
        text, pair, error = line, None, None
        if line.lstrip().startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                record, error = {}, f"line {number}: invalid JSON ({exc.msg} at column {exc.colno})"
            text, pair = record.get("text"), record.get("text_pair")
            if error is None and not isinstance(text, str):
                error = f'line {number}: a JSON line needs a "text" string'
            elif error is None and pair is not None and not isinstance(pair, str):
                error = f'line {number}: "text_pair" must be a string'
        if error is None:
            error = _check_text(text, number, max_chars) or (pair is not None and _check_text(pair, number, max_chars))
        yield index, text, pair, error or None
        index += 1


def _check_text(text: str, number: int, max_chars: int) -> str | None:
    if not text.strip():
        return f"line {number}: empty text"
    if len(text) > max_chars:
        return f"line {number}: {len(text)} characters is over --max-chars {max_chars}"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from cartosplit.device_runtime.runtime import DeviceRuntime
    from cartosplit.protos.security import ClientSecurity

    security = ClientSecurity.from_options(args.ca, args.cert, args.key, args.token_file)
    # the bundle first: a wrong or tampered bundle is refused before any input is read
    runtime = DeviceRuntime(
        args.bundle,
        edge=args.edge,
        cloud=args.cloud,
        backend=args.backend,
        fmt=args.format,
        threads=args.threads,
        timeout_s=args.timeout,
        encoding=args.encoding,
        security=security,
    )
    failed = total = 0
    with runtime:
        source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
        sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        with source, sink:
            # one input at a time, written as it is answered: a long stream shows progress and loses nothing
            for index, text, pair, error in _read_inputs(source, args.max_chars):
                total += 1
                if error is None:
                    row = runtime.predict([text], None if pair is None else [pair])[0].to_dict()
                else:
                    failed += 1
                    row = {"error": error}
                sink.write(json.dumps({"index": index, **row}) + "\n")
                sink.flush()
    if failed:
        print(f"cartosplit run: {failed} of {total} inputs had errors (see their 'error' field)", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cartosplit.export.demo import run_demo

    cfg = _train_config(args)
    run_demo(
        cfg,
        _calibrate_config(args, cfg.out),
        device_format=args.device_format,
        server_format=args.server_format,
        limit=args.limit,
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cartosplit.benchmarks import cli as bench_cli

    if args.name is None:
        args.bench_parser.print_help()
        return 0 if args.bench_help else 2
    argv = list(args.bench_argv) + (["--help"] if args.bench_help else [])
    return bench_cli.run(args.name, argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cartosplit", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="fine-tune a multi-exit model, record training dynamics, map the data",
        description="Fine-tune one multi-exit BERT (exits after the device slice, the edge slice and the last "
        "layer), record each training sample's gold-label probability at every exit every epoch, then group "
        "samples easy/medium/hard by data cartography and draw the data map. Checkpoints every epoch; "
        "--resume continues an interrupted run.",
    )
    _add_train_args(p, None, size=4000, calib=2000, epochs=3)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
    p.set_defaults(func=cmd_train, needs_export=True)

    p = sub.add_parser(
        "calibrate",
        help="fit the router and choose thresholds on held-out data; print the cost/accuracy table",
        description="Fit the router on the run's cartography groups, choose the policy thresholds on the "
        "held-out calibration split (never the dev set), and report accuracy, mean cost, cost cut vs "
        "all-cloud and tier shares on the dev set next to all-device, all-edge, all-cloud, the oracle and "
        "the max-softmax cascade. Writes calibration.json into the run.",
    )
    _add_calibrate_args(p, with_run=True)
    p.set_defaults(func=cmd_calibrate, needs_export=True)

    p = sub.add_parser(
        "export",
        help="export a calibrated run to a validated bundle (ONNX fp32/int8, TFLite)",
        description="Slice the trained model into the graphs each tier runs (device head up to the router, "
        "device tail, edge, cloud from each entry depth, full model), export them to ONNX fp32 (dynamic "
        "batch and sequence) and int8 (onnxruntime dynamic quantization; weight type and per-channel "
        "chosen by measured agreement), and the device graphs to TFLite fp32/int8 (one file per sequence "
        "bucket). Every artifact is checked against torch on held-out samples; beyond tolerance the bundle "
        "is refused (kept as OUT.rejected). The bundle's manifest.json lists split points, policy, costs, "
        "validation and the size and sha256 of every file.",
    )
    p.add_argument("--run", required=True, help="a calibrated run folder")
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument(
        "--formats",
        type=comma_list(str),
        default=("onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"),
        help="comma-separated subset of onnx-fp32,onnx-int8,tflite-fp32,tflite-int8 (default: all)",
    )
    p.add_argument(
        "--buckets", type=comma_list(int), default=(32, 64, 128), help="TFLite sequence lengths (default: 32,64,128)"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: %(default)s)")
    p.add_argument("--validation-samples", type=positive_int, default=256, help="held-out samples checked")
    p.add_argument("--fp32-tolerance", type=float, default=1e-3, help="max abs logit diff for fp32 (default: 1e-3)")
    p.add_argument(
        "--int8-min-agreement", type=float, default=0.95, help="min label/router agreement for int8 (default: 0.95)"
    )
    p.add_argument("--threads", type=positive_int, help="CPU threads for torch and the runtimes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle folder")
    p.set_defaults(func=cmd_export, needs_export=True)

    p = sub.add_parser(
        "inspect",
        help="verify a bundle (schema, sizes, sha256) and print its manifest",
        description="Load a bundle as a device or server would: refuse an unknown schema version or any missing, "
        "truncated or modified file; then print split points, policy, costs, formats, graphs, validation "
        "figures and files. Needs no torch.",
    )
    p.add_argument("bundle", help="bundle folder")
    p.set_defaults(func=cmd_inspect, needs_export=False)

    try:  # the servers need the `server` extra (prometheus-client, grpc health/reflection); a device has not
        from cartosplit.cloud_server import server as cloud_server
        from cartosplit.edge_server import server as edge_server
    except ImportError as exc:
        cloud_server = edge_server = _MissingServerExtra(exc)

    p = sub.add_parser(
        "serve-cloud",
        help="serve the cloud tier: the rest of the model from any entry depth, and the full model from tokens",
        description="gRPC CloudTier server (protos/tiers.proto) for a bundle: runs cloud_from_<depth> for "
        "activations from the edge or straight from the device's router, and the full model from tokens "
        "(all-cloud mode). Dynamic batching, gRPC health checking and reflection, Prometheus metrics "
        "(--metrics-port), max message size, deadlines, graceful shutdown on SIGTERM (drains in-flight "
        "requests), JSON logs on stderr. Every request is validated against the bundle before a model sees "
        "it. Binds 127.0.0.1 unless --host says otherwise. Needs no torch.",
    )
    cloud_server.add_arguments(p)
    p.set_defaults(func=cloud_server.serve, needs_export=False)

    p = sub.add_parser(
        "serve-edge",
        help="serve the edge tier: the edge slice and its exit; forward the unsure to the cloud",
        description="gRPC EdgeTier server for a bundle: runs the edge slice on activations from the device, "
        "answers when its exit is confident (the bundle's alpha_edge, or --alpha-edge) and forwards the "
        "rest to --cloud (fp16 activations by default). If the cloud is unreachable it answers from its own "
        "exit and marks the reply degraded. Same batching, health, reflection, metrics, limits and "
        "shutdown as serve-cloud. Needs no torch.",
    )
    edge_server.add_arguments(p)
    p.set_defaults(func=edge_server.serve, needs_export=False)

    p = sub.add_parser(
        "run",
        help="the device: classify text with a bundle, offloading to edge/cloud servers as the policy says",
        description='Read text lines or JSON Lines ({"text": ..., "text_pair": ...}) and write one JSON line '
        "per input: label, score, the tier that answered, the route, latency (ms), bytes sent, cost, and "
        "degraded=true when a tier the policy wanted was unreachable. Runs the device graphs and the router "
        "locally (onnxruntime or LiteRT, no torch); easy inputs never leave the device. Edge down: the "
        "cloud answers; both down: the device's own exit answers.",
    )
    p.add_argument("--bundle", required=True, help="bundle folder (verified before use)")
    p.add_argument("--edge", help="edge server HOST:PORT (absent: medium inputs go to the cloud)")
    p.add_argument("--cloud", help="cloud server HOST:PORT (absent: the device answers what it cannot send)")
    p.add_argument("--backend", choices=("onnxruntime", "litert"), default="onnxruntime", help="(default: %(default)s)")
    p.add_argument("--format", help="graph format, e.g. onnx-int8, tflite-int8 (default: int8 of the backend)")
    p.add_argument("--encoding", choices=("fp32", "fp16", "int8"), default="fp16", help="activations on the wire")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per remote call (default: %(default)s)")
    p.add_argument("--threads", type=positive_int, help="CPU threads for the device graphs")
    p.add_argument("--input", default="-", help="text or JSONL file (default: stdin)")
    p.add_argument("--output", default="-", help="JSONL output file (default: stdout)")
    p.add_argument(
        "--max-chars",
        type=positive_int,
        default=100_000,
        help="longer inputs are refused (their line gets an error); the model reads max-length tokens anyway",
    )
    p.add_argument("--ca", metavar="PEM", help="reach the edge and the cloud over TLS, trusting this CA")
    p.add_argument("--cert", metavar="PEM", help="mutual TLS: this device's client certificate (needs --ca)")
    p.add_argument("--key", metavar="PEM", help="the private key of --cert")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help="send the bearer token this file holds to the edge and the cloud (needs --ca: never in plaintext)",
    )
    p.set_defaults(func=cmd_run, needs_export=False)

    from cartosplit.device_runtime import service as device_service

    p = sub.add_parser(
        "serve-device",
        help="the device as a local HTTP service (e.g. a systemd unit on a Pi), configured by one TOML file",
        description="Load the bundle once and answer local apps over HTTP: POST /v1/classify with "
        '{"texts": [...], "text_pairs": [...]} returns the same per-input objects `cartosplit run` writes; '
        "GET /healthz names the bundle and the configured tiers. Bundle, edge and cloud servers, backend, "
        "TLS files, listen address and request limits come from one TOML file (deploy/pi/device.toml is an "
        "example; unknown keys are errors). Listens on 127.0.0.1 by default; bad requests get a 4xx and the "
        "service keeps serving; SIGTERM stops it. Standard library HTTP, no torch.",
    )
    device_service.add_arguments(p)
    p.set_defaults(func=device_service.main_from_args, needs_export=False)

    from cartosplit.benchmarks import cli as bench_cli

    p = sub.add_parser(
        "bench",
        help="run a committed benchmark (tradeoff, latency, bytes, e2e, ...)",
        description=bench_cli.description(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,  # `bench NAME --help` is the benchmark's own help
    )
    p.add_argument("-h", "--help", action="store_true", dest="bench_help", help="this help; NAME --help: its options")
    bench_cli.add_arguments(p)
    p.set_defaults(func=cmd_bench, needs_export=False, bench_parser=p)

    p = sub.add_parser(
        "demo",
        help="end to end on one machine: train, calibrate, export, serve edge + cloud, run the device",
        description="Train (or reuse) a quick multi-exit run of the default model on 2,000 SST-2 sentences, "
        "calibrate it, export an ONNX bundle, start a cloud and an edge server as subprocesses on free "
        "loopback ports, run the device runtime over the SST-2 dev set through them, and print accuracy, "
        "tier shares, mean cost, latency and bytes sent next to all-cloud. Each step reuses what an "
        "earlier demo left when nothing changed.",
    )
    _add_train_args(p, "runs/demo-sst2", size=2000, calib=1000, epochs=3)
    _add_calibrate_args(p, with_run=False)
    p.add_argument("--device-format", default="onnx-int8", help="device graphs (default: %(default)s)")
    p.add_argument("--server-format", default="onnx-fp32", help="edge and cloud graphs (default: %(default)s)")
    p.add_argument("--limit", type=positive_int, help="only the first N dev inputs")
    p.set_defaults(func=cmd_demo, needs_export=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "accepts_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.bench_argv = unknown
    if getattr(args, "needs_export", False):
        _need_export_extra(args.command)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; `--resume` continues from the last finished epoch", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # DataError, RunError, ModelError, BundleError are ValueErrors
        print(f"cartosplit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
