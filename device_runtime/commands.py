"""The device commands of ``cartosplit``: run, inspect, serve-device. No torch.

Each command is ``add_<name>_arguments(parser)`` and ``cmd_<name>(args) -> int``; ``cartosplit.cli``
imports this module only for these commands. Module-level imports need numpy alone, so ``inspect`` works on
the base install; grpc (the ``device`` extra) is imported by the commands that reach a server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time

from cartosplit.cli_args import positive_int
from cartosplit.device_runtime import service
from cartosplit.device_runtime.bundle import describe, load_bundle
from cartosplit.device_runtime.input_formats import (
    INPUT_FORMATS,
    InputRow,
    ReadOptions,
    count_inputs,
    read_inputs,
    read_label_file,
    resolve_format,
)
from cartosplit.device_runtime.inputs import trained_on_pairs
from cartosplit.device_runtime.scoring import Bootstrap, ScoreBook, summarise
from cartosplit.device_runtime.scoring import describe as describe_summary

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
    parser.add_argument("--input", default="-", help="text, JSONL, CSV or TSV file (default: stdin)")
    parser.add_argument(
        "--input-format",
        choices=INPUT_FORMATS,
        default="auto",
        help="auto: .csv/.tsv files are tables, any other input is read per line (a line starting with '{' is "
        "JSON, any other a text); text: every line a text; jsonl: every line JSON with keys text, text_pair, "
        "label, id; csv/tsv: a header row naming the columns: text (or sentence, sentence1, question, ...), "
        "text_pair (or sentence2, ...), label, id (default: %(default)s)",
    )
    parser.add_argument(
        "--labels",
        metavar="FILE",
        help="text lines: one label (a name or an id) per non-blank line, for each input in order; "
        "the run then scores its answers (JSON lines and tables give a label field or column instead)",
    )
    parser.add_argument(
        "--summary",
        metavar="FILE",
        help="write the summary as JSON: accuracy and the task's metric with bootstrap intervals, the share "
        "each tier answered, the all-cloud comparison",
    )
    parser.add_argument(
        "--compare-all-cloud",
        action="store_true",
        help="also send every answered input to the cloud's full model (needs --cloud): all-cloud's accuracy "
        "and metric, its agreement with the kit, and the paired difference",
    )
    parser.add_argument(
        "--resamples",
        type=positive_int,
        default=1000,
        help="bootstrap resamples of the intervals (default: %(default)s)",
    )
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
    audit = parser.add_argument_group(
        "audits",
        "re-send a random share of the answers to the full model (through the edge) and keep a live bound on the "
        "disagreement with it; an alarm tightens the thresholds at once",
    )
    audit.add_argument(
        "--audit-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of auditing an answer (needs --edge); default 0, off: a batch run is short, drift shows "
        "over a long-running serve-device (which audits 2 %% by default)",
    )
    audit.add_argument(
        "--audit-epsilon",
        type=float,
        default=0.5,
        metavar="PT",
        help="the promise audits test: disagreement with the full model <= this many points (default: %(default)s)",
    )
    audit.add_argument(
        "--audit-alpha",
        type=float,
        default=0.05,
        metavar="A",
        help="level of the live bound and the alarm (default: %(default)s)",
    )
    audit.add_argument(
        "--audit-state",
        metavar="FILE",
        help="resume the audit monitor from this file and keep its state there (written atomically)",
    )
    audit.add_argument(
        "--audit-adaptive",
        action="store_true",
        help="audit more while the bound is loose, less once it holds, around --audit-rate",
    )


def _check_audit_options(args: argparse.Namespace) -> None:
    """The audit flags' usage errors, in the flags' own names (AuditSettings would name its fields)."""
    if not 0.0 <= args.audit_rate <= 1.0:
        raise ValueError(f"--audit-rate must be a probability in [0, 1] (0.02 = 2 %), got {args.audit_rate}")
    if not 0.0 < args.audit_epsilon < 100.0:
        raise ValueError(f"--audit-epsilon is in points, in (0, 100) (0.5 = half a point), got {args.audit_epsilon}")
    if not 0.0 < args.audit_alpha < 1.0:
        raise ValueError(f"--audit-alpha must be in (0, 1), got {args.audit_alpha}")
    if args.audit_rate == 0.0:
        for flag, given in (("--audit-state", args.audit_state), ("--audit-adaptive", args.audit_adaptive)):
            if given:
                raise ValueError(f"{flag} needs --audit-rate > 0 (audits are off by default in a run)")
    elif not args.edge:
        raise ValueError(
            "--audit-rate needs --edge: an audit re-sends the device's hidden state to the edge, which forwards "
            "it to the cloud's full model"
        )


def _audit_settings(args: argparse.Namespace):
    """The runtime's AuditSettings, or None when audits are off."""
    from cartosplit.device_runtime.audit import AuditSettings

    return AuditSettings.from_points(args.audit_rate, args.audit_epsilon, args.audit_alpha, args.audit_adaptive)


