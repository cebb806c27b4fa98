"""The latency benchmark's pure parts (FLOP count, power profiles, energy meters on a fake sysfs) and one
smoke run on the tiny bundle. Nothing here asserts a speed: timings live in benchmarks/results."""

import json
import os

import pytest

from cartosplit.benchmarks import latency
from cartosplit.benchmarks.latency import (
    EnergyMeter,
    encoder_layer_flops,
    estimate_energy,
    find_meters,
    graph_flops,
    graph_layers,
    intermediate_size,
    load_power_profiles,
    matmul_flops,
    profile_watts,
)
from cartosplit.benchmarks.timing import summarize_ms, time_calls
from cartosplit.device_runtime.bundle import load_bundle

SPLIT = {"router_depth": 1, "device": 2, "edge": 4, "total": 6}


# -- FLOPs ------------------------------------------------------------------------------------------------------


def test_one_minilm_layer_at_128_tokens_counts_every_matrix_product():
    # Q, K, V, O: 4 x 128x384 @ 384x384; scores and weights x V: 2 x 128x128x384; FFN: 128x384 @ 384x1536 and back
    macs = 4 * 128 * 384 * 384 + 2 * 128 * 128 * 384 + 2 * 128 * 384 * 1536
    assert encoder_layer_flops(1, 128, 384, 1536) == 2 * macs == 478_150_656


def test_flops_scale_linearly_in_batch_and_attention_quadratically_in_length():
    assert encoder_layer_flops(8, 64, 384, 1536) == 8 * encoder_layer_flops(1, 64, 384, 1536)
    linear = 4 * 2 * 384 * 384 + 2 * 2 * 384 * 1536  # per token
    for seq in (32, 64, 128):
        assert encoder_layer_flops(1, seq, 384, 1536) - seq * linear == 4 * seq * seq * 384


def test_heads_add_one_small_matrix_product_each():
    layers = matmul_flops(2, 16, 32, 64, layers=3)
    assert layers == 3 * encoder_layer_flops(2, 16, 32, 64)
    assert matmul_flops(2, 16, 32, 64, layers=3, head_outputs=(3, 2)) == layers + 2 * 2 * 32 * (3 + 2)
    assert matmul_flops(1, 8, 32, 64, layers=0, head_outputs=(2,)) == 2 * 32 * 2


def test_each_graph_gets_its_own_layers():
    assert graph_layers("device", SPLIT) == (2, ("router", "exit"))
    assert graph_layers("device_head", SPLIT) == (1, ("router",))
    assert graph_layers("device_tail", SPLIT) == (1, ("exit",))
    assert graph_layers("edge", SPLIT) == (2, ("exit",))
    assert graph_layers("cloud_from_4", SPLIT) == (2, ("exit",))
    assert graph_layers("cloud_from_1", SPLIT) == (5, ("exit",))
    assert graph_layers("full", SPLIT) == (6, ("exit",))
    head = graph_flops("device_head", SPLIT, 1, 32, 384, 1536, 2)
    tail = graph_flops("device_tail", SPLIT, 1, 32, 384, 1536, 2)
    assert graph_flops("device", SPLIT, 1, 32, 384, 1536, 2) == head + tail
    with pytest.raises(ValueError, match="unknown graph"):
        graph_layers("router", SPLIT)


def test_flops_refuse_empty_shapes():
    with pytest.raises(ValueError, match="seq"):
        encoder_layer_flops(1, 0, 384, 1536)
    with pytest.raises(ValueError, match="layers"):
        matmul_flops(1, 8, 32, 64, layers=-1)


def test_feed_forward_width_is_read_from_the_exported_weights(bundle):
    b = load_bundle(bundle)
    width, how = intermediate_size(b.graph_file("edge", "onnx-fp32"), b.manifest.model.hidden_size)
    assert (width, "read from" in how) == (64, True)  # the tiny BERT: hidden 32, intermediate 2 x 32


def test_feed_forward_width_falls_back_to_four_times_hidden_and_says_so(tmp_path):
    width, how = intermediate_size(tmp_path / "missing.onnx", 384)
    assert width == 1536 and "4 x hidden" in how


# -- timing helpers ---------------------------------------------------------------------------------------------


