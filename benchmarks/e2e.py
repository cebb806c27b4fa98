"""End to end over emulated links: device, edge and cloud as separate processes (``cartosplit bench e2e``).

    cartosplit bench e2e --bundle bundles/sst2-4k-all --limit 300 --clients 8 --out benchmarks/results/e2e

The cloud server (``cartosplit serve-cloud``), the edge server (``cartosplit serve-edge``) and the device
(``python -m cartosplit.benchmarks.e2e_device``) each run in their own process, and, with the ``netns`` shaper, in their
own Linux network namespace. Links (defaults; change with ``--link NAME=RATE/DELAY``):

    device-edge   50mbit/5ms    Wi-Fi
    edge-cloud    100mbit/30ms  metro / backbone
    device-cloud  10mbit/50ms   4G

Rates and delays are per direction (a round trip adds the delay twice). This kernel has no netem, so
(see ``benchmarks/netem.py``): ``--shaper netns`` shapes rate with tbf on veth pairs between namespaces and
adds the delay with a userspace TCP proxy; ``--shaper inprocess`` puts everything on loopback and the proxy
does both; ``auto`` (default) takes netns when namespaces can be made (root), else inprocess. The report
says which ran, and measures each link (ping RTT, bulk goodput) before the benchmark.

Modes, on the same dev inputs: ``cartosplit`` (the bundle's calibrated policy), ``all-cloud`` (tokens
straight to the cloud over the 4G link) and ``all-device`` (the device exit only, no network). Each mode:
a warm-up, a sequential pass (one request at a time: latency and sequential throughput) and a pass with
``--clients`` concurrent device clients (throughput under concurrency). Every process shares this
machine's cores: compute times are those of this machine, not of a phone, an edge box and a data centre.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cartosplit.benchmarks.e2e_device import MODES
from cartosplit.benchmarks.netem import LINK_NAMES, Network, check_links, links_from_args, make_network
from cartosplit.benchmarks.report import bench_command, bench_parser, publish, pyplot
from cartosplit.cli_args import positive_int
from cartosplit.device_runtime.manifest import Manifest
from cartosplit.serving.process import ServerProcess, stop_servers

DEFAULT_BUNDLE = "bundles/sst2-4k-all"
DEFAULT_OUT = "benchmarks/results/e2e"
MODE_LABELS = {"cartosplit": "cartosplit (policy)", "all-cloud": "all-cloud", "all-device": "all-device"}


# ---------------------------------------------------------------------------------------------------- inputs


def load_inputs(bundle_manifest: Manifest, data_dir: str | None, dev_file: str | None, limit: int | None):
    """(texts, pairs or None, gold label ids, where they came from): GLUE dev of the bundle's task, or a file."""
    from cartosplit.export.data import load_file, load_glue

    labels = bundle_manifest.model.labels
    if dev_file:
        data = load_file(dev_file, label_names=labels)
        source = f"{dev_file}"
    else:
        task = bundle_manifest.model.task
        data = load_glue(task, "dev", data_dir)
        source = f"GLUE {task} dev"
    n = min(limit, len(data.texts)) if limit else len(data.texts)
    pairs = list(data.text_pairs[:n]) if data.text_pairs else None
    return list(data.texts[:n]), pairs, np.asarray(data.labels[:n]), f"{source}, first {n} of {len(data.texts)}"


def write_inputs(path: Path, texts: Sequence[str], pairs: Sequence[str] | None) -> None:
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            record = {"text": text} | ({"text_pair": pairs[i]} if pairs else {})
            f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------------ run


def start_tiers(network: Network, bundle: str, server_format: str, server_threads: int) -> tuple[dict, dict]:
    """Cloud, then edge (which reaches the cloud over edge-cloud); the servers and the device's addresses."""
    common = ["--bundle", bundle, "--host", network.bind_host, "--port", "0", "--format", server_format]
    common += ["--threads", str(server_threads), "--log-level", "warning"]
    servers: dict[str, ServerProcess] = {}
    try:
        servers["cloud"] = ServerProcess(["serve-cloud", *common], "cloud", prefix=network.prefix("cloud"))
        cloud_port = int(servers["cloud"].address.rsplit(":", 1)[1])
        edge_to_cloud = network.open_link("edge", "cloud", cloud_port)
        servers["edge"] = ServerProcess(
            ["serve-edge", *common, "--cloud", edge_to_cloud], "edge", prefix=network.prefix("edge")
        )
        edge_port = int(servers["edge"].address.rsplit(":", 1)[1])
        addresses = {
            "edge": network.open_link("device", "edge", edge_port),
            "cloud": network.open_link("device", "cloud", cloud_port),
        }
    except BaseException:
        stop_servers(servers)
        raise
    return servers, addresses


