"""Energy for the benchmarks: meters read from sysfs, and estimates from cited power profiles. Torch-free.

Meters (:func:`find_meters`, all under a ``root`` so tests use a fake tree):

- ``rapl``: Linux powercap package counters, ``/sys/class/powercap/intel-rapl:N/energy_uj`` (x86; the whole
  package, every process on it). Read twice, differenced, with the counter's wrap.
- ``hwmon``: an INA2xx power sensor under hwmon (``name`` ina219, ina226, ina2xx, ...) with ``power*_input``
  (microwatts), e.g. a USB power meter HAT on a Pi.
- ``hwmon-iv``: an INA3221 (or any INA2xx without a power file): ``curr*_input`` (mA) x ``in*_input`` (mV)
  per channel.
- ``power_supply``: a battery or supply under ``/sys/class/power_supply/*`` with ``power_now`` (uW), or
  ``current_now`` (uA) x ``voltage_now`` (uV): phones and laptops on battery.

Sampled meters (all but RAPL) are read every ``interval_s`` on a thread and integrated (trapezoid rule).

Estimates (no meter): measured time x a device's active watts from ``benchmarks/power_profiles.json`` or the
devices of ``benchmarks/device_profiles.json`` (each figure cited there). Every figure says "estimated".
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cartosplit.device_runtime.json_checks import read_json_file

POWER_PROFILES = Path(__file__).with_name("power_profiles.json")
DEVICE_PROFILES = Path(__file__).with_name("device_profiles.json")
INA_NAME = re.compile(r"ina\d+.*")  # ina219, ina226, ina2xx, ina3221, ... (hwmon "name" files)
SAMPLED = ("hwmon", "hwmon-iv", "power_supply")


# -- meters ----------------------------------------------------------------------------------------------------


@dataclass
class MeterSpec:
    kind: str  # "rapl", "hwmon" (power inputs), "hwmon-iv" (current x voltage), "power_supply"
    paths: list[Path]  # rapl: energy_uj; hwmon: power*_input; power_supply: power_now, or current_now
    description: str
    wrap_uj: list[int] = field(default_factory=list)  # rapl: max_energy_range_uj per counter
    # hwmon-iv / power_supply with current x voltage: the voltage file of each path, in the same order
    voltages: list[Path] = field(default_factory=list)


def _readable_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _name(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def _rapl(root: Path) -> list[MeterSpec]:
    counters, wraps, names = [], [], []
    for domain in sorted((root / "sys/class/powercap").glob("intel-rapl:*")):
        if not re.fullmatch(r"intel-rapl:\d+", domain.name):  # sub-domains (core, dram) are inside a package
            continue
        if _readable_int(domain / "energy_uj") is None:
            continue
        counters.append(domain / "energy_uj")
        wraps.append(_readable_int(domain / "max_energy_range_uj") or 0)
        names.append(_name(domain / "name") or domain.name)
    if not counters:
        return []
    return [MeterSpec("rapl", counters, "RAPL " + " + ".join(names) + " (whole package(s))", wraps)]


def _hwmon(root: Path) -> list[MeterSpec]:
    found = []
    for hwmon in sorted((root / "sys/class/hwmon").glob("hwmon*")):
        name = _name(hwmon / "name")
        if not INA_NAME.fullmatch(name):
            continue
        inputs = [p for p in sorted(hwmon.glob("power*_input")) if _readable_int(p) is not None]
        if inputs:
            found.append(MeterSpec("hwmon", inputs, f"{name} power sensor ({hwmon.name}: {len(inputs)} input(s))"))
            continue
        # INA3221: three channels of shunt current (curr<N>_input, mA) and bus voltage (in<N>_input, mV)
        currents, volts = [], []
        for current in sorted(hwmon.glob("curr*_input")):
            channel = current.name[len("curr") : -len("_input")]
            voltage = hwmon / f"in{channel}_input"
            if _readable_int(current) is not None and _readable_int(voltage) is not None:
                currents.append(current)
                volts.append(voltage)
        if currents:
            found.append(
                MeterSpec(
                    "hwmon-iv",
                    currents,
                    f"{name} current x bus voltage ({hwmon.name}: {len(currents)} channel(s))",
                    voltages=volts,
                )
            )
    return found


def _power_supply(root: Path) -> list[MeterSpec]:
    found = []
    for supply in sorted((root / "sys/class/power_supply").glob("*")):
        kind = _name(supply / "type") or "supply"
        if _name(supply / "status") in ("Charging", "Full", "Not charging"):
            continue  # on a charger the battery's current is not what the board draws
        if _readable_int(supply / "power_now") is not None:
            found.append(MeterSpec("power_supply", [supply / "power_now"], f"{supply.name} ({kind}) power_now"))
        elif _readable_int(supply / "current_now") is not None and _readable_int(supply / "voltage_now") is not None:
            found.append(
                MeterSpec(
                    "power_supply",
                    [supply / "current_now"],
                    f"{supply.name} ({kind}) current_now x voltage_now",
                    voltages=[supply / "voltage_now"],
                )
            )
    return found


def find_meters(root: str | Path = "/") -> list[MeterSpec]:
    """Readable energy meters under ``root`` (a fake tree in tests), best first: RAPL, INA2xx hwmon, power_supply."""
    root = Path(root)
    return [*_rapl(root), *_hwmon(root), *_power_supply(root)]


class EnergyMeter:
    """Joules between ``start()`` and ``stop()``: RAPL counter deltas, or sampled watts integrated over time."""

    def __init__(self, spec: MeterSpec, interval_s: float = 0.005) -> None:
        self.spec = spec
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_uj: list[int] = []
        self._samples: list[tuple[float, float]] = []
        self._started = 0.0
        self.span_s = 0.0  # what the last stop() covered, in seconds

    def _power_w(self) -> float:
        spec = self.spec
        if spec.kind == "hwmon" or (spec.kind == "power_supply" and not spec.voltages):
            return sum((_readable_int(p) or 0) for p in spec.paths) / 1e6  # microwatts
        scale = 1e-6 if spec.kind == "hwmon-iv" else 1e-12  # mA x mV = uW; uA x uV = pW
        # a discharging battery may report a negative current (the sign convention varies by driver)
        return sum(
            abs((_readable_int(i) or 0) * (_readable_int(v) or 0)) * scale
            for i, v in zip(spec.paths, spec.voltages, strict=True)
        )

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._samples.append((time.perf_counter(), self._power_w()))
            self._stop.wait(self.interval_s)

    def start(self) -> None:
        self._started = time.perf_counter()
        if self.spec.kind == "rapl":
            self._start_uj = [_readable_int(p) or 0 for p in self.spec.paths]
            return
        self._samples = [(time.perf_counter(), self._power_w())]
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> float:
        if self.spec.kind == "rapl":
            total = 0
            for path, before, wrap in zip(self.spec.paths, self._start_uj, self.spec.wrap_uj, strict=True):
                after = _readable_int(path) or 0
                total += after - before if after >= before else after + wrap - before  # the counter wrapped
            self.span_s = time.perf_counter() - self._started
            return total / 1e6
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._samples.append((time.perf_counter(), self._power_w()))
        times = np.array([t for t, _ in self._samples])
        self.span_s = float(times[-1] - times[0])
        watts = np.array([w for _, w in self._samples])
        return float(np.sum((watts[1:] + watts[:-1]) / 2 * np.diff(times)))  # trapezoid rule


def idle_watts(meter: EnergyMeter, seconds: float = 1.0) -> float:
    """The meter's mean power while this process sleeps for ``seconds`` (the rest of the board still runs)."""
    meter.start()
    time.sleep(seconds)
    joules = meter.stop()
    return joules / max(meter.span_s, 1e-9)


