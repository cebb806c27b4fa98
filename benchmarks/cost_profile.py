"""A measured cost profile for calibration, built from the latency and bytes benchmarks' JSON.

    cartosplit bench cost-profile --latency benchmarks/results/latency.json \\
        --bytes benchmarks/results/bytes.json --out-dir benchmarks/results
    cartosplit calibrate --run runs/sst2-4k --costs benchmarks/results/cost-profile-ms.json

Writes two ``cartosplit.device_runtime.costs.CostProfile`` files (exactly its fields; provenance in ``source``):

``cost-profile-ms.json`` (milliseconds)
  per-layer costs = p50 (or mean) of a slice at one batch x length x threads, divided by its layers:
  device = device slice (head + tail) / d on ``--device-runtime``; edge = edge slice / (e - d) and
  cloud = cloud_from_e / (L - e) on ``--server-format``. Hops = mean bytes per sample of ``--encoding``
  on that hop x 8 / bandwidth + one-way latency of the link (``--device-edge``, ``--edge-cloud``,
  ``--device-cloud``; defaults Wi-Fi 50 Mbit/s 5 ms, 100 Mbit/s 30 ms, 4G 10 Mbit/s 50 ms).
  ``device_to_cloud`` is the hard-sample hop (hidden state at r > 0). ``device_to_cloud_tokens`` is the
  all-cloud request (token ids, also a hard sample's at r = 0): the bytes report's mean
  ``raw_input_bytes.token_ids_all_cloud`` (the same whatever ``--encoding``) over the ``--device-cloud`` link.

``cost-profile-mJ.json`` (millijoules spent by the DEVICE's battery)
  device per layer = the device slice's energy per sample / d: measured if the latency JSON has a
  measured figure, else ESTIMATED as ms x the active watts of ``--power-profile``. Edge and cloud per
  layer, and each hop (the token hop too): the device waits (idle watts x time; 0 for a profile whose
  watts are above idle).
  Radio power: no cited per-byte or per-second radio figure was found, so by default a hop costs idle
  watts x transfer time (a lower bound); give a link's radio watts (``--device-edge 50,5,1.2``) to use
  radio watts x transfer time instead. The ``source`` field says which was used.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from cartosplit.benchmarks.report import bench_parser
from cartosplit.device_runtime.costs import CostProfile
from cartosplit.device_runtime.manifest import cloud_graph


@dataclass(frozen=True)
class LinkSpec:
    bandwidth_mbit: float  # megabits (1e6 bits) per second
    latency_ms: float  # one way
    radio_w: float | None = None  # the device's radio power while sending, if known

    def __post_init__(self) -> None:
        if not self.bandwidth_mbit > 0:
            raise ValueError(f"link bandwidth must be > 0 Mbit/s, got {self.bandwidth_mbit}")
        if self.latency_ms < 0:
            raise ValueError(f"link latency must be >= 0 ms, got {self.latency_ms}")
        if self.radio_w is not None and self.radio_w < 0:
            raise ValueError(f"radio power must be >= 0 W, got {self.radio_w}")

    def describe(self) -> str:
        radio = f", radio {self.radio_w:g} W" if self.radio_w is not None else ""
        return f"{self.bandwidth_mbit:g} Mbit/s, {self.latency_ms:g} ms{radio}"


DEFAULT_LINKS = {
    "device_to_edge": LinkSpec(50.0, 5.0),  # Wi-Fi
    "edge_to_cloud": LinkSpec(100.0, 30.0),
    "device_to_cloud": LinkSpec(10.0, 50.0),  # 4G
}
HOPS = tuple(DEFAULT_LINKS)
# The token-id request of all-cloud (and of a hard sample at r = 0) travels the device→cloud link too.
TOKEN_HOP, TOKEN_LINK = "device_to_cloud_tokens", "device_to_cloud"


def transfer_ms(nbytes: float, link: LinkSpec) -> float:
    """Time to send ``nbytes`` over ``link``: serialisation at its bandwidth plus its one-way latency."""
    if nbytes < 0:
        raise ValueError(f"bytes must be >= 0, got {nbytes}")
    return nbytes * 8 / (link.bandwidth_mbit * 1e6) * 1e3 + link.latency_ms


def _row(latency: dict, *, tier: str, key: str, batch: int, length: int, threads: int, graph: str | None = None):
    wanted = (tier, key, batch, length, threads)
    for row in latency["rows"]:
        same = (row["tier"], row["key"], row["batch"], row["length"], row["threads"]) == wanted
        if same and (graph is None or row["graph"] == graph):
            return row
    have = sorted({(r["key"], r["batch"], r["length"], r["threads"]) for r in latency["rows"] if r["tier"] == tier})
    raise ValueError(
        f"the latency report has no {tier} row {graph or ''} for {key} at batch {batch}, length {length}, "
        f"{threads} thread(s); it has (key, batch, length, threads) {have}"
    )


@dataclass(frozen=True)
class Selection:
    """Which measurements a profile is built from."""

    device_key: str = "onnx-int8"
    server_key: str = "onnx-fp32"
    batch: int = 1
    length: int = 32
    threads: int = 1
    encoding: str = "fp16"
    statistic: str = "p50_ms"


def compute_ms_per_layer(latency: dict, sel: Selection) -> dict[str, float]:
    """Milliseconds per encoder layer on the device, the edge and the cloud."""
    sp = latency["split_points"]
    d, e, total = sp["device"], sp["edge"], sp["total"]
    common = {"batch": sel.batch, "length": sel.length, "threads": sel.threads}
    device = _row(latency, tier="device", key=sel.device_key, **common)
    edge = _row(latency, tier="edge", key=sel.server_key, graph="edge", **common)
    cloud = _row(latency, tier="cloud", key=sel.server_key, graph=cloud_graph(e), **common)
    return {
        "device": device[sel.statistic] / d,
        "edge": edge[sel.statistic] / (e - d),
        "cloud": cloud[sel.statistic] / (total - e),
    }


def hop_bytes(wire: dict, encoding: str) -> dict[str, float]:
    """Mean bytes per sample on each hop in ``encoding`` (a hop the bytes report lacks, e.g. r = 0, is 0)."""
    if encoding not in wire["encodings"]:
        raise ValueError(f"the bytes report has no encoding {encoding!r}; it has {wire['encodings']}")
    return {hop: float(wire["bytes"][hop][encoding]["mean"]) if hop in wire["bytes"] else 0.0 for hop in HOPS}


def token_request_bytes(wire: dict) -> float:
    """Mean bytes of the all-cloud request (token ids as INT32): ``raw_input_bytes.token_ids_all_cloud.mean``."""
    try:
        return float(wire["raw_input_bytes"]["token_ids_all_cloud"]["mean"])
    except (KeyError, TypeError):
        # without it the token hop would silently fall back to the hidden-state hop and overcharge all-cloud
        raise ValueError(
            "the bytes report has no raw_input_bytes.token_ids_all_cloud.mean (the all-cloud token request's "
            "mean bytes), needed for device_to_cloud_tokens; rerun `cartosplit bench bytes`"
        ) from None


def _profile(per_layer: dict[str, float], hops: dict[str, float], unit: str, source: str) -> CostProfile:
    """A profile from the cost of a layer on each tier (device, edge, cloud) and of each hop (HOPS, TOKEN_HOP)."""
    layers = {f"{tier}_per_layer": per_layer[tier] for tier in ("device", "edge", "cloud")}
    return CostProfile(**layers, **{hop: hops[hop] for hop in (*HOPS, TOKEN_HOP)}, unit=unit, source=source)


def build_ms_profile(latency: dict, wire: dict, links: dict[str, LinkSpec], sel: Selection) -> CostProfile:
    per_layer = compute_ms_per_layer(latency, sel)
    nbytes = hop_bytes(wire, sel.encoding)
    token_bytes = token_request_bytes(wire)
    hops = {hop: transfer_ms(nbytes[hop], links[hop]) for hop in HOPS}
    hops[TOKEN_HOP] = transfer_ms(token_bytes, links[TOKEN_LINK])
    source = (
        f"measured: {sel.statistic[:-3]} compute from {latency.get('command', 'a latency report')} on "
        f"{latency.get('machine', '?')} (device {sel.device_key}, edge/cloud {sel.server_key}; batch {sel.batch}, "
        f"length {sel.length}, {sel.threads} thread(s)); hops = mean {sel.encoding} bytes per sample from "
        f"{wire.get('command', 'a bytes report')} x 8 / bandwidth + latency: "
        + "; ".join(f"{hop} {nbytes[hop]:,.0f} B over {links[hop].describe()}" for hop in HOPS)
        + f"; {TOKEN_HOP} {token_bytes:,.0f} B (token ids, INT32) over {links[TOKEN_LINK].describe()}"
        + ". device_to_cloud is the hard-sample hop (hidden state at r > 0); device_to_cloud_tokens the "
        "all-cloud request (and a hard sample's at r = 0)."
    )
    return _profile(per_layer, hops, "ms", source)


def device_energy_per_layer(latency: dict, sel: Selection, profile_name: str, profile: dict) -> tuple[float, str]:
    """mJ per device layer per sample: a measured figure from the latency report if there is one, else estimated."""
    from cartosplit.benchmarks.energy import profile_watts

    d = latency["split_points"]["device"]
    row = _row(latency, tier="device", key=sel.device_key, batch=sel.batch, length=sel.length, threads=sel.threads)
    measured = [e for e in row.get("energy", []) if e["label"] == "measured"]
    if measured:
        return measured[0]["mj_per_sample"] / d, f"measured ({measured[0]['meter']})"
    watts, which = profile_watts(profile, sel.threads)
    per_sample_ms = row[sel.statistic] / sel.batch
    machine = latency.get("machine", "the benchmark machine")
    how = (
        f"ESTIMATED: {sel.statistic[:-3]} time on {machine} (not on the device) x {profile_name} {watts:g} W ({which})"
    )
    return per_sample_ms * watts / d, how


def build_mj_profile(
    latency: dict, wire: dict, links: dict[str, LinkSpec], sel: Selection, profile_name: str, profile: dict
) -> CostProfile:
    ms = build_ms_profile(latency, wire, links, sel)
    compute = compute_ms_per_layer(latency, sel)
    device_mj, device_how = device_energy_per_layer(latency, sel, profile_name, profile)
    idle = profile.get("idle_w") or 0.0
    idle_how = (
        f"idle {idle:g} W"
        if profile.get("idle_w") is not None
        else "0 W above idle (the profile's watts are above idle)"
    )
    hops, hop_how = {}, []
    for hop in (*HOPS, TOKEN_HOP):
        link = links[TOKEN_LINK if hop == TOKEN_HOP else hop]
        transfer = getattr(ms, hop)
        if link.radio_w is not None:
            hops[hop] = transfer * link.radio_w
            hop_how.append(f"{hop}: {transfer:.2f} ms x radio {link.radio_w:g} W (given)")
        else:
            hops[hop] = transfer * idle
            hop_how.append(f"{hop}: {transfer:.2f} ms x {idle_how} (radio not included: no cited figure)")
    source = (
        f"device energy: {device_how}; edge/cloud per layer: the device waits, {idle_how} x their "
        f"{sel.statistic[:-3]} ms per layer; hops: " + "; ".join(hop_how) + f". Time basis: {ms.source}"
    )
    per_layer = {"device": device_mj, "edge": compute["edge"] * idle, "cloud": compute["cloud"] * idle}
    return _profile(per_layer, hops, "mJ", source)


def auto_length(latency: dict, wire: dict) -> int:
    """The smallest measured length that holds the bytes report's mean tokens (else the largest measured)."""
    lengths = sorted(latency["settings"]["lengths"])
    fitting = [n for n in lengths if n >= wire["tokens_mean"]]
    return fitting[0] if fitting else lengths[-1]