def _check_run_options(args: argparse.Namespace, fmt: str) -> None:
    """Usage errors (exit 2), found before the bundle is loaded or any input read."""
    if args.compare_all_cloud and not args.cloud:
        raise ValueError("--compare-all-cloud needs --cloud: all-cloud sends every input's tokens to the cloud")
    if args.labels and fmt not in ("auto", "text"):
        where = 'its "label" field' if fmt == "jsonl" else "its label column"
        raise ValueError(f"--labels FILE is for text lines; a {fmt} input gives each input's label in {where}")
    _check_audit_options(args)


def _check_label_count(labels: tuple[str, ...], path: str, labels_path: str) -> None:
    """--labels must hold one label per input: a shifted file would score every answer against the wrong label."""
    with open(path, "rb") as source:
        n = count_inputs(source)
    if n != len(labels):
        raise ValueError(
            f"--labels {labels_path} holds {len(labels)} labels but {path} holds {n} inputs (non-blank lines); "
            "give one label per input, in the same order"
        )


def _answer(runtime, row: InputRow, book: ScoreBook, compare: bool) -> dict:
    """One input's output line: the kit's answer (or the error), the label given, all-cloud's answer."""
    out: dict = {"index": row.index}
    if row.id is not None:
        out["id"] = row.id
    error, prediction = row.error, None
    if error is None:
        try:
            prediction = runtime.predict([row.text], None if row.pair is None else [row.pair])[0]
        except ValueError as exc:  # the runtime refused this input: its line says why, the rest go on
            error = str(exc)
    if prediction is None:
        out["error"] = error
        return out
    out.update(prediction.to_dict())
    if row.label is not None:
        out["label_given"] = runtime.labels[row.label]
    cloud_id = None
    if compare:
        try:
            cloud = runtime.predict_all_cloud([row.text], None if row.pair is None else [row.pair])[0]
            cloud_id, out["all_cloud_label"] = cloud.label_id, cloud.label
        except ConnectionError as exc:  # the kit's answer stands; only the comparison misses this input
            out["all_cloud_error"] = str(exc)
            book.all_cloud_failed += 1
    book.add(row.label, prediction.label_id, prediction.tier, cloud_id)
    return out


def _drain_audits(runtime, stall_s: float) -> None:
    """Let the audit worker finish the queued audits before the runtime closes: ``close`` drops what is still
    queued (right for a service that stops), but a batch run asked for these audits. Waits as long as the queue
    shrinks; one that stalls for ``stall_s`` (a frozen tier: each audit costs at most one timeout) is left."""
    summary = runtime.audit_summary()
    if summary is None:
        return
    pending, progress = summary["pending"], time.monotonic()
    while pending and time.monotonic() - progress < stall_s:
        time.sleep(0.05)
        now = runtime.audit_summary()["pending"]
        if now < pending:
            progress = time.monotonic()
        pending = now


def _describe_audit(audit: dict, all_cloud_cost: float, events: list[dict]) -> list[str]:
    """Two lines on the audits: what was audited and what it cost, then the live bound against the promise
    (``events``: the monitor's, all of them)."""
    c, overall = audit["counters"], audit["sequences"]["all"]
    dropped = ", ".join(f"{reason} {n}" for reason, n in sorted(c["dropped"].items())) or "none"
    cost = ""
    if c["answers"] and all_cloud_cost > 0:
        cost = f"; their cost {100 * c['cost'] / (c['answers'] * all_cloud_cost):.2f} % of all-cloud's"
    first = (
        f"audit: {c['recorded']} of {c['answers']} answers audited (sent {c['sent']}, free {c['free']}, "
        f"dropped: {dropped}){cost}"
    )
    last_index = audit["path_length"] - 1
    moves = [e["event"] for e in events if e["event"] in ("alarm", "recalibrated")]
    verdict = "holds" if overall["holds"] else "not certified yet"
    if moves or audit["path_index"] < last_index:
        # a move starts a new sequence at once: the verdict is of the traffic since the thresholds moved
        phrases = {"alarm": "ALARM: thresholds moved to", "recalibrated": "ALARM, then recalibrated: thresholds at"}
        moved = phrases[moves[-1]] if moves else "thresholds at"  # none: resumed below the shipped policy
        verdict = f"{moved} path index {audit['path_index']} of {last_index} (0: no early exit); since: {verdict}"
    bound = overall["upper_bound"]
    second = (
        f"audit: disagreement with the full model {overall['disagreements']}/{overall['audits']}, upper bound "
        f"{100 * bound:.2f} pt at alpha {audit['alpha']:g} (promise {100 * audit['epsilon']:g} pt: {verdict})"
    )
    return [first, second]