def run_device(
    network: Network, mode: str, addresses: dict, bundle: str, inputs: Path, output: Path, options: dict
) -> list[dict]:
    """The device process for one mode, in the device's network; its JSON lines."""
    command = [*network.prefix("device"), sys.executable, "-m", "cartosplit.benchmarks.e2e_device", "--bundle", bundle]
    command += ["--mode", mode, "--input", str(inputs), "--output", str(output)]
    if mode != "all-device":
        command += ["--cloud", addresses["cloud"]] + (["--edge", addresses["edge"]] if mode == "cartosplit" else [])
    for flag in ("format", "threads", "timeout", "clients", "warmup"):
        command += [f"--{flag}", str(options[flag])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=options["process_timeout_s"])
    if done.returncode != 0:
        raise RuntimeError(f"device ({mode}) exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in output.read_text().splitlines() if line.strip()]


def run_e2e(
    bundle: str,
    texts: list[str],
    pairs: list[str] | None,
    shaper: str = "auto",
    links: dict | None = None,
    modes: Sequence[str] = MODES,
    netns_prefix: str | None = None,
    link_check: bool = True,
    probe_s: float = 0.4,
    log: Callable[[str], None] = print,
    **options: object,
) -> dict:
    """Build the network, measure its links, start the tiers, run the device in each mode; raw results.

    ``options``: device_format, server_format, device_threads, server_threads, timeout, clients, warmup.
    """
    links = links or links_from_args([])
    device = {
        "format": options.get("device_format", "onnx-int8"),
        "threads": options.get("device_threads", 1),
        "timeout": options.get("timeout", 5.0),
        "clients": options.get("clients", 8),
        "warmup": options.get("warmup", 5),
        "process_timeout_s": options.get("process_timeout_s", 3600),
    }
    server_format, server_threads = options.get("server_format", "onnx-fp32"), options.get("server_threads", 1)
    network, why = make_network(shaper, links, netns_prefix, log)
    raw: dict[str, list[dict]] = {}
    with network, tempfile.TemporaryDirectory(prefix="cartosplit-e2e-") as tmp:
        inputs = Path(tmp) / "inputs.jsonl"
        write_inputs(inputs, texts, pairs)
        description = network.describe() | {"why": why}
        log(f"shaper: {network.kind} ({why})")
        measured_links = check_links(network, log, probe_s=probe_s) if link_check else {}
        servers, addresses = start_tiers(network, bundle, server_format, server_threads)
        try:
            counters_before = network.counters()  # the link check's traffic is not the benchmark's
            for mode in modes:
                log(f"device: {mode} ({len(texts)} inputs, sequential then {device['clients']} clients)")
                raw[mode] = run_device(network, mode, addresses, bundle, inputs, Path(tmp) / f"{mode}.jsonl", device)
            counters = counter_delta(network.counters(), counters_before)
        finally:
            stop_servers(servers)
    return {
        "network": description,
        "measured_links": measured_links,
        "shaper_counters": counters,
        "device": {k: v for k, v in device.items() if k != "process_timeout_s"},
        "servers": {"format": server_format, "threads": server_threads},
        "raw": raw,
    }


# --------------------------------------------------------------------------------------------------- metrics


def counter_delta(after: object, before: object) -> object:
    """``after - before`` for nested dicts of counters (missing or None entries stay as they are)."""
    if isinstance(after, dict):
        previous = before if isinstance(before, dict) else {}
        return {k: counter_delta(v, previous.get(k)) for k, v in after.items()}
    if isinstance(after, int) and isinstance(before, int):
        return after - before
    return after


def _stats(values: Sequence[float]) -> dict:
    if not len(values):
        return {"count": 0}
    a = np.asarray(values, dtype=float)
    out = {"count": len(a), "mean": a.mean(), "p50": np.percentile(a, 50), "p95": np.percentile(a, 95)}
    out |= {"p99": np.percentile(a, 99), "max": a.max()}
    return {k: (round(float(v), 2) if k != "count" else v) for k, v in out.items()}


def _shares(values: Sequence[str]) -> dict[str, float]:
    counts = Counter(values)
    return {k: round(v / len(values), 4) for k, v in sorted(counts.items())} if values else {}


def summarise_pass(rows: list[dict], summary: dict, gold: np.ndarray) -> dict:
    """Accuracy, latency, throughput, bytes and shares of one pass of one mode."""
    answered = [r for r in rows if "error" not in r]
    correct = sum(int(r["label_id"] == gold[r["index"]]) for r in answered)
    indices = sorted(r["index"] for r in rows)
    return {
        "clients": summary["clients"],
        "inputs": len(gold),
        "answered": len(answered),
        "every_input_answered": len(answered) == len(gold) and indices == list(range(len(gold))),
        "errors": len(rows) - len(answered),
        "error_samples": [r["error"] for r in rows if "error" in r][:5],
        "accuracy": round(correct / len(gold), 4),
        "latency_ms": _stats([r["latency_ms"] for r in answered]),
        "wall_s": round(summary["wall_s"], 3),
        "throughput_per_s": round(len(answered) / summary["wall_s"], 2) if summary["wall_s"] else None,
        "bytes_sent_per_input": round(float(np.mean([r["bytes_sent"] for r in answered])), 1) if answered else None,
        "share_by_tier": _shares([r["tier"] for r in answered]),
        "share_by_route": _shares([r["route"] for r in answered]),
        "degraded": sum(bool(r["degraded"]) for r in answered),
        "tier_failures": sum(bool(r["errors"]) for r in answered),
        "latency_by_tier_ms": {
            t: _stats([r["latency_ms"] for r in answered if r["tier"] == t])
            for t in sorted({r["tier"] for r in answered})
        },
    }


def summarise(raw: dict[str, list[dict]], gold: np.ndarray) -> dict[str, dict[str, dict]]:
    """mode -> pass -> summary."""
    results: dict[str, dict[str, dict]] = {}
    for mode, lines in raw.items():
        summaries = {line["pass"]: line for line in lines if line.get("summary")}
        results[mode] = {
            name: summarise_pass([x for x in lines if not x.get("summary") and x["pass"] == name], s, gold)
            for name, s in summaries.items()
        }
    return results


# ---------------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> list[str]:
    net, dev = r["network"], r["device"]
    lines = [
        "# End to end over emulated links",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Load average (1 min) before {r['load_average']['before'][0]:.2f}, after {r['load_average']['end'][0]:.2f} "
        "(this run's processes included; every tier shares these cores).  ",
        f"Bundle: {r['bundle']} (id {r['bundle_id']}, {r['model']}); device {dev['format']} ({dev['threads']} "
        f"thread per client), servers {r['servers']['format']} ({r['servers']['threads']} thread per graph); "
        f"timeout per remote call {dev['timeout']} s; inputs: {r['inputs']}; warm-up {dev['warmup']} inputs "
        "per client, not counted.",
        "",
        f"**Shaper: {net['shaper']}** ({net['why']}): {net['how']}.",
        "",
        "## Links",
        "",
        "| link | configured (per direction) | tbf (rate, burst, queue) | measured RTT median (expected) "
        "| measured goodput |",
        "|---|---|---|---|---|",
    ]
    for name in LINK_NAMES:
        spec, tbf = net["links"][name]["spec"], net["links"][name].get("tbf")
        tbf_text = f"{tbf['rate_bps'] / 1e6:g} Mbit, {tbf['burst_bytes']} B, {tbf['latency_ms']:g} ms" if tbf else "-"
        m = r["measured_links"].get(name)
        rtt = f"{m['rtt_ms']['median']} ms ({m['expected_rtt_ms']:g})" if m else "not measured"
        goodput = f"{m['goodput_mbit']} Mbit/s" if m else "-"
        lines.append(f"| {name} | {spec} | {tbf_text} | {rtt} | {goodput} |")
    lines += [
        "",
        "Goodput is TCP payload; tbf counts headers too, so it reads ~4 % under the rate. The delay is added in "
        "user space: TCP sees a short round trip, so slow start and window limits of a real long link are not "
        "reproduced.",
        "",
        "## Results",
        "",
        "Latency per input as the device's caller sees it (tokenisation, device graphs, network, servers).",
        "",
        "| mode | pass | clients | accuracy | mean ms | p50 | p95 | inputs/s | bytes sent/input | device / edge / "
        "cloud | degraded | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, passes in r["results"].items():
        for name, p in passes.items():
            lat, s = p["latency_ms"], p["share_by_tier"]
            shares = " / ".join(f"{100 * s.get(t, 0):.0f}%" for t in ("device", "edge", "cloud"))
            lines.append(
                f"| {MODE_LABELS.get(mode, mode)} | {name} | {p['clients']} | {p['accuracy']:.4f} | "
                f"{lat.get('mean', '-')} | {lat.get('p50', '-')} | {lat.get('p95', '-')} | {p['throughput_per_s']} | "
                f"{p['bytes_sent_per_input']:.0f} | {shares} | {p['degraded']} | {p['errors']} |"
            )
    lines += ["", "Sequential latency by the tier that answered (ms: mean / p95, count):", ""]
    for mode, passes in r["results"].items():
        by_tier = passes.get("sequential", {}).get("latency_by_tier_ms", {})
        parts = [f"{t} {s['mean']} / {s['p95']} ({s['count']})" for t, s in by_tier.items()]
        lines.append(f"- {MODE_LABELS.get(mode, mode)}: " + "; ".join(parts))
    counters = r.get("shaper_counters", {}).get("tbf")
    if counters:
        lines += [
            "",
            "tbf counters during the benchmark (link check excluded), per veth end:",
            "",
        ]
        lines += [
            f"- {end}: {c['sent_bytes']:,} B, {c['dropped']} dropped" for end, c in counters.items() if c is not None
        ]
    if r.get("plot"):
        lines += ["", f"![latency and throughput per mode]({Path(r['plot']).name})"]
    return lines


def plot(report: dict, path: Path) -> None:
    plt = pyplot()

    results, raw = report["results"], report["raw_latency_ms"]
    modes = list(results)
    fig, (ax_cdf, ax_bars, ax_tp) = plt.subplots(1, 3, figsize=(14, 4.2))
    for mode in modes:
        values = np.sort(raw[mode])
        if len(values):
            ax_cdf.plot(values, np.arange(1, len(values) + 1) / len(values), label=MODE_LABELS[mode])
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("latency per input, ms (log)")
    ax_cdf.set_ylabel("fraction of inputs")
    ax_cdf.set_title("sequential: latency distribution")
    ax_cdf.legend(fontsize=8)
    ax_cdf.grid(alpha=0.3)
    x = np.arange(len(modes))
    for offset, key in ((-0.2, "mean"), (0.2, "p95")):
        heights = [results[m]["sequential"]["latency_ms"].get(key, 0) for m in modes]
        ax_bars.bar(x + offset, heights, width=0.4, label=key)
    ax_bars.set_xticks(x, [MODE_LABELS[m] for m in modes], fontsize=8)
    ax_bars.set_ylabel("ms")
    ax_bars.set_title("sequential: mean and p95 latency")
    ax_bars.legend(fontsize=8)
    for offset, name in ((-0.2, "sequential"), (0.2, "concurrent")):
        heights = [results[m].get(name, {}).get("throughput_per_s") or 0 for m in modes]
        clients = next((results[m][name]["clients"] for m in modes if name in results[m]), 1)
        ax_tp.bar(x + offset, heights, width=0.4, label=f"{name} ({clients} client{'s' * (clients > 1)})")
    ax_tp.set_xticks(x, [MODE_LABELS[m] for m in modes], fontsize=8)
    ax_tp.set_ylabel("inputs / s")
    ax_tp.set_yscale("log")
    ax_tp.set_title("throughput")
    ax_tp.legend(fontsize=8)
    links = ", ".join(f"{n} {report['network']['links'][n]['spec']}" for n in LINK_NAMES)
    fig.suptitle(f"cartosplit e2e, shaper {report['network']['shaper']}: {links}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(MODES)}, got {text!r}")
    return modes


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("e2e", __doc__)
    p.add_argument("--bundle", default=DEFAULT_BUNDLE, help="bundle folder (default: %(default)s)")
    p.add_argument("--data-dir", help="GLUE folder (default: the usual resolution, ../shared/data/glue first)")
    p.add_argument("--dev-file", help="labelled CSV/JSONL to use instead of the GLUE dev set")
    p.add_argument("--limit", type=positive_int, default=300, help="first N dev inputs (default: %(default)s)")
    p.add_argument(
        "--link",
        action="append",
        metavar="NAME=RATE/DELAY",
        help="override a link, e.g. device-edge=50mbit/5ms (per direction; units bit/kbit/mbit/gbit, us/ms/s); "
        "repeatable. Defaults: device-edge=50mbit/5ms, edge-cloud=100mbit/30ms, device-cloud=10mbit/50ms",
    )
    p.add_argument("--shaper", choices=("auto", "netns", "inprocess"), default="auto", help="(default: auto)")
    p.add_argument("--netns-prefix", help="namespace names <prefix>-device/-edge/-cloud (default: cs-<random>)")
    p.add_argument("--modes", type=_modes, default=MODES, help="comma-separated (default: all three)")
    p.add_argument("--clients", type=positive_int, default=8, help="device clients of the concurrent pass")
    p.add_argument("--warmup", type=int, default=5, help="inputs per client before measuring (default: 5)")
    p.add_argument("--device-format", default="onnx-int8", help="(default: %(default)s)")
    p.add_argument("--server-format", default="onnx-fp32", help="(default: %(default)s)")
    p.add_argument("--device-threads", type=positive_int, default=1, help="onnxruntime threads per device client")
    p.add_argument("--server-threads", type=positive_int, default=1, help="onnxruntime threads per server graph")
    p.add_argument("--timeout", type=float, default=5.0, help="device's seconds per remote call (default: 5)")
    p.add_argument("--no-link-check", dest="link_check", action="store_false", help="skip measuring the links")
    p.add_argument("--probe-seconds", type=float, default=0.4, help="bulk transfer length of the link check")
    p.add_argument("--out", default=DEFAULT_OUT, help="path prefix of .json/.md/.png (default: %(default)s)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    return p


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        links = links_from_args(args.link)
    except ValueError as exc:
        parser.error(str(exc))
    if args.warmup < 0 or not 0 < args.timeout < 600 or args.probe_seconds <= 0:
        parser.error("--warmup must be >= 0, --timeout in (0, 600) s, --probe-seconds > 0")

    from cartosplit.device_runtime.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    texts, pairs, gold, source = load_inputs(bundle.manifest, args.data_dir, args.dev_file, args.limit)
    print(f"inputs: {source}", flush=True)
    load_before = os.getloadavg()
    began = time.time()
    # SIGTERM unwinds like Ctrl-C: servers and proxies stopped, namespaces deleted, no orphan left behind
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if _in_main_thread() else None
    try:
        run = run_e2e(
            str(args.bundle),
            texts,
            pairs,
            shaper=args.shaper,
            links=links,
            modes=args.modes,
            netns_prefix=args.netns_prefix,
            link_check=args.link_check,
            probe_s=args.probe_seconds,
            log=lambda line: print(line, flush=True),
            device_format=args.device_format,
            server_format=args.server_format,
            device_threads=args.device_threads,
            server_threads=args.server_threads,
            timeout=args.timeout,
            clients=args.clients,
            warmup=args.warmup,
        )
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    raw = run.pop("raw")
    report = {
        "bundle": str(args.bundle),
        "bundle_id": bundle.bundle_id[:12],
        "model": bundle.manifest.model.id,
        "inputs": source,
        **run,
        "results": summarise(raw, gold),
        "load_average": {"before": load_before, "end": os.getloadavg()},
        "seconds": round(time.time() - began, 1),
    }
    sequential = {
        mode: [r["latency_ms"] for r in rows if r["pass"] == "sequential" and "latency_ms" in r and "error" not in r]
        for mode, rows in raw.items()
    }
    with_plot = (lambda r, path: plot(r | {"raw_latency_ms": sequential}, path)) if args.plot else None
    publish(report, args.out, bench_command("e2e", argv), markdown, with_plot)
    complete = all(p["every_input_answered"] for passes in report["results"].values() for p in passes.values())
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
