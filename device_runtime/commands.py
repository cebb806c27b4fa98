"""The device commands of ``cartosplit``: run, inspect, serve-device. No torch.

Each command is ``add_<name>_arguments(parser)`` and ``cmd_<name>(args) -> int``; ``cartosplit.cli``
imports this module only for these commands. Module-level imports need numpy alone, so ``inspect`` works on
the base install; grpc (the ``device`` extra) is imported by the commands that reach a server.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Iterator

from cartosplit.cli_args import positive_int
from cartosplit.device_runtime import service
from cartosplit.device_runtime.bundle import describe, load_bundle
from cartosplit.device_runtime.inputs import InputError, parse_json, text_problem

# --- run --------------------------------------------------------------------------------------------------


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit run``."""
    parser.add_argument("--bundle", required=True, help="bundle folder (verified before use)")
    parser.add_argument("--edge", help="edge server HOST:PORT (absent: medium inputs go to the cloud)")
    parser.add_argument("--cloud", help="cloud server HOST:PORT (absent: the device answers what it cannot send)")
    parser.add_argument(
        "--backend", choices=("onnxruntime", "litert"), default="onnxruntime", help="(default: %(default)s)"
    )
    parser.add_argument(
        "--format",
        help="graph format: onnx-int8, onnx-fp32, tflite-int8, tflite-fp32, or auto (from this CPU's features and "
        "what the bundle holds; the backend follows the format) (default: int8 of the backend)",
    )
    parser.add_argument(
        "--advice",
        metavar="JSON",
        help="with --format auto: a `cartosplit bench device` result measured on this machine; its advice wins",
    )
    parser.add_argument(
        "--low-memory",
        action="store_true",
        help="onnxruntime without its memory arena and memory-pattern planner: ~5%% less peak memory, ~5%% slower",
    )
    parser.add_argument("--encoding", choices=("fp32", "fp16", "int8"), default="fp16", help="activations on the wire")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per remote call (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, help="CPU threads for the device graphs")
    parser.add_argument("--input", default="-", help="text or JSONL file (default: stdin)")
    parser.add_argument("--output", default="-", help="JSONL output file (default: stdout)")
    parser.add_argument(
        "--max-chars",
        type=positive_int,
        default=100_000,
        help="longer inputs are refused (their line gets an error); the model reads max-length tokens anyway",
    )
    parser.add_argument("--ca", metavar="PEM", help="reach the edge and the cloud over TLS, trusting this CA")
    parser.add_argument("--cert", metavar="PEM", help="mutual TLS: this device's client certificate (needs --ca)")
    parser.add_argument("--key", metavar="PEM", help="the private key of --cert")
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help="send the bearer token this file holds to the edge and the cloud (needs --ca: never in plaintext)",
    )


def _read_inputs(source: Iterable[bytes], max_chars: int) -> Iterator[tuple[int, str | None, str | None, str | None]]:
    """(index, text, text_pair, error) per non-blank input line: text lines or JSON Lines, per line.

    A bad line (not UTF-8, not JSON or JSON too deep to read, no "text", a lone surrogate, empty or oversize
    text) gets its error and the rest goes on: one unreadable line never costs the others their answers.
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
                record = parse_json(line, f"line {number}")
            except InputError as exc:
                record, error = {}, str(exc)
            text, pair = record.get("text"), record.get("text_pair")
            if error is None and not isinstance(text, str):
                error = f'line {number}: a JSON line needs a "text" string'
            elif error is None and pair is not None and not isinstance(pair, str):
                error = f'line {number}: "text_pair" must be a string'
            for name, value in (("text", text), ("text_pair", pair)):
                problem = None if error is not None or value is None else text_problem(value)
                if problem:
                    error = f'line {number}: "{name}" {problem}'
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
    """``cartosplit run``: one JSON line per input; 1 when some inputs had errors."""
    from cartosplit.device_runtime.runtime import DeviceRuntime
    from cartosplit.protos.security import ClientSecurity  # imports grpc: not at module level (see above)

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
        low_memory=args.low_memory,
        advice=args.advice,
    )
    if args.format == "auto":
        print(f"cartosplit run: --format auto chose {runtime.fmt}: {runtime.format_reason}", file=sys.stderr)
    failed = total = 0
    with runtime:
        source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
        sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
        with source, sink:
            # one input at a time, written as it is answered: a long stream shows progress and loses nothing
            for index, text, pair, error in _read_inputs(source, args.max_chars):
                total += 1
                if error is None:
                    try:
                        row = runtime.predict([text], None if pair is None else [pair])[0].to_dict()
                    except ValueError as exc:  # the runtime refused this input: its line says why, the rest go on
                        error = str(exc)
                if error is not None:
                    failed += 1
                    row = {"error": error}
                sink.write(json.dumps({"index": index, **row}) + "\n")
                sink.flush()
    if failed:
        print(f"cartosplit run: {failed} of {total} inputs had errors (see their 'error' field)", file=sys.stderr)
        return 1
    return 0


# --- inspect ----------------------------------------------------------------------------------------------


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit inspect``."""
    parser.add_argument("bundle", help="bundle folder")


def cmd_inspect(args: argparse.Namespace) -> int:
    """``cartosplit inspect``: verify the bundle, print its manifest."""
    print(describe(load_bundle(args.bundle)))
    print("all files match their sha256")
    return 0


# --- serve-device -----------------------------------------------------------------------------------------


def add_serve_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit serve-device``."""
    parser.add_argument(
        "--config",
        required=True,
        metavar="TOML",
        help="the service's configuration file (e.g. /etc/cartosplit/device.toml; see deploy/pi/device.toml)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="read the config, verify the bundle and load the graphs, print the resolved settings, and exit",
    )
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))


def cmd_serve_device(args: argparse.Namespace) -> int:
    """``cartosplit serve-device``: serve until SIGTERM; with ``--check``, load everything once and exit."""
    logging.basicConfig(level=args.log_level.upper(), format="%(message)s", stream=sys.stderr)
    config = service.load_config(args.config)
    if args.check:
        runtime = service.build_runtime(config)
        runtime.close()
        summary = {**service.describe_config(config), "bundle_id": runtime.bundle.bundle_id, "format": runtime.fmt}
        summary["format_reason"] = runtime.format_reason
        print(json.dumps(summary))
        return 0
    return service.serve(config)
