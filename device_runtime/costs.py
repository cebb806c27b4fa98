"""Cost profile and the per-tier cost of answering a sample (SplitEE/DIMEC unit convention).

Units are whatever the profile says: the default is the abstract unit convention of SplitEE
(arXiv 2309.09195) as written in the kit's method notes; a measured profile replaces it with
milliseconds or joules. Processing cost is per encoder layer on a tier, offloading cost per hop.
"""

from __future__ import annotations

import importlib.resources
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from cartosplit.device_runtime.json_checks import read_json_file

# Where a sample is answered. The integer codes are used in vectorised policy maths.
TIER_DEVICE, TIER_EDGE, TIER_CLOUD_VIA_EDGE, TIER_CLOUD_DIRECT = 0, 1, 2, 3
TIER_NAMES = ("device", "edge", "cloud_via_edge", "cloud_direct")

# Named profiles: the cited device x link profiles `cartosplit bench device-profiles` derives and commits
# (benchmarks/results/device-profiles/, package data), so `calibrate --costs pi4-wifi` needs no file at hand.
DEVICE_ALIASES = {
    "pi-zero-2w": "raspberry-pi-zero-2-w",
    "pi0": "raspberry-pi-zero-2-w",
    "pi4": "raspberry-pi-4",
    "pi5": "raspberry-pi-5",
    "phone": "phone-cortex-a76",
    "phone-a76": "phone-cortex-a76",
}
LINKS = ("wifi", "lte", "wired")
UNITS = ("ms", "mJ")
_NAME = re.compile(r"(?P<device>.+?)-(?:-)?(?P<link>" + "|".join(LINKS) + r")(?:-(?:-)?(?P<unit>ms|mJ))?")


@dataclass(frozen=True)
class SplitPoints:
    """Encoder depths: router at ``r``, device exit at ``d``, edge exit at ``e``, final exit at ``L``."""

    router_depth: int
    device: int
    edge: int
    total: int

    def __post_init__(self) -> None:
        if not (0 <= self.router_depth <= self.device < self.edge < self.total):
            raise ValueError(
                "split points must satisfy 0 <= router_depth <= device < edge < total layers, got "
                f"r={self.router_depth}, d={self.device}, e={self.edge}, L={self.total}"
            )
        if self.device < 1:
            raise ValueError(f"the device slice needs at least one layer, got device split {self.device}")


@dataclass(frozen=True)
class CostProfile:
    """Per-layer processing cost on each tier and per-hop offloading cost.

    ``unit`` is informative ("unit", "ms", "mJ"): calibration only needs the costs to be comparable
    with each other and, for the reward objective, with accuracy through ``beta``.

    Two device→cloud hops: ``device_to_cloud`` carries a hidden state (a hard sample leaving the
    device at router depth r > 0), ``device_to_cloud_tokens`` a token-id request (all-cloud, and a
    hard sample at r = 0, where no layer ran on the device). A measured profile prices them apart
    (~20 kB of fp16 activations vs ~320 bytes of token ids); ``None`` means the same as
    ``device_to_cloud``, the unit convention's single o_dc, and is what a profile written before the
    split loads as.
    """

    device_per_layer: float = 0.1
    edge_per_layer: float = 0.05
    cloud_per_layer: float = 0.02
    device_to_edge: float = 0.2
    edge_to_cloud: float = 0.3
    device_to_cloud: float = 0.5
    device_to_cloud_tokens: float | None = None
    unit: str = "unit"
    source: str = "default SplitEE/DIMEC unit convention"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            # annotations are strings here (``from __future__ import annotations``); an optional cost may be None
            if f.type == "float | None" and value is None:
                continue
            if f.type in ("float", "float | None") and (
                not isinstance(value, (int, float)) or value < 0 or value != value
            ):
                raise ValueError(f"cost {f.name} must be a non-negative number, got {value!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> CostProfile:
        """Load a profile; unknown keys are an error so a typo never silently falls back to a default."""
        path = Path(path)
        raw = read_json_file(path, "cost profile")
        if not isinstance(raw, dict):
            raise ValueError(f"cost profile {path} must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"cost profile {path}: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**raw)

    @classmethod
    def load(cls, spec: str | Path) -> CostProfile:
        """A profile file, or a named one (:func:`named_profile_path`) when ``spec`` is no file."""
        path = Path(spec)
        if path.is_file() or path.suffix == ".json" or "/" in str(spec):
            return cls.from_json(path)
        return cls.from_json(named_profile_path(str(spec)))

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def token_hop(self) -> float:
        """The device→cloud hop of a token-id request: ``device_to_cloud_tokens``, else ``device_to_cloud``."""
        return self.device_to_cloud if self.device_to_cloud_tokens is None else self.device_to_cloud_tokens

    def tier_costs(self, split: SplitPoints) -> np.ndarray:
        """Cost of answering a sample on each tier, indexed by the TIER_* codes."""
        d, e, total, r = split.device, split.edge, split.total, split.router_depth
        device = d * self.device_per_layer
        edge = device + self.device_to_edge + (e - d) * self.edge_per_layer
        cloud_via_edge = edge + self.edge_to_cloud + (total - e) * self.cloud_per_layer
        # r = 0: nothing ran on the device, so the hard sample leaves as tokens (the all-cloud request)
        hop = self.device_to_cloud if r > 0 else self.token_hop
        cloud_direct = r * self.device_per_layer + hop + (total - r) * self.cloud_per_layer
        return np.array([device, edge, cloud_via_edge, cloud_direct], dtype=np.float64)

    def all_cloud_cost(self, split: SplitPoints) -> float:
        """The baseline: raw input sent to the cloud as token ids, nothing computed on the device."""
        return self.token_hop + split.total * self.cloud_per_layer


def _profile_folder() -> Path:
    # data, not code: the folder ships inside cartosplit.benchmarks (an image without it names no profiles)
    try:
        return Path(str(importlib.resources.files("cartosplit.benchmarks"))) / "results" / "device-profiles"
    except ModuleNotFoundError:
        return Path("/nonexistent")


def profile_names() -> list[str]:
    """The named profiles this install holds, as ``<device>-<link>[-mJ]`` (short device names where one exists)."""
    short = {full: alias for alias, full in reversed(DEVICE_ALIASES.items())}
    names = []
    for path in sorted(_profile_folder().glob("*--*--*.json")):
        device, link, unit = path.stem.split("--")
        names.append(f"{short.get(device, device)}-{link}" + ("" if unit == "ms" else f"-{unit}"))
    return names


def named_profile_path(name: str) -> Path:
    """``pi4-wifi`` (ms), ``pi4-lte-mJ``, ``raspberry-pi-5-wired``, or a file stem ``raspberry-pi-4--wifi--ms``."""
    match = _NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"cost profile {name!r} is neither a file nor a profile name (<device>-<link>[-mJ]; "
            f"links {', '.join(LINKS)}); named profiles: {', '.join(profile_names()) or 'none in this install'}"
        )
    device = DEVICE_ALIASES.get(match["device"], match["device"])
    path = _profile_folder() / f"{device}--{match['link']}--{match['unit'] or 'ms'}.json"
    if not path.is_file():
        raise ValueError(
            f"no cost profile named {name!r}; named profiles: {', '.join(profile_names()) or 'none in this install'}"
        )
    return path
