"""Cost profiles for devices this machine is not: cited per-device compute and power, crossed with cited links.

    cartosplit bench device-profiles --out-dir benchmarks/results/device-profiles

``benchmarks/device_profiles.json`` holds, per device, an HPL-style GFLOP/s figure and its watts, and per link
(Wi-Fi, LTE, wired) its bandwidth, one-way latency and radio watts, each with its public source. This module
measures the same kind of figure on this machine (an FP64 LU solve, what HPL times) in the same run and scales
the measured ms profile (``benchmarks/results/cost-profile-ms.json``, made here by
``cartosplit.benchmarks.cost_profile``):

* device per layer = this machine's ms per layer x this machine's GFLOP/s / the device's per-core GFLOP/s. A
  GFLOP/s ratio is a first-order estimate of inference speed: HPL is FP64 dense LU, the device slice runs int8
  or fp32 matmuls whose speed also depends on the ISA (dot-product instructions) and on memory bandwidth.
* edge and cloud per layer, and edge->cloud: the measured profile's, unchanged (the server side is the same).
* device->edge, device->cloud (hidden state) and the token-id request: bytes per sample (the bytes report, read
  with ``cartosplit.benchmarks.cost_profile``) x 8 / the link's bandwidth + its one-way latency; the link is the
  device's first hop, so both device->edge and device->cloud go over it.
* mJ, the device's battery: device compute = ms x active watts; waiting for edge, cloud and edge->cloud = idle
  watts x time; a device hop = (idle + radio watts) x time where the link has cited radio watts (the radio's own
  draw, on top of the rest of the device idling), else idle watts x time.

``scaled_profile`` multiplies the device's per-layer cost and every hop, for a sweep of router gain against the
ratio of device compute to link cost. The CLI writes one ``CostProfile`` JSON per (device, link, unit) and an
``index.json`` with the host figure measured, the machine, the command and the time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from cartosplit.benchmarks.cost_profile import LinkSpec, hop_bytes, token_request_bytes, transfer_ms
from cartosplit.benchmarks.report import bench_command, bench_parser
from cartosplit.device_runtime.costs import CostProfile, SplitPoints

DEVICE_PROFILES = Path(__file__).with_name("device_profiles.json")
RESULTS = Path(__file__).parent / "results"
UNITS = ("ms", "mJ")
HOST_METHOD = (
    "numpy.linalg.solve (LAPACK dgesv: LU with partial pivoting, what HPL times) on a random FP64 n x n system, "
    "best of {repeats}, GFLOP/s = (2/3 n^3 + 2 n^2) / s, the HPL operation count; n = {n}, {threads} BLAS thread(s)"
)

# Runs in a child process: the BLAS thread count is fixed by environment variables read when numpy loads,
# so a child with them set is the dependable way to time one thread without touching this process's numpy.
_HOST_SCRIPT = """
import sys, time
import numpy as np
n, repeats = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
a, b = rng.standard_normal((n, n)), rng.standard_normal(n)
np.linalg.solve(a, b)  # warm-up: page in the matrix, start the BLAS threads
best = float("inf")
for _ in range(repeats):
    t0 = time.perf_counter()
    np.linalg.solve(a, b)
    best = min(best, time.perf_counter() - t0)