def test_timed_loop_runs_at_least_the_minimum_and_summarises_percentiles():
    calls = []
    timed = time_calls(lambda: calls.append(1) or len(calls), min_runs=7, min_seconds=0, warmup=3)
    assert len(calls) == 10 and len(timed.ms) == 7 and timed.results == list(range(4, 11))
    stats = summarize_ms([1.0, 2.0, 3.0, 4.0, 100.0])
    assert stats["p50_ms"] == 3.0 and stats["mean_ms"] == 22.0 and stats["runs"] == 5
    assert 4.0 < stats["p95_ms"] < 100.0
    with pytest.raises(ValueError):
        summarize_ms([])


# -- power profiles -----------------------------------------------------------------------------------------------


def test_committed_power_profiles_cite_a_source_for_every_device():
    profiles = load_power_profiles()
    assert {"raspberry-pi-4", "raspberry-pi-5", "phone-cortex-a73"} <= set(profiles)
    for profile in profiles.values():
        assert all(s["url"].startswith("https://") for s in profile["sources"])
        assert profile["basis"]


def test_watts_are_picked_by_busy_cores_and_say_when_they_are_an_upper_bound():
    phone = {"active_w": {"1": 1.8, "2": 2.8, "4": 5.3}}
    assert profile_watts(phone, 2) == (2.8, "2-core figure")
    watts, which = profile_watts(phone, 3)
    assert watts == 5.3 and "upper bound" in which
    watts, which = profile_watts(phone, 8)
    assert watts == 5.3 and "more cores busy" in which
    watts, which = profile_watts({"active_w": {"all": 6.12}}, 1)
    assert watts == 6.12 and "all-core" in which and "upper bound" in which


def test_an_estimate_is_labelled_and_is_time_times_watts():
    profile = {"active_w": {"all": 5.0}, "basis": "board"}
    e = estimate_energy(mean_ms=10.0, batch=8, name="pi", profile=profile, threads=1)
    assert e["label"] == "estimated" and e["profile"] == "pi"
    assert e["mj_per_call"] == pytest.approx(50.0) and e["mj_per_sample"] == pytest.approx(6.25)
    assert "not measured" in e["basis"]


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"active_w": {"all": 5.0}, "sources": []}, "cites no source"),
        ({"active_w": {"all": 0}, "sources": [{"url": "https://x"}]}, "positive"),
        ({"active_w": {"some": 5.0}, "sources": [{"url": "https://x"}]}, "core count"),
        ({"sources": [{"url": "https://x"}]}, "needs active_w"),
        ({"active_w": {"1": 2.0}, "idle_w": -1, "sources": [{"url": "https://x"}]}, "idle_w"),
    ],
)
def test_bad_power_profiles_are_refused(tmp_path, profile, message):
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"profiles": {"dev": profile}}))
    with pytest.raises(ValueError, match=message):
        load_power_profiles(path)


