"""Device x link cost profiles: cited figures, the scaling they state, energy with and without radio, the CLI."""

from __future__ import annotations

import copy
import json

import pytest

from cartosplit.benchmarks import device_profiles
from cartosplit.benchmarks.device_profiles import (
    device_gflops,
    device_profile,
    load_specs,
    scaled_profile,
)
from cartosplit.device_runtime.costs import CostProfile

SPLIT = {"router_depth": 1, "device": 2, "edge": 4, "total": 6}
HOST = 20.0  # GFLOP/s, fixed so the tests need no timing

BASE = CostProfile(
    device_per_layer=1.0,
    edge_per_layer=2.0,
    cloud_per_layer=3.0,
    device_to_edge=9.0,
    edge_to_cloud=31.0,
    device_to_cloud=60.0,
    device_to_cloud_tokens=50.0,
    unit="ms",
    source="measured: a test box",
)
WIRE = {
    "split_points": SPLIT,
    "encodings": ["fp16"],
    "bytes": {hop: {"fp16": {"mean": 20_000.0}} for hop in ("device_to_edge", "edge_to_cloud", "device_to_cloud")},
    "raw_input_bytes": {"token_ids_all_cloud": {"mean": 320.0}},
}


def synthetic_spec() -> dict:
    device = {
        "device": "a test board",
        "compute": {"figure": "HPL", "gflops": 8.0, "cores": 4, "clock_scale": 1.0},
        "idle_w": 2.0,
        "active_w": {"all": 5.0},
        "how": "made up for the test",
        "sources": [{"url": "https://example.org/board", "what": "nothing"}],
    }
    link = {"bandwidth_mbit": 10.0, "latency_ms": 20.0, "radio_w": None, "how": "made up", "sources": device["sources"]}
    return {"devices": {"board": device}, "links": {"net": link}}


def profile(spec: dict, unit: str = "ms", **kw) -> CostProfile:
    return device_profile("board", "net", unit, host_gflops=HOST, spec=spec, base=BASE, wire=WIRE, **kw)


def test_every_device_and_link_is_cited_with_positive_figures():
    spec = load_specs()  # the committed file; load_specs raises on a missing url or a bad figure
    assert {"raspberry-pi-zero-2-w", "raspberry-pi-4", "raspberry-pi-5", "phone-cortex-a76"} <= set(spec["devices"])
    assert {"wifi", "lte", "wired"} <= set(spec["links"])
    for entry in [*spec["devices"].values(), *spec["links"].values()]:
        assert entry["how"] and entry["sources"]
        for source in entry["sources"]:
            assert source["url"].startswith("https://") and source["what"]
    for dev in spec["devices"].values():
        assert device_gflops(dev) > 0 and all(w > 0 for w in dev["active_w"].values())
        assert dev["idle_w"] is None or dev["idle_w"] > 0
    for link in spec["links"].values():
        assert link["bandwidth_mbit"] > 0 and link["latency_ms"] >= 0
        assert link["radio_w"] is None or link["radio_w"] > 0


def test_a_source_without_url_is_refused(tmp_path):
    spec = synthetic_spec()
    spec["links"]["net"]["sources"] = [{"what": "hearsay"}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="url"):
        load_specs(path)


def test_device_per_layer_is_the_gflops_ratio_and_a_device_twice_as_slow_doubles_it():
    spec = synthetic_spec()
    fast = profile(spec)
    assert fast.device_per_layer == pytest.approx(BASE.device_per_layer * HOST / (8.0 / 4))
    slow_spec = copy.deepcopy(spec)
    slow_spec["devices"]["board"]["compute"]["gflops"] = 4.0
    slow = profile(slow_spec)
    assert slow.device_per_layer == pytest.approx(2 * fast.device_per_layer)
    # the server side and edge->cloud stay the measured profile's
    for key in ("edge_per_layer", "cloud_per_layer", "edge_to_cloud"):
        assert getattr(slow, key) == getattr(BASE, key)


def test_hops_are_bytes_over_bandwidth_plus_latency_and_half_bandwidth_doubles_the_transfer():
    spec = synthetic_spec()
    full = profile(spec)
    assert full.device_to_edge == pytest.approx(20_000 * 8 / 10e6 * 1e3 + 20.0)
    assert full.device_to_cloud == pytest.approx(full.device_to_edge)  # both over the device's first hop
    assert full.device_to_cloud_tokens == pytest.approx(320 * 8 / 10e6 * 1e3 + 20.0)
    half_spec = copy.deepcopy(spec)
    half_spec["links"]["net"]["bandwidth_mbit"] = 5.0
    half = profile(half_spec)
    for hop in ("device_to_edge", "device_to_cloud", "device_to_cloud_tokens"):
        assert getattr(half, hop) - 20.0 == pytest.approx(2 * (getattr(full, hop) - 20.0))


