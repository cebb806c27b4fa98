"""Cloud tier scale-out: the same requests through the plain server and the Ray backend (1 and 2 replicas).

    cartosplit bench cloud-scale --bundle bundles/sst2-4k-all --tiny bundles/tiny-random \
        --out benchmarks/results/cloud-scale

For every bundle, every server configuration (``--configs``) runs as a real ``cartosplit serve-cloud``
subprocess on loopback; the Ray ones start their own local Ray. Each configuration gets the same requests
at every entry (``tokens``: depth 0, the ``full`` graph, all L layers; ``hidden``: depth e, ``cloud_from_e``,
the last L - e layers, an fp16 hidden state as the edge sends it) and every concurrency level (closed loop:
each of N clients sends its next request when its answer came). Reported per point: p50/p99 latency,
throughput, errors, and how far the answers are from the plain server's (max |probability difference|, label
agreement, sample by sample). Per configuration: the idle memory of the front and of every process it
started (Ray's: summed RSS and PSS). Per slice: the graph alone in onnxruntime on one thread at batch
1/8/32, the compute ceiling of one replica per core.

Requests are tokenised SST-2 dev sentences (GLUE at ``--data-dir``) or, without the data, random token
ids of SST-2-like lengths. ``--tiny DIR`` adds a tiny random BERT bundle (the test suite's: 4 layers x 32),
built into DIR when it is missing (needs the export extra): a slice so small that the front's own cost
dominates. Everything shares this machine's cores with the client and, for Ray, with Ray's own processes:
read the numbers as what one small machine shows, not as a cluster's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.report import bench_command, bench_parser, write_report
from cartosplit.cli_args import comma_list
from cartosplit.serving.process import ServerProcess

DEFAULT_CONFIGS = ("plain-t1", "plain-t2", "ray-r1", "ray-r2")
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------- inputs


def sst2_sentences(data_dir: str | None) -> list[str] | None:
    path = Path(data_dir or "/work/shared/data/glue") / "SST-2" / "dev.tsv"
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines()[1:]
    return [line.split("\t")[0].strip() for line in lines if line.strip()]


@dataclass
class RequestSet:
    """Serialized requests (without request ids) for one bundle and entry; sample i is the same everywhere."""

    entry: str
    depth: int
    graph: str
    payloads: list[bytes]
    arrays: list[tuple[np.ndarray, ...]]  # what the graph gets per sample (for the compute-only measurement)
    lengths: list[int]


def build_requests(bundle, entry: str, sentences: list[str] | None, pool: int, seed: int = 0) -> RequestSet:
    from cartosplit.device_runtime.manifest import cloud_graph
    from cartosplit.device_runtime.onnx_backend import OnnxSession
    from cartosplit.device_runtime.text import encode, load_tokenizer
    from cartosplit.protos import tiers_pb2 as pb
    from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor

    model, split = bundle.manifest.model, bundle.split_points
    max_length, vocab = model.max_length, model.vocab_size
    if vocab is None:  # the servers refuse such a bundle too (serving.servicer)
        raise ValueError("the bundle's manifest has no model.vocab_size: re-export it with `cartosplit export`")
    rng = np.random.default_rng(seed)
    if sentences is not None:
        tokenizer = load_tokenizer(bundle.path("tokenizer.json"), max_length)
        encoded = encode(tokenizer, sentences[:pool])
        tokens = [(np.array(ids, dtype=np.int64), np.array(types, dtype=np.int64)) for ids, types in encoded]
    else:  # SST-2 dev is 4 to 60 tokens long, most around 20-30
        lengths = np.clip(rng.normal(25, 10, size=pool).astype(int), 4, max_length)
        tokens = [
            (np.concatenate([[2], rng.integers(5, vocab, size=n - 2), [3]]).astype(np.int64), np.zeros(n, np.int64))
            for n in lengths
        ]
    envelope = {"bundle_id": bundle.bundle_id, "protocol_version": PROTOCOL_VERSION}
    if entry == "tokens":
        payloads = []
        for ids, types in tokens:
            msg = pb.InferRequest(depth=0, **envelope)
            msg.input_ids.CopyFrom(encode_tensor(ids, pb.INT64))
            msg.token_type_ids.CopyFrom(encode_tensor(types, pb.INT64))
            payloads.append(msg.SerializeToString())
        return RequestSet(entry, 0, "full", payloads, tokens, [len(ids) for ids, _ in tokens])
    if entry != "hidden":
        raise ValueError(f"entry must be tokens or hidden, got {entry!r}")
    # the hidden state the edge would send: device head, device tail and edge run here, fp32, one by one
    sessions = {g: OnnxSession(bundle.graph_file(g, "onnx-fp32"), 1) for g in ("device_head", "device_tail", "edge")}
    payloads, arrays = [], []
    for ids, types in tokens:
        mask = np.ones((1, len(ids)), dtype=np.int64)
        _, state = sessions["device_head"].run([ids[None], mask, types[None]])
        state, _ = sessions["device_tail"].run([state, mask])
        state, _ = sessions["edge"].run([state, mask])
        hidden = state[0].astype(np.float16)  # fp16 on the wire, the edge's default
        msg = pb.InferRequest(depth=split.edge, **envelope)
        msg.hidden.CopyFrom(encode_tensor(hidden.astype(np.float32), pb.FP16))
        payloads.append(msg.SerializeToString())
        arrays.append((hidden.astype(np.float32),))
    return RequestSet(entry, split.edge, cloud_graph(split.edge), payloads, arrays, [len(a[0]) for a in arrays])


def make_tiny_bundle(folder: Path) -> Path:
    """The test suite's tiny random BERT (4 layers x 32), trained for seconds and exported as ONNX."""
    if (folder / "manifest.json").is_file():
        return folder
    import shutil
    import tempfile

    from cartosplit.export.bundle_writer import ExportConfig, export_bundle
    from cartosplit.export.calibrate import CalibrateConfig, calibrate
    from cartosplit.export.router import RouterConfig
    from cartosplit.export.tiny import make_tiny_bert, synthetic_rows, tiny_train_config, write_csv
    from cartosplit.export.train import train

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = make_tiny_bert(root / "model")
        files = (
            write_csv(root / "train.csv", synthetic_rows(600, 1)),
            write_csv(root / "dev.csv", synthetic_rows(200, 2)),
        )
        run = root / "run"
        train(tiny_train_config(run, model, files), log=lambda *_: None)
        # the tiny run's calibration split is far too small to certify anything: the plain search
        tiny = CalibrateConfig(run=str(run), router=RouterConfig(kind="logreg", depth=1), guarantee="none")
        calibrate(tiny, log=lambda *_: None)
        out = root / "bundle"
        export_bundle(ExportConfig(run=str(run), out=str(out), formats=("onnx-fp32", "onnx-int8")), log=lambda *_: None)
        shutil.copytree(out, folder)
    return folder


