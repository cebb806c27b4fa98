"""``cartosplit bench device``: meters on a fake sysfs, its pure parts, a run on the tiny bundle (also with torch and
matplotlib blocked, as on a device install), the cost profile it writes, and the runtime's auto format and
low-memory settings. Nothing here asserts a speed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cartosplit.benchmarks import device_bench
from cartosplit.benchmarks.energy import (
    EnergyMeter,
    all_power_profiles,
    find_meters,
    idle_watts,
    profile_for_board,
)
from cartosplit.device_runtime.costs import CostProfile
from cartosplit.device_runtime.cpu_features import parse_cpuinfo
from cartosplit.device_runtime.onnx_backend import MEMORY_PRESETS
from cartosplit.device_runtime.runtime import DeviceRuntime
from tests.test_cpu_features import EPYC_AVX2, PI4_A72

KEYS = (
    "bundle_bytes", "loaded_bytes", "peak_rss_mb", "torch_installed", "matplotlib_installed", "formats", "cpu",
    "energy", "cold_start", "advice", "machine", "command",
)  # fmt: skip
FAST = ["--threads", "1", "--lengths", "8", "--runs", "2", "--min-seconds", "0", "--warmup", "0"]
FAST += ["--inputs", "3", "--cold-runs", "1", "--idle-seconds", "0"]


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- meters on a fake sysfs -------------------------------------------------------------------------------------


def test_an_ina3221_is_read_as_current_times_voltage_per_channel(tmp_path):
    hwmon = tmp_path / "sys/class/hwmon/hwmon2"
    _write(hwmon / "name", "ina3221\n")
    _write(hwmon / "curr1_input", "500\n")  # mA
    _write(hwmon / "in1_input", "5000\n")  # mV: 2.5 W
    _write(hwmon / "curr2_input", "100\n")
    _write(hwmon / "in2_input", "3300\n")  # 0.33 W
    _write(hwmon / "curr3_input", "7\n")  # no voltage for channel 3: not counted
    (meter,) = find_meters(tmp_path)
    assert meter.kind == "hwmon-iv" and "ina3221" in meter.description and len(meter.paths) == 2
    assert EnergyMeter(meter)._power_w() == pytest.approx(2.83)


def test_a_battery_is_a_meter_unless_it_is_charging(tmp_path):
    battery = tmp_path / "sys/class/power_supply/battery"
    _write(battery / "type", "Battery\n")
    _write(battery / "status", "Discharging\n")
    _write(battery / "current_now", "-400000\n")  # uA, negative while discharging on some drivers
    _write(battery / "voltage_now", "3800000\n")  # uV: 1.52 W
    _write(tmp_path / "sys/class/power_supply/usb/power_now", "2000000\n")  # a supply with power_now: 2 W
    meters = find_meters(tmp_path)
    assert [m.kind for m in meters] == ["power_supply", "power_supply"]
    assert EnergyMeter(meters[0])._power_w() == pytest.approx(1.52)
    assert EnergyMeter(meters[1])._power_w() == pytest.approx(2.0)
    _write(battery / "status", "Charging\n")
    assert [m.paths[0].parent.name for m in find_meters(tmp_path)] == ["usb"]


def test_meters_are_ranked_rapl_first_and_idle_power_is_a_mean(tmp_path):
    _write(tmp_path / "sys/class/power_supply/usb/power_now", "2000000\n")
    _write(tmp_path / "sys/class/hwmon/hwmon1/name", "ina219\n")
    _write(tmp_path / "sys/class/hwmon/hwmon1/power1_input", "3000000\n")
    _write(tmp_path / "sys/class/powercap/intel-rapl:0/energy_uj", "1000\n")
    assert [m.kind for m in find_meters(tmp_path)] == ["rapl", "hwmon", "power_supply"]
    ina = EnergyMeter(find_meters(tmp_path)[1], interval_s=0.002)
    assert idle_watts(ina, 0.05) == pytest.approx(3.0)


def test_estimates_cover_both_cited_files_and_a_pi_is_found_by_name():
    profiles = all_power_profiles()
    assert {"raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2-w", "phone-cortex-a76"} <= set(profiles)
    assert all(p["sources"] for p in profiles.values())
    assert profile_for_board("Raspberry Pi 4 Model B Rev 1.4", profiles) == "raspberry-pi-4"
    assert profile_for_board("Raspberry Pi Zero 2 W Rev 1.0", profiles) == "raspberry-pi-zero-2-w"
    assert profile_for_board("Raspberry Pi 5 Model B Rev 1.0", profiles) == "raspberry-pi-5"
    assert profile_for_board("Pine64 RockPro64", profiles) is None and profile_for_board(None, profiles) is None


# -- pure parts --------------------------------------------------------------------------------------------------


def test_lengths_come_from_real_token_counts_or_the_defaults_capped():
    counts = [5, 8, 9, 10, 11, 12, 14, 20, 31, 200]
    assert device_bench.lengths_seen(counts, 128) == [8, 12, 41, 128]  # p10, p50, p90 (linear), longest (capped)
    assert device_bench.capped_lengths([16, 32, 64, 128], 32) == [16, 32]
    assert device_bench.capped_lengths([64, 128], 32) == [32]
    assert device_bench.nearest([16, 64, 128], 32) == 16


def test_texts_are_read_from_text_or_json_lines(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text('a plain line\n\n{"text": "a json line"}\n{"label": 1}\n')
    assert device_bench.read_texts(path) == ["a plain line", "a json line"]
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        device_bench.read_texts(tmp_path / "empty.txt")


def test_advice_names_the_fastest_format_and_why():
    def table(*p50s):
        return {"rows": [{"length": 32, "threads": t, "p50_ms": ms, "p90_ms": ms} for t, ms in p50s]}

    formats = {"onnx-int8": table((1, 4.0), (2, 3.0)), "onnx-fp32": table((1, 6.0), (2, 4.5))}
    cpu = parse_cpuinfo(EPYC_AVX2, "x86_64")
    advice = device_bench.advise(formats, 32, cpu)
    assert (advice["format"], advice["threads"], advice["p50_ms"]) == ("onnx-int8", 2, 3.0)
    assert "1.50x the speed of fp32" in advice["why"] and "without VNNI" in advice["why"]
    formats["onnx-fp32"] = table((1, 2.0))
    assert "int8 slower than fp32" in device_bench.advise(formats, 32, cpu)["why"]


# -- the benchmark on the tiny bundle --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-device") / "device"
    cpuinfo = out.parent / "cpuinfo"
    cpuinfo.write_text(PI4_A72)  # a Pi 4's features and board: the estimate uses its profile
    argv = ["--bundle", str(bundle), *FAST, "--memory", "default,low", "--cpuinfo", str(cpuinfo)]
    argv += ["--sysfs-root", str(out.parent / "no-meters"), "--out", str(out)]
    assert device_bench.main(argv) == 0
    return out, json.loads(out.with_suffix(".json").read_text())


def test_the_report_has_its_keys_and_measures_every_format(result, bundle):
    out, r = result
    assert set(KEYS) <= set(r)
    assert r["command"].startswith("cartosplit bench device --bundle")
    assert set(r["formats"]) == {"onnx-int8", "onnx-fp32"}  # what the tiny bundle holds
    for table in r["formats"].values():
        assert table["threads"] == [1] and table["lengths"] == [8]
        (row,) = table["rows"]
        assert row["p90_ms"] >= row["p50_ms"] > 0 and row["head_p50_ms"] > 0 and row["tail_p50_ms"] > 0
        assert row["energy"][0]["label"] == "estimated"
    assert r["bundle_bytes"] > r["loaded_bytes"] > 0  # the device opens its graphs, not the edge's or cloud's
    assert r["cpu"]["model"] == "ARM Cortex-A72 (0x41:0xd08)" and r["cpu"]["features"]["asimddp"] is False
    assert r["advice"]["format"] in r["formats"] and r["advice"]["why"]
    assert r["energy"]["label"] == "estimated" and r["energy"]["profile"] == "raspberry-pi-4"
    assert out.with_suffix(".md").read_text().startswith("# Device benchmark")


def test_cold_start_and_peak_memory_come_from_fresh_processes(result):
    _, r = result
    assert {(m["format"], m["memory"]) for m in r["memory"]} == {("onnx-int8", "default"), ("onnx-int8", "low")}
    for m in r["memory"]:
        assert m["peak_rss_mb"] > 10 and m["inputs"] == 3 and m["heavy_modules_loaded"] == []
        assert m["cold_start_ms"] >= sum(v for k, v in m["phases_ms"].items() if k != "first_answer")
    assert r["peak_rss_mb"] == next(m["peak_rss_mb"] for m in r["memory"] if m["memory"] == "default")
    assert r["cold_start"]["format"] == "onnx-int8" and r["cold_start"]["cold_start_ms"] > 0


def test_the_cost_profiles_load_as_calibrate_reads_them(result, bundle):
    _, r = result
    ms = CostProfile.from_json(r["cost_profiles"]["ms"]["path"])
    mj = CostProfile.from_json(r["cost_profiles"]["mJ"]["path"])
    assert (ms.unit, mj.unit) == ("ms", "mJ")
    row = device_bench.best_row(r["formats"][r["advice"]["format"]], r["advice"]["length"])
    assert ms.device_per_layer == pytest.approx(row["p50_ms"] / r["split_points"]["device"])
    assert "measured here" in ms.source and "SCALED" in ms.source  # the tiny bundle's profile is in units
    assert mj.device_per_layer > 0 and "raspberry-pi-4" in mj.source


def test_a_base_profile_in_ms_is_kept_and_priced_at_idle_watts_in_mj(bundle, tmp_path):
    base = CostProfile(1.0, 0.5, 0.25, 7.0, 30.0, 50.0, 52.0, unit="ms", source="workstation")
    (tmp_path / "base.json").write_text(json.dumps(base.to_dict()))
    out = tmp_path / "device"
    argv = ["--bundle", str(bundle), *FAST, "--inputs", "0", "--formats", "onnx-int8", "--power-profile"]
    argv += ["raspberry-pi-4", "--base-profile", str(tmp_path / "base.json"), "--out", str(out)]
    argv += ["--sysfs-root", str(tmp_path / "none")]
    assert device_bench.main(argv) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["memory"] == [] and r["peak_rss_mb"] is None  # --inputs 0: no cold-start processes
    ms = CostProfile.from_json(f"{out}-cost-ms.json")
    assert (ms.edge_per_layer, ms.device_to_edge, ms.device_to_cloud_tokens) == (0.5, 7.0, 52.0)
    mj = CostProfile.from_json(f"{out}-cost-mJ.json")
    assert mj.edge_per_layer == pytest.approx(0.5 * 3.06)  # the Pi 4's cited idle watts x the base's ms


def test_a_meter_makes_the_energy_measured(bundle, tmp_path):
    _write(tmp_path / "sys/sys/class/hwmon/hwmon0/name", "ina226\n")
    _write(tmp_path / "sys/sys/class/hwmon/hwmon0/power1_input", "2500000\n")
    out = tmp_path / "device"
    argv = ["--bundle", str(bundle), *FAST, "--inputs", "0", "--formats", "onnx-fp32", "--out", str(out)]
    argv += ["--sysfs-root", str(tmp_path / "sys"), "--idle-seconds", "0.02"]
    assert device_bench.main(argv) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["energy"]["label"] == "measured" and "ina226" in r["energy"]["source"]
    assert r["energy"]["idle_w"] == pytest.approx(2.5)
    (row,) = r["formats"]["onnx-fp32"]["rows"]
    assert row["energy"][0]["label"] == "measured"
    assert "measured with ina226" in CostProfile.from_json(f"{out}-cost-mJ.json").source


# -- a device install: no torch, no matplotlib -------------------------------------------------------------------

BLOCKED = """
import sys
class _DeviceInstall:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "matplotlib", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a device install)", name=name)
        return None