print((2 / 3 * n**3 + 2 * n**2) / best / 1e9)
"""


def host_compute(threads: int = 1, n: int = 3000, repeats: int = 3) -> float:
    """This machine's GFLOP/s on an HPL-style FP64 LU solve with ``threads`` BLAS threads (see HOST_METHOD)."""
    if threads < 1 or n < 2 or repeats < 1:
        raise ValueError(f"need threads >= 1, n >= 2, repeats >= 1; got {threads}, {n}, {repeats}")
    env = os.environ | {v: str(threads) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", _HOST_SCRIPT, str(n), str(repeats)], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def load_specs(path: str | Path = DEVICE_PROFILES) -> dict:
    """The devices and links file, checked: positive figures and at least one source with a URL for each entry."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    for kind in ("devices", "links"):
        if not spec.get(kind):
            raise ValueError(f"{path}: no {kind}")
        for name, entry in spec[kind].items():
            if not entry.get("sources") or not all(str(s.get("url", "")).startswith("http") for s in entry["sources"]):
                raise ValueError(f"{path}: {kind} {name!r} needs sources, each with a url")
    for name, dev in spec["devices"].items():
        c = dev["compute"]
        figures = [c["gflops"], c["cores"], c.get("clock_scale", 1.0), *dev["active_w"].values()]
        if dev["idle_w"] is not None:
            figures.append(dev["idle_w"])
        if not all(isinstance(x, (int, float)) and x > 0 for x in figures):
            raise ValueError(f"{path}: device {name!r} has a figure that is not a positive number: {figures}")
    for name, link in spec["links"].items():
        try:
            link_spec(link)
        except ValueError as exc:
            raise ValueError(f"{path}: link {name!r}: {exc}") from None
    return spec


def device_gflops(device: dict, threads: int = 1) -> float:
    """The device's GFLOP/s for ``threads`` busy cores: the cited figure / its cores x clock scale x threads."""
    c = device["compute"]
    return c["gflops"] / c["cores"] * c.get("clock_scale", 1.0) * min(threads, c["cores"])


def link_spec(link: dict) -> LinkSpec:
    return LinkSpec(link["bandwidth_mbit"], link["latency_ms"], link["radio_w"])


def _hops_ms(wire: dict, link: LinkSpec, encoding: str) -> dict[str, float]:
    nbytes = hop_bytes(wire, encoding)
    return {
        "device_to_edge": transfer_ms(nbytes["device_to_edge"], link),
        "device_to_cloud": transfer_ms(nbytes["device_to_cloud"], link),
        "device_to_cloud_tokens": transfer_ms(token_request_bytes(wire), link),
    }


def device_profile(
    device: str,
    link: str,
    unit: str = "ms",
    *,
    host_gflops: float,
    spec: dict | None = None,
    base: CostProfile | None = None,
    wire: dict | None = None,
    encoding: str = "fp16",
    threads: int = 1,
) -> CostProfile:
    """The ``device`` x ``link`` profile in ``unit``, scaled from ``base`` (the measured ms profile of this machine).

    ``host_gflops`` is this machine's figure measured with ``threads`` threads, the thread count ``base`` was
    measured with; ``wire`` is the bytes report the hops are priced from.
    """
    from cartosplit.benchmarks.energy import profile_watts

    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    if not host_gflops > 0:
        raise ValueError(f"host GFLOP/s must be > 0, got {host_gflops}")
    spec = spec if spec is not None else load_specs()
    base = base if base is not None else CostProfile.from_json(RESULTS / "cost-profile-ms.json")
    wire = wire if wire is not None else json.loads((RESULTS / "bytes.json").read_text())
    if base.unit != "ms":
        raise ValueError(f"the base profile must be in ms (a measured time profile), got {base.unit!r}")
    if device not in spec["devices"] or link not in spec["links"]:
        raise ValueError(
            f"unknown device {device!r} or link {link!r}; have {sorted(spec['devices'])} x {sorted(spec['links'])}"
        )
    dev, lk = spec["devices"][device], link_spec(spec["links"][link])
    gflops = device_gflops(dev, threads)
    ratio = host_gflops / gflops
    ms = {
        "device_per_layer": base.device_per_layer * ratio,
        "edge_per_layer": base.edge_per_layer,
        "cloud_per_layer": base.cloud_per_layer,
        "edge_to_cloud": base.edge_to_cloud,
        **_hops_ms(wire, lk, encoding),
    }
    how = (
        f"ESTIMATED for {device} over {link}: device per layer = this machine's {base.device_per_layer:.3f} ms x "
        f"{host_gflops:.2f} / {gflops:.3f} GFLOP/s ({threads} thread(s); this machine measured in the same run, the "
        f"device's from a cited {dev['compute']['figure']}): a GFLOP/s ratio, a first-order estimate of inference "
        f"speed (HPL is FP64 LU; the slice runs int8/fp32 matmuls). Edge/cloud per layer and edge_to_cloud: the "
        f"measured profile's. Device hops: mean {encoding} bytes per sample (token ids for the token hop) x 8 / "
        f"{lk.describe()}, both device->edge and device->cloud over {link}. Figures and sources: "
        f"benchmarks/device_profiles.json. Base: {base.source}"
    )
    if unit == "ms":
        return CostProfile(**ms, unit="ms", source=how)
    active, which = profile_watts(dev, threads)
    idle = dev["idle_w"] or 0.0  # null: the device's watts are above idle, so waiting costs 0 above idle
    radio = lk.radio_w
    hop_w = idle + radio if radio is not None else idle
    mj = {key: value * idle for key, value in ms.items()}
    mj["device_per_layer"] = ms["device_per_layer"] * active
    for hop in ("device_to_edge", "device_to_cloud", "device_to_cloud_tokens"):
        mj[hop] = ms[hop] * hop_w
    idle_how = f"idle {idle:g} W" if dev["idle_w"] is not None else "0 W above idle (the device's watts are above idle)"
    radio_how = (
        f"(idle + radio {radio:g} W) = {hop_w:g} W x transfer time (radio: cited in device_profiles.json)"
        if radio is not None
        else f"{idle_how} x transfer time (radio not included: no cited figure for {link})"
    )
    source = (
        f"ESTIMATED device battery energy: device per layer = its ms x active {active:g} W ({which}); edge/cloud "
        f"per layer and edge_to_cloud: the device waits, {idle_how} x their ms; device hops: {radio_how}. "
        f"Time basis: {how}"
    )
    return CostProfile(**mj, unit="mJ", source=source)


def scaled_profile(profile: CostProfile, device_factor: float, link_factor: float) -> CostProfile:
    """``profile`` with device_per_layer x ``device_factor`` and every hop x ``link_factor``, for a regime sweep."""
    if device_factor < 0 or link_factor < 0:
        raise ValueError(f"factors must be >= 0, got {device_factor}, {link_factor}")
    tokens = profile.device_to_cloud_tokens
    return replace(
        profile,
        device_per_layer=profile.device_per_layer * device_factor,
        device_to_edge=profile.device_to_edge * link_factor,
        edge_to_cloud=profile.edge_to_cloud * link_factor,
        device_to_cloud=profile.device_to_cloud * link_factor,
        device_to_cloud_tokens=None if tokens is None else tokens * link_factor,
        source=f"scaled: device_per_layer x {device_factor:g}, every hop x {link_factor:g}, of: {profile.source}",
    )


def _split(wire: dict) -> SplitPoints:
    return SplitPoints(**{k: wire["split_points"][k] for k in ("router_depth", "device", "edge", "total")})


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("device-profiles", __doc__)
    parser.add_argument("--profiles", default="benchmarks/device_profiles.json", help="devices and links, cited")
    parser.add_argument("--base", default="benchmarks/results/cost-profile-ms.json", help="this machine's ms profile")
    parser.add_argument("--bytes", default="benchmarks/results/bytes.json", help="cartosplit bench bytes JSON")
    parser.add_argument("--encoding", default="fp16", help="activation encoding on the wire, as the base profile's")
    parser.add_argument("--threads", type=int, default=1, help="threads the base profile was measured with")
    parser.add_argument("--matrix-n", type=int, default=3000, help="order of the host's LU solve")
    parser.add_argument("--repeats", type=int, default=5, help="host solves timed; the best is kept (shared CPUs)")
    parser.add_argument("--out-dir", default="benchmarks/results/device-profiles", help="writes the profiles here")
    return parser


def main(argv: list[str] | None = None) -> int:
    from cartosplit.benchmarks.machine import describe_machine

    args = build_parser().parse_args(argv)
    spec = load_specs(args.profiles)
    base = CostProfile.from_json(args.base)
    wire = json.loads(Path(args.bytes).read_text())
    split = _split(wire)
    gflops = host_compute(args.threads, args.matrix_n, args.repeats)
    all_threads = os.cpu_count() or 1
    gflops_all = host_compute(all_threads, args.matrix_n, args.repeats) if all_threads != args.threads else gflops
    machine = describe_machine()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for device in spec["devices"]:
        for link in spec["links"]:
            for unit in UNITS:
                p = device_profile(
                    device,
                    link,
                    unit,
                    host_gflops=gflops,
                    spec=spec,
                    base=base,
                    wire=wire,
                    encoding=args.encoding,
                    threads=args.threads,
                )
                name = f"{device}--{link}--{unit}.json"
                (out / name).write_text(json.dumps(p.to_dict(), indent=2) + "\n")
                CostProfile.from_json(out / name)  # what calibrate will read: fail here, not there
                rows.append(
                    {
                        "file": name,
                        "device": device,
                        "link": link,
                        "unit": unit,
                        **{
                            k: getattr(p, k)
                            for k in ("device_per_layer", "device_to_edge", "device_to_cloud", "device_to_cloud_tokens")
                        },
                        "device_tier_cost": float(p.tier_costs(split)[0]),
                        "all_cloud_cost": p.all_cloud_cost(split),
                    }
                )
    index = {
        "schema_version": 1,
        "command": bench_command("device-profiles", argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "host_compute": {
            "gflops": gflops,
            "threads": args.threads,
            "gflops_all_threads": gflops_all,
            "all_threads": all_threads,
            "method": HOST_METHOD.format(repeats=args.repeats, n=args.matrix_n, threads=args.threads),
        },
        # the scaling is only meaningful if the base ms profile was measured on this machine
        "base_measured_on_this_machine": machine in base.source,
        "base": args.base,
        "bytes": args.bytes,
        "encoding": args.encoding,
        "split_points": wire["split_points"],
        "profiles": rows,
    }
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"host: {gflops:.2f} GFLOP/s at {args.threads} thread(s), {gflops_all:.2f} at {all_threads} ({machine})")
    if not index["base_measured_on_this_machine"]:
        print("WARNING: the base profile's source names another machine; the GFLOP/s ratio mixes machines")
    split_txt = f"d={split.device},e={split.edge},L={split.total}"
    head = f"{'device':<22} {'link':<6} {'unit':<4} {'dev/layer':>10} {'d->e':>9} {'d->c':>9} {'tokens':>9} "
    print(head + f"{'device tier':>11} {'all-cloud':>10}  ({split_txt})")
    for r in rows:
        print(
            f"{r['device']:<22} {r['link']:<6} {r['unit']:<4} {r['device_per_layer']:>10.2f} "
            f"{r['device_to_edge']:>9.2f} {r['device_to_cloud']:>9.2f} {r['device_to_cloud_tokens']:>9.2f} "
            f"{r['device_tier_cost']:>11.2f} {r['all_cloud_cost']:>10.2f}"
        )
    print(f"wrote {len(rows)} profiles and index.json to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