# ---------------------------------------------------------------------------------------------------- servers


def config_args(name: str, fmt: str, workdir: Path, local_cpus: int) -> list[str]:
    """serve-cloud options of a configuration: plain-tN (N onnxruntime threads) or ray-rN (N replicas)."""
    kind, _, count = name.partition("-")
    number = int(count[1:]) if count[1:].isdigit() else 0
    if kind == "plain" and count.startswith("t") and number >= 1:
        return ["--format", fmt, "--threads", str(number)]
    if kind == "ray" and count.startswith("r") and number >= 1:
        settings = {
            "num_replicas": number,
            "num_cpus": max(local_cpus / number, 0.5) if number > local_cpus else 1,
            "intra_op_threads": 1,
            "local_num_cpus": max(local_cpus, number),
            "max_batch_size": 32,
            "batch_wait_timeout_s": 0.002,
        }
        path = workdir / f"{name}.json"
        path.write_text(json.dumps(settings))
        return ["--format", fmt, "--backend", "ray", "--ray-config", str(path)]
    raise ValueError(f"configuration {name!r}: use plain-tN (threads) or ray-rN (replicas)")


# ----------------------------------------------------------------------------------------------- memory


def _proc_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found.extend(sorted(frontier))
    return found


def _memory_kib(pid: int) -> tuple[int, int] | None:
    """(RSS, PSS) in KiB from smaps_rollup (PSS shares shared pages out fairly: Ray's object store among them)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    values = dict(re.findall(r"^(Rss|Pss):\s+(\d+) kB", text, flags=re.M))
    return int(values.get("Rss", 0)), int(values.get("Pss", 0))


def _name(pid: int) -> str:
    """The program: argv[0], or for ``python [-u] script.py`` the script (Ray runs several of those)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    program = argv[0].rsplit("/", 1)[-1]
    if program.startswith("python"):
        script = next((a for a in argv[1:] if a.endswith(".py")), None)
        program = script.rsplit("/", 1)[-1] if script else program
    return program[:40]