def test_missing_or_broken_profile_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="do not exist"):
        load_power_profiles(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_power_profiles(tmp_path / "bad.json")


# -- meters on a fake sysfs ---------------------------------------------------------------------------------------


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_rapl(root, energy_uj=1_000_000, wrap=10_000_000):
    package = root / "sys/class/powercap/intel-rapl:0"
    _write(package / "energy_uj", f"{energy_uj}\n")
    _write(package / "max_energy_range_uj", f"{wrap}\n")
    _write(package / "name", "package-0\n")
    _write(root / "sys/class/powercap/intel-rapl:0:0/energy_uj", "5\n")  # a sub-domain: inside the package
    return package / "energy_uj"


def test_no_meter_on_an_empty_tree(tmp_path):
    assert find_meters(tmp_path) == []


def test_rapl_packages_are_found_and_subdomains_and_unreadable_counters_skipped(tmp_path):
    fake_rapl(tmp_path)
    _write(tmp_path / "sys/class/powercap/intel-rapl:1/energy_uj", "permission denied\n")
    (meter,) = find_meters(tmp_path)
    assert meter.kind == "rapl" and [p.parent.name for p in meter.paths] == ["intel-rapl:0"]
    assert "package-0" in meter.description and meter.wrap_uj == [10_000_000]


def test_rapl_energy_is_the_counter_delta_even_across_a_wrap(tmp_path):
    counter = fake_rapl(tmp_path, energy_uj=9_500_000)
    meter = EnergyMeter(find_meters(tmp_path)[0])
    meter.start()
    counter.write_text("9900000\n")
    assert meter.stop() == pytest.approx(0.4)
    meter.start()
    counter.write_text("300000\n")  # wrapped at 10 J
    assert meter.stop() == pytest.approx(0.4)


def test_ina_power_sensors_are_found_other_hwmon_chips_are_not(tmp_path):
    _write(tmp_path / "sys/class/hwmon/hwmon0/name", "coretemp\n")
    _write(tmp_path / "sys/class/hwmon/hwmon0/power1_input", "1000\n")
    _write(tmp_path / "sys/class/hwmon/hwmon1/name", "ina219\n")
    _write(tmp_path / "sys/class/hwmon/hwmon1/power1_input", "2000000\n")
    (meter,) = find_meters(tmp_path)
    assert meter.kind == "hwmon" and "ina219" in meter.description


def test_hwmon_power_is_integrated_over_the_samples(tmp_path):
    _write(tmp_path / "sys/class/hwmon/hwmon1/name", "ina2xx\n")
    _write(tmp_path / "sys/class/hwmon/hwmon1/power1_input", "2000000\n")  # microwatts: 2 W
    meter = EnergyMeter(find_meters(tmp_path)[0], interval_s=0.001)
    meter.start()
    sum(range(200_000))
    joules = meter.stop()
    first, last = meter._samples[0][0], meter._samples[-1][0]
    assert len(meter._samples) >= 2 and joules == pytest.approx(2.0 * (last - first))


# -- the benchmark, end to end on the tiny bundle --------------------------------------------------------------------


def test_latency_smoke_run_on_the_tiny_bundle(bundle, calibrated_run, tmp_path):
    out = tmp_path / "latency"
    argv = ["--bundle", str(bundle), "--run", str(calibrated_run), "--threads", "1", "--batches", "1,2"]
    argv += ["--lengths", "8,16", "--runs", "2", "--min-seconds", "0", "--warmup", "0", "--gemm-n", "64"]
    argv += ["--gemm-repeats", "2", "--energy", "--sysfs-root", str(tmp_path / "no-meters"), "--out", str(out)]
    assert latency.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"].startswith("cartosplit bench latency --bundle")
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0

    device = [r for r in report["rows"] if r["tier"] == "device"]
    assert {r["key"] for r in device} == {"torch-fp32", "onnx-fp32", "onnx-int8"}
    assert len(device) == 3 * 2 * 2  # runtimes x batches x lengths
    for row in device:
        assert row["runs"] >= 2 and row["p95_ms"] >= row["p50_ms"] > 0 and row["gflops_p50"] > 0
        assert row["flops"] == graph_flops("device", report["split_points"], row["batch"], row["length"], 32, 64, 2)
        assert [e["label"] for e in row["energy"]] == ["estimated"] * 3
    torch_rows = [r for r in device if r["key"] == "torch-fp32"]
    assert all(r["max_abs_logit_diff_vs_onnx_fp32"] < 1e-4 for r in torch_rows)  # the same computation
    servers = {(r["graph"], r["precision"]) for r in report["rows"] if r["tier"] != "device"}
    assert servers == {(g, p) for g in ("edge", "cloud_from_2", "cloud_from_1", "full") for p in ("fp32", "int8")}
    assert {s["what"] for s in report["skipped"]} == {"tflite-fp32 device slice", "tflite-int8 device slice"}
    assert len(report["int8_vs_torch"]) == 4 and all("onnx-int8_over_torch" in e for e in report["int8_vs_torch"])
    (setting,) = report["thread_settings"]
    assert setting["threads"] == 1 and len(setting["pinned_cores"]) == (1 if hasattr(os, "sched_setaffinity") else 0)
    assert "ESTIMATED" in report["energy"]


def test_latency_uses_a_readable_meter_and_labels_it_measured(bundle, tmp_path):
    fake_rapl(tmp_path / "sys")
    out = tmp_path / "latency"
    argv = ["--bundle", str(bundle), "--threads", "1", "--batches", "1", "--lengths", "8", "--runs", "1"]
    argv += ["--min-seconds", "0", "--warmup", "0", "--gemm-n", "32", "--gemm-repeats", "1", "--energy"]
    argv += ["--sysfs-root", str(tmp_path / "sys"), "--out", str(out)]
    assert latency.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["energy"].startswith("MEASURED")
    device = [r for r in report["rows"] if r["tier"] == "device"]
    assert device and all(r["energy"][0]["label"] == "measured" for r in device)
    assert report["skipped"][0]["what"] == "torch-fp32 device slice"  # no --run
    assert report["int8_vs_torch"] == []