# -- power profiles (estimates) ---------------------------------------------------------------------------------


def load_power_profiles(path: str | Path = POWER_PROFILES) -> dict[str, dict]:
    """Profiles by name, checked: positive watts keyed by core count or "all", and at least one cited source."""
    path = Path(path)
    raw = read_json_file(path, "power profiles", plural=True)
    profiles = raw.get("profiles") if isinstance(raw, dict) else None
    if not isinstance(profiles, dict) or not profiles:
        raise ValueError(f"{path}: expected an object with a non-empty 'profiles' object")
    for name, profile in profiles.items():
        check_profile(name, profile, str(path))
    return profiles


def check_profile(name: str, profile: dict, where: str) -> None:
    active = profile.get("active_w")
    if not isinstance(active, dict) or not active:
        raise ValueError(f"{where}: profile {name!r} needs active_w, e.g. {{'all': 6.1}} or {{'1': 1.8}}")
    for key, watts in active.items():
        if key != "all" and not (key.isdigit() and int(key) >= 1):
            raise ValueError(f"{where}: profile {name!r}: active_w key {key!r} is not a core count or 'all'")
        if not isinstance(watts, (int, float)) or not watts > 0:
            raise ValueError(f"{where}: profile {name!r}: active_w[{key!r}] must be a positive number of watts")
    idle = profile.get("idle_w")
    if idle is not None and (not isinstance(idle, (int, float)) or idle < 0):
        raise ValueError(f"{where}: profile {name!r}: idle_w must be null or >= 0")
    sources = profile.get("sources")
    if not isinstance(sources, list) or not sources or not all(s.get("url") for s in sources):
        raise ValueError(f"{where}: profile {name!r} cites no source (each source needs a url)")