def idle_memory(server_pid: int) -> dict:
    """The front's RSS/PSS, and the summed RSS/PSS of every process it started (a local Ray: all of Ray)."""
    front = _memory_kib(server_pid) or (0, 0)
    children = [(pid, _memory_kib(pid)) for pid in _proc_tree(server_pid)]
    children = [(pid, mem) for pid, mem in children if mem is not None]
    by_name: dict[str, float] = {}
    for pid, (rss, _) in children:
        by_name[_name(pid)] = by_name.get(_name(pid), 0.0) + rss / 1024
    return {
        "front_rss_mib": round(front[0] / 1024, 1),
        "front_pss_mib": round(front[1] / 1024, 1),
        "children": len(children),
        "children_rss_mib": round(sum(m[0] for _, m in children) / 1024, 1),
        "children_pss_mib": round(sum(m[1] for _, m in children) / 1024, 1),
        "children_rss_by_name_mib": {k: round(v, 1) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])},
    }


# ------------------------------------------------------------------------------------------------- load


class ClosedLoop:
    """N clients, each with one request out at a time; gRPC futures, so the client costs little CPU."""

    def __init__(self, address: str, requests: RequestSet, clients: int, tag: str) -> None:
        import grpc

        from cartosplit.cloud_server.server import SERVICE_NAME
        from cartosplit.protos import tiers_pb2 as pb

        self.requests, self.clients, self.tag = requests, clients, tag
        channels = [grpc.insecure_channel(address) for _ in range(min(clients, 8))]
        # requests go out as bytes: the stored payload plus a unique request id (serialized protobuf fields
        # concatenate), so the server's reply cache never answers a repeat and the client copies nothing
        self.calls = [
            c.unary_unary(
                f"/{SERVICE_NAME}/Infer", request_serializer=None, response_deserializer=pb.InferReply.FromString
            )
            for c in channels
        ]
        self.channels = channels
        self._id_field = pb.InferRequest
        self._lock = threading.Lock()
        self._counter = 0
        self._stop = False
        self._outstanding = 0
        self._drained = threading.Event()
        self.records: list[tuple[float, float, int, bool, int, tuple[float, ...] | str]] = []

    def _send(self, slot: int) -> None:
        with self._lock:
            number = self._counter
            self._counter += 1
        sample = number % len(self.requests.payloads)
        payload = self.requests.payloads[sample] + self._id_field(request_id=f"{self.tag}-{number}").SerializeToString()
        started = time.perf_counter()
        future = self.calls[slot % len(self.calls)].future(payload, timeout=60)
        future.add_done_callback(lambda f: self._done(f, slot, sample, started))

    def _done(self, future, slot: int, sample: int, started: float) -> None:
        finished = time.perf_counter()
        try:
            reply = future.result()
            record = (started, finished, sample, True, reply.label, tuple(reply.probabilities))
        except Exception as exc:
            code = getattr(exc, "code", lambda: None)()
            record = (started, finished, sample, False, -1, str(getattr(code, "name", type(exc).__name__)))
        with self._lock:
            self.records.append(record)
            stop = self._stop
        if not stop:
            self._send(slot)
            return
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._drained.set()

    def run(self, seconds: float, warmup_s: float) -> dict:
        self._outstanding = self.clients
        begin = time.perf_counter()
        for slot in range(self.clients):
            self._send(slot)
        time.sleep(warmup_s + seconds)
        with self._lock:
            self._stop = True
        self._drained.wait(120)
        window = (begin + warmup_s, begin + warmup_s + seconds)
        measured = [r for r in self.records if window[0] <= r[1] <= window[1]]
        for channel in self.channels:
            channel.close()
        ok = [r for r in measured if r[3]]
        latency = np.array([(r[1] - r[0]) * 1000.0 for r in ok]) if ok else np.array([np.nan])
        return {
            "answers": len(ok),
            "errors": len(measured) - len(ok),
            "error_codes": sorted({r[5] for r in measured if not r[3]}),
            "seconds": seconds,
            "throughput_rps": round(len(ok) / seconds, 1),
            "p50_ms": round(float(np.percentile(latency, 50)), 2),
            "p99_ms": round(float(np.percentile(latency, 99)), 2),
            "mean_ms": round(float(np.mean(latency)), 2),
        }

    def answers(self) -> dict[int, tuple[int, tuple[float, ...]]]:
        """One answer per sample (the first one received)."""
        out: dict[int, tuple[int, tuple[float, ...]]] = {}
        for record in self.records:
            if record[3] and record[2] not in out:
                out[record[2]] = (record[4], record[5])
        return out