def _audit_report(runtime) -> dict | None:
    """The audit part of the summary (None: audits off), after its lines and events on stderr."""
    audit = runtime.audit_summary()
    if audit is None:
        return None
    audit["resume_note"] = runtime.audit_resume_note
    if runtime.audit_resume_note:
        print(f"cartosplit run: audit state: {runtime.audit_resume_note}", file=sys.stderr)
    for event in runtime.monitor.events:  # the full list: the summary keeps only the last 10
        if event["event"] != "start":
            details = {k: v for k, v in event.items() if k != "event"}
            print(f"cartosplit run: audit {event['event']}: {json.dumps(details)}", file=sys.stderr)
    for line in _describe_audit(audit, runtime.all_cloud_cost, runtime.monitor.events):
        print(f"cartosplit run: {line}", file=sys.stderr)
    return audit


def _report(book: ScoreBook, runtime, args: argparse.Namespace, total: int, failed: int) -> None:
    """The summary on stderr (when there is something to score, and the audits' when on) and in --summary FILE."""
    model = runtime.bundle.manifest.model
    summary = {"inputs": total, "errors": failed}
    summary.update(summarise(book, model.task, runtime.labels, Bootstrap(resamples=args.resamples)))
    if book.labelled or args.compare_all_cloud:
        for line in describe_summary(summary):
            print(f"cartosplit run: {line}", file=sys.stderr)
    audit = _audit_report(runtime)
    if audit is not None:
        summary["audit"] = audit
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")


def cmd_run(args: argparse.Namespace) -> int:
    """``cartosplit run``: one JSON line per input; 1 when some inputs had errors, 2 for usage errors."""
    from cartosplit.device_runtime.runtime import DeviceRuntime
    from cartosplit.protos.security import ClientSecurity  # imports grpc: not at module level (see above)

    fmt = resolve_format(args.input_format, args.input)
    _check_run_options(args, fmt)
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
        audit=_audit_settings(args),
        audit_state=args.audit_state,
    )
    if args.format == "auto":
        print(f"cartosplit run: --format auto chose {runtime.fmt}: {runtime.format_reason}", file=sys.stderr)
    book = ScoreBook()
    failed = total = 0
    with runtime:
        given = read_label_file(args.labels) if args.labels else None
        if given is not None and args.input != "-":
            _check_label_count(given, args.input, args.labels)
        options = ReadOptions(
            fmt=fmt,
            max_chars=args.max_chars,
            labels=tuple(runtime.labels),
            text_pairs=trained_on_pairs(runtime),
            given_labels=given,
            name="stdin" if args.input == "-" else args.input,
        )
        source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")  # noqa: SIM115
        with source:
            rows = read_inputs(source, options)  # a bad header is refused here, before the output is opened
            sink = sys.stdout if args.output == "-" else open(args.output, "w", encoding="utf-8")  # noqa: SIM115
            with sink:
                # one input at a time, written as it is answered: a long stream shows progress and loses nothing
                for row in rows:
                    out = _answer(runtime, row, book, args.compare_all_cloud)
                    total += 1
                    failed += "error" in out
                    sink.write(json.dumps(out) + "\n")
                    sink.flush()
        if given is not None and len(given) != total:  # stdin: only countable at its end
            print(
                f"cartosplit run: error: --labels {args.labels} holds {len(given)} labels for {total} inputs; "
                "no summary (one label per input, in order)",
                file=sys.stderr,
            )
            return 2
        _drain_audits(runtime, stall_s=args.timeout + 1.0)
    _report(book, runtime, args, total, failed)  # after close: every audit recorded, the state saved
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
        # no audit state: a check must not write the file a running service owns (one writer per file)
        runtime = service.build_runtime(dataclasses.replace(config, audit_state=None))
        runtime.close()
        summary = {**service.describe_config(config), "bundle_id": runtime.bundle.bundle_id, "format": runtime.fmt}
        summary["format_reason"] = runtime.format_reason
        print(json.dumps(summary))
        return 0
    return service.serve(config)
