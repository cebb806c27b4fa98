"""Cost profiles from benchmark JSON: link maths, per-layer costs, energy labelling, and files calibrate can load."""

import json

import pytest

from cartosplit.benchmarks import cost_profile
from cartosplit.benchmarks.cost_profile import (
    DEFAULT_LINKS,
    LinkSpec,
    Selection,
    auto_length,
    build_mj_profile,
    build_ms_profile,
    compute_ms_per_layer,
    hop_bytes,
    token_request_bytes,
    transfer_ms,
)
from cartosplit.device_runtime.costs import CostProfile, SplitPoints

SPLIT = {"router_depth": 1, "device": 2, "edge": 4, "total": 6}


def row(tier, key, graph, p50, batch=1, length=32, threads=1, energy=None):
    r = {"tier": tier, "key": key, "graph": graph, "batch": batch, "length": length, "threads": threads}
    r |= {"p50_ms": p50, "mean_ms": p50 * 1.5}
    if energy is not None:
        r["energy"] = energy
    return r


@pytest.fixture
def latency():
    return {
        "command": "cartosplit bench latency ...",
        "machine": "x86_64 test box",
        "split_points": SPLIT,
        "settings": {"lengths": [32, 64, 128]},
        "rows": [
            row("device", "onnx-int8", "device_head+device_tail", 4.0),  # 2 layers -> 2 ms per layer
            row("device", "onnx-int8", "device_head+device_tail", 12.0, length=64),
            row("edge", "onnx-fp32", "edge", 6.0),  # 2 layers -> 3 ms
            row("cloud", "onnx-fp32", "cloud_from_4", 2.0),  # 2 layers -> 1 ms
            row("cloud", "onnx-fp32", "cloud_from_1", 5.0),
        ],
    }


@pytest.fixture
def wire():
    hops = {"device_to_edge": 10_000.0, "edge_to_cloud": 20_000.0, "device_to_cloud": 5_000.0}
    return {
        "command": "cartosplit bench bytes ...",
        "encodings": ["fp32", "fp16", "int8"],
        "tokens_mean": 24.2,
        "bytes": {hop: {"fp16": {"mean": n}, "fp32": {"mean": 2 * n}} for hop, n in hops.items()},
        # the all-cloud request: token ids, whatever the activation encoding
        "raw_input_bytes": {"text_utf8": {"mean": 100.0}, "token_ids_all_cloud": {"mean": 300.0}},
    }


def test_transfer_time_is_serialisation_plus_latency():
    assert transfer_ms(10_000, LinkSpec(10, 50)) == pytest.approx(8.0 + 50.0)  # 80,000 bits at 10 Mbit/s
    assert transfer_ms(0, LinkSpec(100, 30)) == 30.0
    with pytest.raises(ValueError):
        transfer_ms(-1, LinkSpec(10, 5))


@pytest.mark.parametrize(("args", "message"), [((0, 5), "bandwidth"), ((10, -1), "latency"), ((10, 5, -2), "radio")])
def test_bad_links_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        LinkSpec(*args)


def test_default_links_are_the_documented_ones():
    assert DEFAULT_LINKS["device_to_edge"] == LinkSpec(50, 5)
    assert DEFAULT_LINKS["edge_to_cloud"] == LinkSpec(100, 30)
    assert DEFAULT_LINKS["device_to_cloud"] == LinkSpec(10, 50)


def test_per_layer_costs_divide_each_slice_by_its_layers(latency):
    assert compute_ms_per_layer(latency, Selection()) == {"device": 2.0, "edge": 3.0, "cloud": 1.0}
    assert compute_ms_per_layer(latency, Selection(statistic="mean_ms"))["device"] == 3.0


def test_a_missing_measurement_is_a_clear_error(latency):
    with pytest.raises(ValueError, match="no edge row"):
        compute_ms_per_layer(latency, Selection(length=64))  # the device has length 64, the edge does not
    with pytest.raises(ValueError, match="no device row"):
        compute_ms_per_layer(latency, Selection(device_key="tflite-int8"))


def test_hop_bytes_pick_the_encoding_and_refuse_an_unknown_one(wire):
    assert hop_bytes(wire, "fp32")["edge_to_cloud"] == 40_000.0
    with pytest.raises(ValueError, match="no encoding"):
        hop_bytes(wire, "bf16")
    del wire["bytes"]["device_to_cloud"]  # r = 0: no hidden-state hop to the cloud
    assert hop_bytes(wire, "fp16")["device_to_cloud"] == 0.0