def compare(answers: dict, reference: dict) -> dict:
    shared = sorted(set(answers) & set(reference))
    if not shared:
        return {"compared": 0, "max_abs_prob_diff": None, "label_agreement": None}
    diff = max(float(np.max(np.abs(np.subtract(answers[i][1], reference[i][1])))) for i in shared)
    agree = sum(answers[i][0] == reference[i][0] for i in shared) / len(shared)
    return {"compared": len(shared), "max_abs_prob_diff": diff, "label_agreement": round(agree, 4)}


# ------------------------------------------------------------------------------------- compute alone


def slice_compute(bundle, requests: RequestSet, fmt: str, batches: Sequence[int], seconds: float) -> list[dict]:
    """The graph alone in onnxruntime (1 thread): batches of consecutive samples padded to their longest."""
    from cartosplit.device_runtime.onnx_backend import OnnxSession

    session = OnnxSession(bundle.graph_file(requests.graph, fmt), 1)
    rows = []
    for size in batches:
        runs, samples, started, index = 0, 0, time.perf_counter(), 0
        while time.perf_counter() - started < seconds or runs < 3:
            chunk = [requests.arrays[(index + k) % len(requests.arrays)] for k in range(size)]
            index += size
            longest = max(len(c[0]) for c in chunk)
            mask = np.zeros((size, longest), dtype=np.int64)
            for row, c in enumerate(chunk):
                mask[row, : len(c[0])] = 1
            if requests.entry == "tokens":
                ids = np.zeros((size, longest), dtype=np.int64)
                for row, (i, _) in enumerate(chunk):
                    ids[row, : len(i)] = i
                session.run([ids, mask, np.zeros_like(ids)])
            else:
                hidden = np.zeros((size, longest, chunk[0][0].shape[1]), dtype=np.float32)
                for row, (h,) in enumerate(chunk):
                    hidden[row, : len(h)] = h
                session.run([hidden, mask])
            runs += 1
            samples += size
        elapsed = time.perf_counter() - started
        rows.append(
            {
                "batch": size,
                "ms_per_batch": round(elapsed * 1000 / runs, 3),
                "samples_per_s": round(samples / elapsed, 1),
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------- report


def slice_name(bundle, entry: str, graph: str) -> str:
    model = bundle.manifest.model
    split = bundle.split_points
    layers = split.total if entry == "tokens" else split.total - split.edge
    # a hub id names the model; a local path (the tiny test model) does not, so name the bundle instead
    short = Path(model.id).name if not Path(model.id).is_absolute() else Path(bundle.folder).name
    return f"{short} {graph} ({layers} layers x {model.hidden_size})"


def markdown(report: dict) -> list[str]:
    lines = [
        "# Cloud tier scale-out: plain server vs Ray Serve backend",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}  ",
        f"Load average (1 min) before {report['load_before']:.2f}, after {report['load_after']:.2f}. " + report["note"],
        "",
        f"Requests: {report['inputs']}; server format {report['format']}; front batching max {report['max_batch']}"
        f" / {report['max_wait_ms']} ms; {report['seconds']} s measured per point after {report['warmup_s']} s "
        "warm-up; closed loop (each client sends its next request when its answer came).",
        "",
        "Configurations: `plain-tN` = the grpcio server with onnxruntime in process, N intra-op threads per graph;"
        " `ray-rN` = the same front with `--backend ray`, a local Ray started by the server, N replicas of 1 CPU"
        " with 1 onnxruntime thread each.",
        "",
        "## Latency, throughput, answers",
        "",
        "Answers are compared sample by sample with the first configuration at 1 client.",
        "",
        "| slice | config | clients | p50 ms | p99 ms | answers/s | errors | max abs prob diff | labels agree |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for point in report["points"]:
        c = point["answers_vs_reference"]
        diff = "-" if c["max_abs_prob_diff"] is None else f"{c['max_abs_prob_diff']:.1e}"
        agree = "-" if c["label_agreement"] is None else f"{100 * c['label_agreement']:.1f} %"
        lines.append(
            f"| {point['slice']} | {point['config']} | {point['clients']} | {point['p50_ms']} | {point['p99_ms']} | "
            f"{point['throughput_rps']} | {point['errors']} | {diff} | {agree} |"
        )
    lines += ["", "## What Ray adds (derived from the table)", ""]
    lines += ["| slice | p50 at 1 client: ray-r1 − plain-t1 (ms) | best answers/s plain | best ray-r1 | best ray-r2 |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for row in report["derived"]:
        lines.append(
            f"| {row['slice']} | {row['ray_added_p50_ms_at_1_client']} | {row['best_plain_rps']} | "
            f"{row['best_ray_r1_rps']} | {row['best_ray_r2_rps']} |"
        )
    est = report.get("scaling_estimate") or {}
    if est:
        lines += [
            "",
            "## Where the bottleneck sits (estimated from the rates above)",
            "",
            f"A front's ceiling, measured as the best throughput on the smallest slice ({est['front_slice']}), "
            f"where the model costs least: plain {est['front_plain_rps']} answers/s, Ray-backed "
            f"{est['front_ray_rps']} answers/s (a lower bound: the load generator shares the cores). One replica's "
            "rate: the slice alone on one thread, its best over the batch sizes measured. Their ratio is how many "
            "1-CPU replicas one front can keep busy; below 1 the front, not the model, limits the tier.",
            "",
            "| slice | one replica, samples/s | replicas one Ray-backed front feeds | plain-front equivalent |",
            "|---|---:|---:|---:|",
        ]
        for row in est["slices"]:
            lines.append(
                f"| {row['slice']} | {row['replica_samples_per_s']} | {row['replicas_one_ray_front_feeds']} | "
                f"{row['replicas_one_plain_front_feeds']} |"
            )
    lines += [
        "",
        "## Idle memory after warm-up",
        "",
        "`children` = every process the server started: for `ray-*` that is all of the local Ray (GCS, raylet, "
        "dashboard agents, Serve controller, replicas). PSS splits shared pages among the processes that map them.",
        "",
        "| bundle | config | front RSS MiB | children | children RSS MiB | children PSS MiB | largest (RSS MiB) |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in report["memory"]:
        m = row["memory"]
        top = ", ".join(f"{k} {v}" for k, v in list(m["children_rss_by_name_mib"].items())[:4]) or "-"
        lines.append(
            f"| {row['bundle']} | {row['config']} | {m['front_rss_mib']} | {m['children']} | {m['children_rss_mib']} "
            f"| {m['children_pss_mib']} | {top} |"
        )
    lines += [
        "",
        "## The slice alone (onnxruntime, 1 thread, no server)",
        "",
        "One replica's compute ceiling per CPU; batches of consecutive requests padded to their longest.",
        "",
        "| slice | batch | ms per batch | samples/s |",
        "|---|---:|---:|---:|",
    ]
    for row in report["compute"]:
        for b in row["batches"]:
            lines.append(f"| {row['slice']} | {b['batch']} | {b['ms_per_batch']} | {b['samples_per_s']} |")
    lines += ["", "Startup and shutdown (s): " + ", ".join(f"{k} {v}" for k, v in report["lifecycle_s"].items()), ""]
    for failure in report.get("failures", []):
        reason = failure["error"].splitlines()[-1]
        lines += [f"**{failure['bundle']} / {failure['config']} did not start**: `{reason}`", ""]
    return lines


def slice_cost(label: str) -> int:
    """layers x hidden, parsed back from a slice label: to find the smallest (front-bound) slice."""
    match = re.search(r"\((\d+) layers x (\d+)\)", label)
    return int(match.group(1)) * int(match.group(2)) if match else 0


def scaling_estimate(points: list[dict], compute: list[dict]) -> dict:
    """Where the bottleneck sits, from measured rates: a front's ceiling vs one replica's compute.

    Front ceiling: the best throughput on the smallest slice measured, where the model costs least and the
    front's own work (gRPC, decode, checks, batching, for Ray also the handle call) dominates; the client shares
    the cores, so it is a lower bound. Replica rate: the slice alone on one thread, best over the batch sizes.
    """
    if not points:
        return {}
    smallest = min({p["slice"] for p in points}, key=slice_cost)

    def best(prefix: str) -> float | None:
        values = [p["throughput_rps"] for p in points if p["slice"] == smallest and p["config"].startswith(prefix)]
        return max(values) if values else None

    front_plain, front_ray = best("plain"), best("ray")
    rows = []
    for row in compute:
        replica = max(b["samples_per_s"] for b in row["batches"])
        rows.append(
            {
                "slice": row["slice"],
                "replica_samples_per_s": replica,
                "replicas_one_ray_front_feeds": None if front_ray is None else round(front_ray / replica, 2),
                "replicas_one_plain_front_feeds": None if front_plain is None else round(front_plain / replica, 2),
            }
        )
    return {"front_slice": smallest, "front_plain_rps": front_plain, "front_ray_rps": front_ray, "slices": rows}


def derive(points: list[dict]) -> list[dict]:
    out = []
    for slice_label in dict.fromkeys(p["slice"] for p in points):
        mine = [p for p in points if p["slice"] == slice_label]

        def best(prefix: str, rows: list[dict] = mine) -> float | None:
            values = [p["throughput_rps"] for p in rows if p["config"].startswith(prefix)]
            return max(values) if values else None

        def p50(config: str, rows: list[dict] = mine) -> float | None:
            values = [p["p50_ms"] for p in rows if p["config"] == config and p["clients"] == 1]
            return values[0] if values else None

        added = None
        if p50("ray-r1") is not None and p50("plain-t1") is not None:
            added = round(p50("ray-r1") - p50("plain-t1"), 2)
        out.append(
            {
                "slice": slice_label,
                "ray_added_p50_ms_at_1_client": added,
                "best_plain_rps": best("plain"),
                "best_ray_r1_rps": best("ray-r1"),
                "best_ray_r2_rps": best("ray-r2"),
            }
        )
    return out


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = bench_parser(
        "cloud-scale",
        "The same requests through the plain cloud server and the Ray Serve backend (1 and 2 replicas):\n"
        "p50/p99 latency, throughput, answers compared, idle memory of Ray's processes, and the slice's\n"
        "own compute rate. Needs the ray extra.",
    )
    parser.add_argument("--bundle", action="append", default=[], help="a bundle folder (repeat for more)")
    parser.add_argument("--tiny", metavar="DIR", help="also a tiny random bundle, built into DIR if missing")
    parser.add_argument(
        "--entries", type=comma_list(str), default=["tokens", "hidden"], help="tokens,hidden (default both)"
    )
    parser.add_argument("--configs", type=comma_list(str), default=list(DEFAULT_CONFIGS), help="plain-tN / ray-rN list")
    parser.add_argument("--concurrency", type=comma_list(int), default=[1, 8, 32], help="clients (default 1,8,32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per point (default 10)")
    parser.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured seconds before each point")
    parser.add_argument("--format", dest="fmt", default="onnx-int8", help="server graph format (default onnx-int8)")
    parser.add_argument("--max-batch", type=int, default=16, help="front batch size (server default 16)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="front batch window (server default 5)")
    parser.add_argument("--pool", type=int, default=512, help="distinct requests per entry (default 512)")
    parser.add_argument("--compute-batches", type=comma_list(int), default=[1, 8, 32], help="slice-alone batch sizes")
    parser.add_argument("--compute-seconds", type=float, default=2.0, help="seconds per slice-alone batch size")
    parser.add_argument("--local-cpus", type=int, default=os.cpu_count() or 2, help="CPUs a local Ray schedules")
    parser.add_argument("--data-dir", help="GLUE folder (default /work/shared/data/glue); else random ids")
    parser.add_argument("--note", default="", help="a sentence for the report (e.g. what else ran on the machine)")
    parser.add_argument("--out", default="benchmarks/results/cloud-scale", help="results path without suffix")
    args = parser.parse_args(argv)
    if args.tiny:
        args.bundle.append(args.tiny)
    if not args.bundle:
        parser.error("give at least one --bundle (or --tiny DIR)")
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from cartosplit.device_runtime.bundle import load_bundle
    from cartosplit.serving.ray_backend import ray_is_installed

    args = parse_args(argv)
    if any(c.startswith("ray") for c in args.configs) and not ray_is_installed():
        print(
            "cartosplit bench cloud-scale: the ray configurations need: pip install 'cartosplit[ray]'", file=sys.stderr
        )
        return 2
    if args.tiny:
        make_tiny_bundle(Path(args.tiny))
    sentences = sst2_sentences(args.data_dir)
    inputs = f"SST-2 dev sentences (first {args.pool})" if sentences else f"{args.pool} random token sequences"
    load_before = os.getloadavg()[0]
    points, memory, compute, lifecycle, failures = [], [], [], {}, []
    workdir = Path(tempfile.mkdtemp(prefix="cloud-scale-"))
    for folder in args.bundle:
        bundle = load_bundle(folder)
        request_sets = [build_requests(bundle, entry, sentences, args.pool) for entry in args.entries]
        for rs in request_sets:
            label = slice_name(bundle, rs.entry, rs.graph)
            batches = slice_compute(bundle, rs, args.fmt, args.compute_batches, args.compute_seconds)
            compute.append({"slice": label, "batches": batches})
            print(f"[cloud-scale] {label} alone: {batches}", file=sys.stderr, flush=True)
        reference: dict[str, dict] = {}
        for config in args.configs:
            extra = config_args(config, args.fmt, workdir, args.local_cpus)
            common = ["--bundle", str(folder), "--port", "0", "--log-level", "warning"]
            common += ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
            started = time.perf_counter()
            try:
                server = ServerProcess(["serve-cloud", *common, *extra], "serve-cloud", timeout_s=300)
            except RuntimeError as exc:  # e.g. a local Ray that cannot start on a starved machine: say so, go on
                failures.append({"bundle": Path(folder).name, "config": config, "error": str(exc)[-600:]})
                print(f"[cloud-scale] {config} did not start: {str(exc)[-300:]}", file=sys.stderr, flush=True)
                continue
            lifecycle[f"{Path(folder).name}/{config} start"] = round(time.perf_counter() - started, 1)
            try:
                ClosedLoop(server.address, request_sets[0], 2, f"warm-{config}").run(2.0, 0.0)  # load every graph
                if len(request_sets) > 1:
                    ClosedLoop(server.address, request_sets[1], 2, f"warm2-{config}").run(2.0, 0.0)
                time.sleep(3.0)  # idle: let Ray's start-up work settle
                memory.append({"bundle": Path(folder).name, "config": config, "memory": idle_memory(server.pid)})
                for rs in request_sets:
                    label = slice_name(bundle, rs.entry, rs.graph)
                    for clients in args.concurrency:
                        loop = ClosedLoop(server.address, rs, clients, f"{config}-{rs.entry}-{clients}")
                        result = loop.run(args.seconds, args.warmup_s)
                        answers = loop.answers()
                        reference.setdefault(rs.entry, answers)  # the first configuration at the first level
                        result.update(
                            slice=label,
                            config=config,
                            clients=clients,
                            answers_vs_reference=compare(answers, reference[rs.entry]),
                        )
                        points.append(result)
                        print(f"[cloud-scale] {json.dumps(result)}", file=sys.stderr, flush=True)
            finally:
                stopping = time.perf_counter()
                server.stop(grace_s=60)
                lifecycle[f"{Path(folder).name}/{config} stop"] = round(time.perf_counter() - stopping, 1)
    load_after = os.getloadavg()[0]
    note = args.note or "The machine's other work (if any) shares the 2 cores: latencies are noisy."
    report = {
        "bundles": args.bundle,
        "inputs": inputs,
        "format": args.fmt,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "seconds": args.seconds,
        "warmup_s": args.warmup_s,
        "configs": args.configs,
        "load_before": load_before,
        "load_after": load_after,
        "note": note,
        "points": points,
        "derived": derive(points),
        "scaling_estimate": scaling_estimate(points, compute),
        "memory": memory,
        "compute": compute,
        "lifecycle_s": lifecycle,
        "failures": failures,
    }
    command = bench_command("cloud-scale", argv)
    write_report(report, args.out, command, markdown)
    print(f"[cloud-scale] wrote {args.out}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