def all_power_profiles(
    power_path: str | Path = POWER_PROFILES, device_path: str | Path = DEVICE_PROFILES
) -> dict[str, dict]:
    """power_profiles.json's profiles, then device_profiles.json's devices it lacks (same active_w/idle_w/sources)."""
    profiles = dict(load_power_profiles(power_path))
    try:
        devices = json.loads(Path(device_path).read_text(encoding="utf-8")).get("devices", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        devices = {}
    for name, device in devices.items():
        if name in profiles:
            continue
        profile = {
            "device": device.get("device", name),
            "basis": device.get("how", "")[:200] or "see benchmarks/device_profiles.json",
            "idle_w": device.get("idle_w"),
            "active_w": device.get("active_w"),
            "sources": device.get("sources"),
            "from": str(Path(device_path).name),
        }
        check_profile(name, profile, str(device_path))
        profiles[name] = profile
    return profiles


# board names (the Model line of /proc/cpuinfo, or /proc/device-tree/model) -> profile
BOARD_PROFILES = (
    (re.compile(r"raspberry pi zero 2", re.I), "raspberry-pi-zero-2-w"),
    (re.compile(r"raspberry pi 4|raspberry pi compute module 4|raspberry pi 400", re.I), "raspberry-pi-4"),
    (re.compile(r"raspberry pi 5|raspberry pi compute module 5|raspberry pi 500", re.I), "raspberry-pi-5"),
)


def profile_for_board(board: str | None, profiles: dict[str, dict]) -> str | None:
    """The profile of this board, when its name says which (a Raspberry Pi); None otherwise."""
    if not board:
        return None
    for pattern, name in BOARD_PROFILES:
        if pattern.search(board) and name in profiles:
            return name
    return None


def profile_watts(profile: dict, threads: int) -> tuple[float, str]:
    """Active watts for ``threads`` busy cores, and which figure that is.

    An exact core count if the profile has one; else the next larger count, or the all-core figure (an
    upper bound for fewer cores); else the largest count given.
    """
    active = profile["active_w"]
    if str(threads) in active:
        return float(active[str(threads)]), f"{threads}-core figure"
    counts = sorted(int(k) for k in active if k != "all")
    above = [c for c in counts if c > threads]
    if above:
        return float(active[str(above[0])]), f"{above[0]}-core figure for {threads} thread(s) (upper bound)"
    if "all" in active:
        return float(active["all"]), f"all-core figure for {threads} thread(s) (upper bound)"
    return float(active[str(counts[-1])]), f"{counts[-1]}-core figure for {threads} thread(s) (more cores busy)"


def estimate_energy(mean_ms: float, batch: int, name: str, profile: dict, threads: int) -> dict:
    """An ESTIMATED figure: this machine's mean call time x the profile's active watts (ms x W = mJ)."""
    watts, which = profile_watts(profile, threads)
    per_call = mean_ms * watts
    return {
        "label": "estimated",
        "profile": name,
        "watts": watts,
        "watts_figure": which,
        "basis": f"mean time on this machine x {name} active watts ({profile.get('basis', '')}); not measured there",
        "mj_per_call": per_call,
        "mj_per_sample": per_call / batch,
    }