def test_ms_profile_has_the_measured_costs_and_says_where_they_come_from(latency, wire):
    profile = build_ms_profile(latency, wire, DEFAULT_LINKS, Selection())
    assert (profile.device_per_layer, profile.edge_per_layer, profile.cloud_per_layer) == (2.0, 3.0, 1.0)
    assert profile.device_to_edge == pytest.approx(10_000 * 8 / 50e6 * 1e3 + 5)
    assert profile.edge_to_cloud == pytest.approx(20_000 * 8 / 100e6 * 1e3 + 30)
    assert profile.device_to_cloud == pytest.approx(5_000 * 8 / 10e6 * 1e3 + 50)
    assert profile.unit == "ms" and "measured" in profile.source and "x86_64 test box" in profile.source
    costs = profile.tier_costs(SplitPoints(**SPLIT))
    assert costs[0] == pytest.approx(4.0)  # two device layers
    assert costs[1] == pytest.approx(4.0 + profile.device_to_edge + 2 * 3.0)


def test_ms_profile_prices_all_cloud_by_its_token_request(latency, wire):
    profile = build_ms_profile(latency, wire, DEFAULT_LINKS, Selection())
    token_hop = 300 * 8 / 10e6 * 1e3 + 50  # 300 B of token ids over 4G: 50.24 ms
    assert profile.device_to_cloud_tokens == pytest.approx(token_hop)
    assert profile.device_to_cloud == pytest.approx(5_000 * 8 / 10e6 * 1e3 + 50)  # the hidden state: 54 ms
    split = SplitPoints(**SPLIT)
    assert profile.all_cloud_cost(split) == pytest.approx(token_hop + 6 * 1.0)
    assert profile.tier_costs(split)[3] == pytest.approx(2.0 + profile.device_to_cloud + 5 * 1.0)  # r = 1
    assert "device_to_cloud_tokens 300 B" in profile.source
    # token ids do not go through the activation codec
    assert build_ms_profile(latency, wire, DEFAULT_LINKS, Selection(encoding="fp32")).device_to_cloud_tokens == (
        pytest.approx(token_hop)
    )


def test_a_bytes_report_without_the_token_request_is_a_clear_error(latency, wire):
    assert token_request_bytes(wire) == 300.0
    del wire["raw_input_bytes"]["token_ids_all_cloud"]
    with pytest.raises(ValueError, match=r"no raw_input_bytes\.token_ids_all_cloud\.mean"):
        build_ms_profile(latency, wire, DEFAULT_LINKS, Selection())
    del wire["raw_input_bytes"]
    with pytest.raises(ValueError, match="token_ids_all_cloud"):
        token_request_bytes(wire)


def test_mj_profile_estimates_device_energy_from_watts_and_labels_it(latency, wire):
    pi = {"active_w": {"all": 6.0}, "idle_w": 3.0}
    profile = build_mj_profile(latency, wire, DEFAULT_LINKS, Selection(), "raspberry-pi-4", pi)
    assert profile.unit == "mJ"
    assert profile.device_per_layer == pytest.approx(2.0 * 6.0)  # ms per layer x W = mJ
    assert profile.edge_per_layer == pytest.approx(3.0 * 3.0) and profile.cloud_per_layer == pytest.approx(1.0 * 3.0)
    assert profile.device_to_edge == pytest.approx(transfer_ms(10_000, DEFAULT_LINKS["device_to_edge"]) * 3.0)
    assert profile.device_to_cloud_tokens == pytest.approx(transfer_ms(300, DEFAULT_LINKS["device_to_cloud"]) * 3.0)
    assert "ESTIMATED" in profile.source and "not on the device" in profile.source
    assert "radio not included" in profile.source


