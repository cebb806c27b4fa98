"""An export keeps the formats that passed; the manifest says whether the model takes text pairs; torchao's import
noise is silenced on the torch commands."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest

from cartosplit.cli import main
from cartosplit.device_runtime.bundle import describe, load_bundle, refused_formats
from cartosplit.device_runtime.manifest import FormatVerdict, Manifest
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.export.bundle_writer import (
    ExportConfig,
    ExportRefused,
    _cuttable_tiers,
    _run_exporters,
    export_bundle,
    refusal_report,
)
from cartosplit.export.exporters import Exported
from cartosplit.export.quiet import PYTREE_LOGGER, TORCHAO_LOGGER, quiet_known_noise
from tests.conftest import tiny_train_config, write_csv

FP32, INT8 = "onnx-fp32", "onnx-int8"
QUIET = {"log": lambda *_: None}


def _export_argv(run, out) -> list[str]:
    return ["export", "--run", str(run), "--out", str(out), "--formats", f"{FP32},{INT8}", "--validation-samples", "48"]


# --- (a) the export keeps what passed ---------------------------------------------------------------------


def test_a_refused_format_is_left_out_and_the_bundle_is_usable(calibrated_run, tmp_path, capsys):
    out = tmp_path / "b"
    argv = [*_export_argv(calibrated_run, out), "--int8-min-agreement", "1.01", "--tiers", "device,edge"]
    assert main(argv) == 1  # a script notices
    err = capsys.readouterr().err
    assert f"{INT8} refused: " in err and "< 1.01 (--int8-min-agreement)" in err
    assert f"export without it: --formats {FP32}" in err

    loaded = load_bundle(out)  # every listed file verified
    m = loaded.manifest
    assert list(m.formats) == [FP32]
    assert all(spec.formats() == [FP32] for spec in m.graphs.values())
    assert not (out / "onnx" / "int8").exists() and not any(rel.startswith("onnx/int8") for rel in m.files)
    verdict = m.validation.formats[INT8]  # the refusal is recorded with its verdict
    assert not verdict.passed and any("< 1.01" in f for f in verdict.failures)
    assert m.validation.formats[FP32].passed and list(refused_formats(m)) == [INT8]
    text = describe(loaded)
    assert f"refused  {INT8} at export" in text and "REFUSED, not in the bundle" in text

    for fmt in (None, "auto"):  # the default and auto choose among the present formats only
        with DeviceRuntime(loaded, fmt=fmt) as runtime:
            assert runtime.fmt == FP32
            (answer,) = runtime.predict(["the film was good"])
            assert answer.label in m.model.labels
    with pytest.raises(ValueError, match=f"bundle has no {INT8} graphs"):
        DeviceRuntime(loaded, fmt=INT8)
    for tier in ("device", "edge"):  # the tier bundles are cut from the kept formats
        assert list(load_bundle(out.with_name(f"b-{tier}")).manifest.formats) == [FP32]


def test_when_no_format_passes_no_bundle_is_written_and_every_failure_is_named(calibrated_run, tmp_path, capsys):
    out = tmp_path / "none"
    argv = [*_export_argv(calibrated_run, out), "--int8-min-agreement", "1.01", "--fp32-min-agreement", "1.01"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no format passed" in err and "no bundle written" in err
    assert f"{FP32} refused: " in err and "(--fp32-min-agreement)" in err
    assert f"{INT8} refused: " in err and "(--int8-min-agreement)" in err
    assert not out.exists()
    rejected = json.loads((tmp_path / "none.rejected" / "manifest.json").read_text())  # kept for inspection
    assert not any(v["passed"] for v in rejected["validation"]["formats"].values())
    with pytest.raises(ExportRefused, match="no format passed"):  # the library says the same
        cfg = ExportConfig(run=str(calibrated_run), out=str(out), formats=(FP32,), fp32_tolerance=0.0)
        export_bundle(cfg, **QUIET)
    assert not out.exists()


def _verdict(passed: bool) -> FormatVerdict:
    return FormatVerdict(max_abs_diff={}, agreement={"device": 1.0}, passed=passed, failures=[])


class _Fake:
    def __init__(self, fmt: str, export=None, validate=None) -> None:
        self.fmt, self._export, self._validate = fmt, export, validate

    def export(self, ctx):
        return self._export()

    def validate(self, ctx):
        return self._validate()


def test_an_exporter_that_raises_is_collected_and_int8_is_not_quantized_from_nothing():
    def boom():
        raise RuntimeError("converter crashed")

    def never():
        raise AssertionError("int8 must not be exported without its fp32 source")

    tflite = _Fake("tflite-fp32", lambda: Exported(info=None, files={"edge": {32: "t.tflite"}}), lambda: _verdict(True))
    ctx = SimpleNamespace(slices={"edge": (None, ("hidden_in",), ("logits",))}, log=lambda *_: None)
    formats, graphs, verdicts = _run_exporters([_Fake(FP32, boom), _Fake(INT8, never), tflite], ctx)
    assert list(verdicts) == [FP32, INT8, "tflite-fp32"] and list(formats) == ["tflite-fp32"]
    assert verdicts[FP32].failures == ["export failed: RuntimeError: converter crashed"]
    assert verdicts[INT8].failures == [f"not exported: quantized from {FP32}, whose export failed"]
    assert verdicts["tflite-fp32"].passed and graphs["edge"].formats() == ["tflite-fp32"]
    report = "\n".join(refusal_report(verdicts))
    assert "no threshold decides this" in report and "export without them: --formats tflite-fp32" in report


def test_int8_kept_without_fp32_says_why_and_a_tier_without_its_formats_is_not_cut(calibrated_run, tmp_path):
    verdicts = {FP32: _verdict(False), INT8: _verdict(True)}
    verdicts[FP32].failures = ["device_logits max abs diff 2.00e-03 > 1e-03"]
    report = "\n".join(refusal_report(verdicts))
    assert "(--fp32-tolerance)" in report and f"{INT8} is kept" in report and "--formats" not in report
    cfg = ExportConfig(run="r", out="o", formats=(FP32, INT8), tiers=("device", "edge"), device_formats=(INT8,))
    assert _cuttable_tiers(cfg, [INT8], tmp_path / "o") == (("device", "edge"), (INT8,), [])
    tiers, device_formats, skipped = _cuttable_tiers(cfg, [FP32], tmp_path / "o")
    assert tiers == ("edge",) and device_formats == () and "no device tier bundle" in skipped[0]


# --- (b) text pairs in the manifest -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_bundle(tiny_model, tmp_path_factory):
    from cartosplit.export.calibrate import CalibrateConfig, calibrate
    from cartosplit.export.router import RouterConfig
    from cartosplit.export.tiny import synthetic_pair_rows
    from cartosplit.export.train import train

    folder = tmp_path_factory.mktemp("pairs")
    files = (
        write_csv(folder / "train.csv", synthetic_pair_rows(300, seed=1)),
        write_csv(folder / "dev.csv", synthetic_pair_rows(60, seed=2, noise=0.0)),
    )
    run = folder / "run"
    cfg = tiny_train_config(run, tiny_model, files, train_size=200, calib_size=100, epochs=2, task=None)
    train(cfg, log=lambda *_: None)
    calibrate(CalibrateConfig(run=str(run), router=RouterConfig(kind="logreg", depth=1), guarantee="none"), **QUIET)
    out = folder / "bundle"
    export_bundle(ExportConfig(run=str(run), out=str(out), formats=(FP32,), validation_samples=32), **QUIET)
    return out


def test_the_manifest_says_whether_the_model_takes_text_pairs(pairs_bundle, bundle, tmp_path):
    pairs = load_bundle(pairs_bundle)
    assert pairs.manifest.model.text_pairs is True
    assert "input    text pairs (text, text_pair)" in describe(pairs)
    single = load_bundle(bundle)
    assert single.manifest.model.text_pairs is False and "input    single texts" in describe(single)

    old = tmp_path / "old"  # a bundle exported before the field: loads, reads as unknown, round-trips without it
    shutil.copytree(bundle, old)
    raw = json.loads((old / "manifest.json").read_text())
    del raw["model"]["text_pairs"]
    (old / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n")
    legacy = load_bundle(old)
    assert legacy.manifest.model.text_pairs is None and "input    not recorded" in describe(legacy)
    assert Manifest.from_dict(raw).to_dict() == raw
    raw["model"]["text_pairs"] = "yes"
    with pytest.raises(ValueError, match=r"model\.text_pairs must be true or false or null"):
        Manifest.from_dict(raw)


# --- (c) torchao's import noise ---------------------------------------------------------------------------

NOISE = ("Failed to load", "_pytree")


def _stderr_of(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_torchao_import_noise_is_gone_from_the_torch_commands():
    pytest.importorskip("torchao", reason="torchao is not installed here (it comes with litert-torch)")
    before = _stderr_of("import torchao")
    if not any(n in before for n in NOISE):
        pytest.skip("torchao prints neither line in this environment (torch with CUDA?): nothing to silence")
    after = _stderr_of("import cartosplit.export.commands, torchao")  # what every workstation command imports
    assert [line for line in after.splitlines() if any(n in line for n in NOISE)] == []


def test_the_filters_drop_only_those_two_messages(caplog):
    import torch

    if torch.version.cuda is not None:
        pytest.skip("with CUDA, torchao's failure to load its libraries is kept: it may be real")
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    assert len(logging.getLogger(TORCHAO_LOGGER).filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger(TORCHAO_LOGGER).warning("Failed to load /x/torchao/_C_mxfp8.abi3.so: Could not load")
        logging.getLogger(PYTREE_LOGGER).warning(
            "<enum 'K'> is an Enum subclass and is now natively supported ... register_constant() ... deprecated"
        )
        logging.getLogger(TORCHAO_LOGGER).warning("some other torchao warning")
        logging.getLogger(PYTREE_LOGGER).warning("some other pytree warning")
    assert [r.getMessage() for r in caplog.records] == ["some other torchao warning", "some other pytree warning"]