def _link(text: str) -> LinkSpec:
    try:
        parts = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MBIT,MS[,RADIO_W], got {text!r}") from None
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected MBIT,MS[,RADIO_W], got {text!r}")
    try:
        return LinkSpec(*parts)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = bench_parser("cost-profile", __doc__)
    parser.add_argument("--latency", default="benchmarks/results/latency.json", help="cartosplit bench latency JSON")
    parser.add_argument("--bytes", default="benchmarks/results/bytes.json", help="cartosplit bench bytes JSON")
    parser.add_argument("--device-runtime", default="onnx-int8", help="device row key, e.g. onnx-int8, tflite-int8")
    parser.add_argument("--server-format", default="onnx-fp32", help="edge and cloud rows: onnx-fp32 or onnx-int8")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", default="auto", help="a measured length, or auto (fits the dev mean tokens)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoding", default="fp16", help="activation encoding on the wire (bytes report)")
    parser.add_argument("--statistic", choices=("p50", "mean"), default="p50")
    for hop, flag in (
        ("device_to_edge", "--device-edge"),
        ("edge_to_cloud", "--edge-cloud"),
        ("device_to_cloud", "--device-cloud"),
    ):
        link = DEFAULT_LINKS[hop]
        parser.add_argument(
            flag, type=_link, default=link, metavar="MBIT,MS[,RADIO_W]", help=f"default {link.describe()}"
        )
    parser.add_argument("--power-profile", default="raspberry-pi-4", help="device profile for estimated energy")
    parser.add_argument("--power-profiles", default=None, help="profiles file (default benchmarks/power_profiles.json)")
    parser.add_argument(
        "--out-dir", default="benchmarks/results", help="writes cost-profile-ms.json, cost-profile-mJ.json"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    from cartosplit.benchmarks.energy import POWER_PROFILES, load_power_profiles
    from cartosplit.device_runtime.costs import SplitPoints

    args = build_parser().parse_args(argv)
    latency = json.loads(Path(args.latency).read_text())
    wire = json.loads(Path(args.bytes).read_text())
    length = auto_length(latency, wire) if args.length == "auto" else int(args.length)
    sel = Selection(
        args.device_runtime, args.server_format, args.batch, length, args.threads, args.encoding, f"{args.statistic}_ms"
    )
    links = {"device_to_edge": args.device_edge, "edge_to_cloud": args.edge_cloud, "device_to_cloud": args.device_cloud}
    profiles = load_power_profiles(args.power_profiles or POWER_PROFILES)
    if args.power_profile not in profiles:
        raise SystemExit(f"no power profile {args.power_profile!r}; known: {sorted(profiles)}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    split = SplitPoints(**{k: latency["split_points"][k] for k in ("router_depth", "device", "edge", "total")})
    for name, profile in (
        ("cost-profile-ms.json", build_ms_profile(latency, wire, links, sel)),
        (
            "cost-profile-mJ.json",
            build_mj_profile(latency, wire, links, sel, args.power_profile, profiles[args.power_profile]),
        ),
    ):
        (out / name).write_text(json.dumps(profile.to_dict(), indent=2) + "\n")
        CostProfile.from_json(out / name)  # what calibrate will read: fail here, not there
        costs = profile.tier_costs(split)
        print(
            f"{out / name}: device {costs[0]:.2f}, edge {costs[1]:.2f}, cloud via edge {costs[2]:.2f}, "
            f"cloud direct {costs[3]:.2f}, all-cloud {profile.all_cloud_cost(split):.2f} {profile.unit} per sample"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