sys.meta_path.insert(0, _DeviceInstall())
from cartosplit.cli import main
try:
    code = main(sys.argv[1:])
finally:
    print("HEAVY", sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "matplotlib", "transformers")))
sys.exit(code)
"""


def _device_install(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKED, *argv], capture_output=True, text=True, timeout=300)


def test_bench_device_help_works_without_torch_or_matplotlib():
    done = _device_install("bench", "device", "--help")
    assert done.returncode == 0, done.stderr
    assert "usage: cartosplit bench device" in done.stdout and "HEAVY []" in done.stdout
    listed = _device_install("bench", "--help")
    assert listed.returncode == 0 and "device" in listed.stdout


def test_bench_device_runs_without_torch_or_matplotlib_and_writes_json_and_markdown(bundle, tmp_path):
    out = tmp_path / "device"
    done = _device_install("bench", "device", "--bundle", str(bundle), *FAST, "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "HEAVY []" in done.stdout and "matplotlib is not installed" in done.stderr
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["torch_installed"] is False and r["matplotlib_installed"] is False
    assert out.with_suffix(".md").is_file() and not out.with_suffix(".png").exists() and "plot" not in r
    assert all(m["heavy_modules_loaded"] == [] for m in r["memory"])


# -- the runtime: auto format, advice, low memory --------------------------------------------------------------------


def test_auto_format_low_memory_and_advice_answer_like_the_default(bundle, result):
    texts = ["the film was good", "a sad and boring plot"]
    with DeviceRuntime(bundle, fmt="onnx-int8") as default:
        expected = [p.probabilities for p in default.predict(texts)]
        assert default.graphs.memory == "default"
    with DeviceRuntime(bundle, fmt="auto", low_memory=True) as auto:
        assert auto.fmt in ("onnx-int8", "onnx-fp32") and auto.format_reason and auto.graphs.memory == "low"
        if auto.fmt == "onnx-int8":
            np.testing.assert_allclose([p.probabilities for p in auto.predict(texts)], expected, atol=1e-6)
    # the result above was measured with a Pi 4's cpuinfo: on this CPU its advice is not used, and it says so
    with DeviceRuntime(bundle, fmt="auto", advice=f"{result[0]}.json") as advised:
        assert "not this one" in advised.format_reason
    with pytest.raises(ValueError, match="only with fmt='auto'"):
        DeviceRuntime(bundle, fmt="onnx-fp32", advice=f"{result[0]}.json")
    with pytest.raises(ValueError, match="unknown memory preset"):
        DeviceRuntime(bundle, low_memory="tiny")


def test_run_and_serve_device_take_auto_low_memory_and_advice(bundle, tmp_path, capsys):
    from cartosplit.cli import main
    from cartosplit.device_runtime import service

    source = tmp_path / "in.txt"
    source.write_text("the film was good\n")
    out = tmp_path / "out.jsonl"
    argv = ["run", "--bundle", str(bundle), "--format", "auto", "--low-memory"]
    assert main([*argv, "--input", str(source), "--output", str(out)]) == 0
    assert "--format auto chose onnx-int8" in capsys.readouterr().err
    assert json.loads(out.read_text())["label"] in ("negative", "positive")
    config = service.parse_config(f'bundle = "{bundle}"\nformat = "auto"\nlow_memory = true\n')
    assert (config.format, config.low_memory) == ("auto", True)
    runtime = service.build_runtime(config)
    assert runtime.fmt == "onnx-int8" and runtime.graphs.memory == "low"
    runtime.close()
    with pytest.raises(service.ConfigError, match="advice is read only with format"):
        service.parse_config(f'bundle = "{bundle}"\nformat = "onnx-int8"\nadvice = "device.json"\n')


@pytest.mark.parametrize("preset", sorted(MEMORY_PRESETS))
def test_every_onnxruntime_memory_preset_opens_and_answers_the_same(loaded, preset):
    from cartosplit.device_runtime.onnx_backend import OnnxSession

    path = loaded.graph_file("device_head", "onnx-int8")
    tokens = [np.array([[2, 7, 9, 3]]), np.ones((1, 4), dtype=np.int64), np.zeros((1, 4), dtype=np.int64)]
    reference = OnnxSession(path, 1).run(tokens)
    for got, want in zip(OnnxSession(path, 1, preset).run(tokens), reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_litert_presets_map_to_interpreter_options():
    from cartosplit.device_runtime import litert_backend

    if litert_backend.Interpreter is None:
        pytest.skip("no LiteRT runtime installed")
    assert litert_backend.memory_preset(True) == "low" and litert_backend.memory_preset("no-arena") == "default"
    options = litert_backend._interpreter_options("no-xnnpack")
    assert options["experimental_op_resolver_type"].name == "BUILTIN_WITHOUT_DEFAULT_DELEGATES"
    assert litert_backend._interpreter_options("low") == {}  # measured: no-xnnpack is 3x slower, not the default