def test_energy_uses_radio_watts_when_the_link_has_them_else_idle():
    spec = synthetic_spec()
    ms = profile(spec)
    no_radio = profile(spec, "mJ")
    assert no_radio.unit == "mJ"
    assert no_radio.device_per_layer == pytest.approx(ms.device_per_layer * 5.0)  # active watts
    assert no_radio.edge_per_layer == pytest.approx(ms.edge_per_layer * 2.0)  # the device waits at idle
    assert no_radio.edge_to_cloud == pytest.approx(ms.edge_to_cloud * 2.0)
    assert no_radio.device_to_edge == pytest.approx(ms.device_to_edge * 2.0)
    assert "radio not included" in no_radio.source
    spec["links"]["net"]["radio_w"] = 1.5
    radio = profile(spec, "mJ")
    for hop in ("device_to_edge", "device_to_cloud", "device_to_cloud_tokens"):
        assert getattr(radio, hop) == pytest.approx(getattr(ms, hop) * (2.0 + 1.5))  # idle + radio
    assert radio.edge_to_cloud == pytest.approx(ms.edge_to_cloud * 2.0)  # not the device's radio
    assert "radio 1.5 W" in radio.source


def test_watts_above_idle_make_waiting_free_and_a_hop_cost_only_its_radio():
    spec = synthetic_spec()
    spec["devices"]["board"]["idle_w"] = None
    spec["links"]["net"]["radio_w"] = 1.5
    ms, mj = profile(spec), profile(spec, "mJ")
    assert mj.edge_per_layer == mj.cloud_per_layer == mj.edge_to_cloud == 0.0
    assert mj.device_to_edge == pytest.approx(ms.device_to_edge * 1.5)


def test_scaled_profile_multiplies_the_device_layer_and_every_hop_only():
    p = scaled_profile(BASE, 3.0, 0.5)
    assert p.device_per_layer == pytest.approx(3.0)
    for hop in ("device_to_edge", "edge_to_cloud", "device_to_cloud", "device_to_cloud_tokens"):
        assert getattr(p, hop) == pytest.approx(getattr(BASE, hop) * 0.5)
    assert (p.edge_per_layer, p.cloud_per_layer, p.unit) == (BASE.edge_per_layer, BASE.cloud_per_layer, BASE.unit)
    untokened = CostProfile(device_to_cloud_tokens=None)
    assert scaled_profile(untokened, 2.0, 2.0).device_to_cloud_tokens is None  # still "same as device_to_cloud"
    with pytest.raises(ValueError):
        scaled_profile(BASE, -1.0, 1.0)


def test_cli_writes_loadable_profiles_and_an_index(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(device_profiles, "host_compute", lambda threads, n, repeats: calls.append(threads) or HOST)
    base, wire = tmp_path / "base.json", tmp_path / "bytes.json"
    base.write_text(json.dumps(BASE.to_dict()))
    wire.write_text(json.dumps(WIRE))
    out = tmp_path / "out"
    assert device_profiles.main(["--base", str(base), "--bytes", str(wire), "--out-dir", str(out)]) == 0
    spec = load_specs()
    files = sorted(p.name for p in out.glob("*--*.json"))
    assert len(files) == len(spec["devices"]) * len(spec["links"]) * 2
    for name in files:
        p = CostProfile.from_json(out / name)  # exactly CostProfile's fields
        assert p.unit == name.removesuffix(".json").rsplit("--", 1)[1]
    index = json.loads((out / "index.json").read_text())
    assert index["host_compute"]["gflops"] == HOST and index["machine"] and index["time"] and index["command"]
    assert sorted(r["file"] for r in index["profiles"]) == files
    assert index["base_measured_on_this_machine"] is False  # the base names "a test box"
    assert 1 in calls
    printed = capsys.readouterr().out
    assert "all-cloud" in printed and "raspberry-pi-5" in printed and "WARNING" in printed


def test_host_compute_measures_a_positive_figure_on_a_small_solve():
    assert device_profiles.host_compute(threads=1, n=64, repeats=1) > 0
    with pytest.raises(ValueError):
        device_profiles.host_compute(threads=0)
