"""The device of ``cartosplit bench e2e``: one process, run inside the device's network (namespace or loopback).

    python -m cartosplit.benchmarks.e2e_device --bundle B --mode cartosplit --edge HOST:PORT --cloud HOST:PORT \
        --input inputs.jsonl --output answers.jsonl --clients 8

Modes: ``cartosplit`` (the bundle's policy: device, edge or cloud per input), ``all-cloud`` (every input's
tokens straight to the cloud's full model) and ``all-device`` (the device exit answers everything; no network).

After a warm-up (``--warmup`` inputs per client, not recorded: graph initialisation and gRPC connections),
two passes over the same inputs, each input once per pass:
- ``sequential``: one client, one request at a time;
- ``concurrent``: ``--clients`` device clients (threads, each its own DeviceRuntime with its own graphs and
  gRPC channels), each one request at a time, input i going to client i mod N.
One JSON line per answer (``pass``, ``client``, ``index``, ``label_id``, ``tier``, ``route``, ``latency_ms``
as the caller sees it, tokenisation included, ``bytes_sent``, ``degraded``, ``errors``; or ``error``) and
one ``{"summary": true, "pass": ..., "wall_s": ..., "clients": ...}`` line per pass. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from collections.abc import Callable

MODES = ("cartosplit", "all-cloud", "all-device")


def make_predictor(
    mode: str, bundle: object, edge: str | None, cloud: str | None, fmt: str, threads: int, timeout_s: float
):
    """A DeviceRuntime and the call that answers one input in ``mode``."""
    from cartosplit.device_runtime.policy import Policy
    from cartosplit.device_runtime.runtime import DeviceRuntime

    if mode == "all-device":
        runtime = DeviceRuntime(bundle, fmt=fmt, threads=threads)
        runtime.policy = Policy(alpha_device=0.0)  # no router, every exit confidence clears 0: the device answers
    else:
        if cloud is None or (mode == "cartosplit" and edge is None):
            raise ValueError(f"mode {mode} needs --cloud" + (" and --edge" if mode == "cartosplit" else ""))
        runtime = DeviceRuntime(
            bundle,
            edge=edge if mode == "cartosplit" else None,
            cloud=cloud,
            fmt=fmt,
            threads=threads,
            timeout_s=timeout_s,
        )
    if mode == "all-cloud":
        return runtime, lambda text, pair: runtime.predict_all_cloud([text], None if pair is None else [pair])[0]
    return runtime, lambda text, pair: runtime.predict([text], None if pair is None else [pair])[0]


def answer_row(predict: Callable, text: str, pair: str | None) -> dict:
    began = time.perf_counter()
    try:
        p = predict(text, pair)
    except Exception as exc:  # recorded, never fatal: the benchmark counts what did not answer
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "latency_ms": 1000 * (time.perf_counter() - began)}
    return {
        "latency_ms": 1000 * (time.perf_counter() - began),
        "runtime_latency_ms": p.latency_ms,
        "label_id": p.label_id,
        "tier": p.tier,
        "route": p.route,
        "bytes_sent": p.bytes_sent,
        "degraded": p.degraded,
        "errors": p.errors,
    }


def run_pass(name: str, predictors: list[Callable], inputs: list[dict]) -> tuple[list[dict], float]:
    """Each client answers its share of the inputs one at a time; the rows and the pass's wall time."""
    rows: list[dict] = []
    lock = threading.Lock()
    start = threading.Barrier(len(predictors) + 1)

    def client(k: int) -> None:
        start.wait()
        for index in range(k, len(inputs), len(predictors)):
            row = {"pass": name, "client": k, "index": index, **answer_row(predictors[k], **inputs[index])}
            with lock:
                rows.append(row)

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(len(predictors))]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    return sorted(rows, key=lambda r: r["index"]), time.perf_counter() - began


def read_inputs(path: str) -> list[dict]:
    inputs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record.get("text"), str):
                raise ValueError(f"{path} line {number}: needs a 'text' string")
            inputs.append({"text": record["text"], "pair": record.get("text_pair")})
    if not inputs:
        raise ValueError(f"{path}: no inputs")
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cartosplit.benchmarks.e2e_device", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--edge", help="edge HOST:PORT as this process reaches it")
    parser.add_argument("--cloud", help="cloud HOST:PORT as this process reaches it")
    parser.add_argument("--format", default="onnx-int8", help="device graphs (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads per client (default: 1)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per remote call (default: 5)")
    parser.add_argument("--clients", type=int, default=8, help="clients of the concurrent pass; 1: none")
    parser.add_argument("--warmup", type=int, default=5, help="inputs each client answers before the passes")
    parser.add_argument("--input", required=True, help="JSONL with text (and text_pair)")
    parser.add_argument("--output", required=True, help="JSONL answers")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.warmup < 0 or args.threads < 1 or not math.isfinite(args.timeout):
        parser.error("--clients and --threads must be >= 1, --warmup >= 0, --timeout finite")

    from cartosplit.device_runtime.bundle import load_bundle

    inputs = read_inputs(args.input)
    bundle = load_bundle(args.bundle)  # verified once, shared by every client
    made = [
        make_predictor(args.mode, bundle, args.edge, args.cloud, args.format, args.threads, args.timeout)
        for _ in range(args.clients)
    ]
    predictors = [predict for _, predict in made]
    try:
        for predict in predictors:  # graphs initialised, connections open
            for item in inputs[: args.warmup]:
                answer_row(predict, **item)
        passes = [("sequential", predictors[:1])] + ([("concurrent", predictors)] if args.clients > 1 else [])
        with open(args.output, "w", encoding="utf-8") as out:
            for name, clients in passes:
                rows, wall_s = run_pass(name, clients, inputs)
                for row in rows:
                    out.write(json.dumps(row) + "\n")
                out.write(json.dumps({"summary": True, "pass": name, "wall_s": wall_s, "clients": len(clients)}) + "\n")
                print(f"{args.mode} {name}: {len(rows)} answers in {wall_s:.1f} s", file=sys.stderr, flush=True)
    finally:
        for runtime, _ in made:
            runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