def test_mj_profile_prefers_a_measured_figure_and_given_radio_power(latency, wire):
    latency["rows"][0]["energy"] = [{"label": "measured", "meter": "RAPL package-0", "mj_per_sample": 9.0}]
    links = dict(DEFAULT_LINKS, device_to_edge=LinkSpec(50, 5, radio_w=1.5), device_to_cloud=LinkSpec(10, 50, 2.0))
    phone = {"active_w": {"1": 1.8}, "idle_w": None}
    profile = build_mj_profile(latency, wire, links, Selection(), "phone", phone)
    assert profile.device_per_layer == pytest.approx(4.5) and "measured (RAPL package-0)" in profile.source
    assert profile.device_to_edge == pytest.approx(transfer_ms(10_000, links["device_to_edge"]) * 1.5)
    # the token request goes over the device-cloud link, so it takes that link's radio power
    assert profile.device_to_cloud_tokens == pytest.approx(transfer_ms(300, links["device_to_cloud"]) * 2.0)
    assert profile.edge_to_cloud == 0.0 and profile.edge_per_layer == 0.0  # watts above idle: waiting costs ~0


def test_auto_length_fits_the_mean_tokens(latency, wire):
    assert auto_length(latency, wire) == 32
    wire["tokens_mean"] = 40.0
    assert auto_length(latency, wire) == 64
    wire["tokens_mean"] = 500.0
    assert auto_length(latency, wire) == 128


def test_main_writes_profiles_that_calibrate_can_load(latency, wire, tmp_path, capsys):
    (tmp_path / "latency.json").write_text(json.dumps(latency))
    (tmp_path / "bytes.json").write_text(json.dumps(wire))
    argv = ["--latency", str(tmp_path / "latency.json"), "--bytes", str(tmp_path / "bytes.json")]
    argv += ["--device-cloud", "20,40", "--out-dir", str(tmp_path / "out")]
    assert cost_profile.main(argv) == 0
    ms = CostProfile.from_json(tmp_path / "out" / "cost-profile-ms.json")
    mj = CostProfile.from_json(tmp_path / "out" / "cost-profile-mJ.json")
    assert set(json.loads((tmp_path / "out" / "cost-profile-ms.json").read_text())) == set(CostProfile().to_dict())
    assert ms.unit == "ms" and mj.unit == "mJ"
    assert ms.device_to_cloud == pytest.approx(5_000 * 8 / 20e6 * 1e3 + 40)
    assert ms.device_to_cloud_tokens == pytest.approx(300 * 8 / 20e6 * 1e3 + 40)  # --device-cloud prices it too
    assert mj.device_to_cloud_tokens is not None
    printed = capsys.readouterr().out
    assert "cloud direct" in printed and "all-cloud" in printed


def test_main_refuses_an_unknown_power_profile(latency, wire, tmp_path):
    (tmp_path / "latency.json").write_text(json.dumps(latency))
    (tmp_path / "bytes.json").write_text(json.dumps(wire))
    argv = ["--latency", str(tmp_path / "latency.json"), "--bytes", str(tmp_path / "bytes.json")]
    with pytest.raises(SystemExit, match="no power profile"):
        cost_profile.main([*argv, "--power-profile", "toaster", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("pi4-wifi", "raspberry-pi-4--wifi--ms"),
        ("pi4-lte-mJ", "raspberry-pi-4--lte--mJ"),
        ("pi-zero-2w-wired", "raspberry-pi-zero-2-w--wired--ms"),
        ("raspberry-pi-5-wifi", "raspberry-pi-5--wifi--ms"),
        ("phone-lte", "phone-cortex-a76--lte--ms"),
        ("raspberry-pi-4--wifi--ms", "raspberry-pi-4--wifi--ms"),
    ],
)
def test_a_named_profile_loads_the_committed_cited_profile(name, stem):
    from cartosplit.device_runtime.costs import CostProfile, named_profile_path

    path = named_profile_path(name)
    assert path.stem == stem
    assert CostProfile.load(name) == CostProfile.from_json(path)


def test_an_unknown_profile_name_lists_the_known_ones(tmp_path):
    from cartosplit.device_runtime.costs import CostProfile, profile_names

    assert "pi4-wifi" in profile_names() and "pi5-lte-mJ" in profile_names()
    with pytest.raises(ValueError, match=r"no cost profile named 'pi9-wifi'.*pi4-wifi"):
        CostProfile.load("pi9-wifi")
    with pytest.raises(ValueError, match="neither a file nor a profile name"):
        CostProfile.load("fastest")
    with pytest.raises(ValueError, match="does not exist"):
        CostProfile.load(tmp_path / "missing.json")
