"""`cartosplit calibrate --guarantee`: refusal when the samples cannot certify, in-domain and
label-free calibration files, the guarantee recorded next to the dev drop (tiny model)."""

from __future__ import annotations

import json
import shutil

import pytest

from cartosplit.cli import main
from cartosplit.export.calibrate import CalibrateConfig, UncertifiableError, calibrate
from cartosplit.export.data import DataError, load_calibration_file
from cartosplit.export.router import RouterConfig

QUIET = {"log": lambda *_: None}


@pytest.fixture
def run(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    (copy / "calibration.json").unlink(missing_ok=True)
    return copy


def test_ltt_refuses_what_100_samples_cannot_certify_and_writes_nothing(run, capsys):
    # 100 of the 150 held-out samples certify; 0.5 pt at delta 0.1 needs >= 460 even with none lost
    with pytest.raises(UncertifiableError, match=r"cannot certify a drop of at most 0.5 pt.*needs at least 460"):
        calibrate(CalibrateConfig(run=str(run), router=RouterConfig(depth=1)), **QUIET)
    assert not (run / "calibration.json").exists()
    assert main(["calibrate", "--run", str(run), "--guarantee", "crc", "--max-drop", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "cannot certify" in err and "smallest certifiable bound" in err and "no policy was written" in err


@pytest.mark.parametrize("kind", ["ltt", "crc"])
def test_a_loose_bound_is_certified_and_recorded(run, kind, capsys):
    summary = calibrate(CalibrateConfig(run=str(run), guarantee=kind, objective=_drop(30.0), delta=0.2), log=print)
    g = summary["guarantee"]
    assert g["kind"] == kind and g["epsilon_pt"] == 30.0 and g["certification"]["certified"]
    assert g["certification"]["bound"] <= 0.30 + 1e-12 and g["certification"]["n"] == 100
    assert (g["delta"] == 0.2) == (kind == "ltt")
    printed = capsys.readouterr().out
    assert "guarantee: " in printed and "dev drop measured against all-cloud" in printed
    saved = json.loads((run / "calibration.json").read_text())
    assert saved["policy"] == summary["policy"] and saved["guarantee"]["kind"] == kind


def test_unlabelled_calib_file_uses_the_disagreement_risk(run, synthetic_files, tmp_path):
    texts = [line.split(",")[0] for line in synthetic_files[1].read_text().splitlines()[1:]]
    lines = tmp_path / "traffic.txt"
    lines.write_text("\n".join(texts) + "\n")
    summary = calibrate(CalibrateConfig(run=str(run), calib_file=str(lines), objective=_drop(40.0)), **QUIET)
    g = summary["guarantee"]
    assert g["reference"] == "final" and "unlabelled" in g["calibration_samples"]
    assert g["certification"]["n"] == len(texts)
    assert "differs from the final exit" in g["statement"]


def test_labelled_calib_file_and_bad_ones(run, synthetic_files, tmp_path):
    summary = calibrate(
        CalibrateConfig(run=str(run), calib_file=str(synthetic_files[1]), objective=_drop(30.0)), **QUIET
    )
    assert summary["guarantee"]["reference"] == "label" and "labelled" in summary["guarantee"]["calibration_samples"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"text": "a b", "text_pair": "c"}\n')
    with pytest.raises(DataError, match="single texts"):
        calibrate(CalibrateConfig(run=str(run), calib_file=str(pairs), objective=_drop(30.0)), **QUIET)
    with pytest.raises(DataError, match="not found"):
        calibrate(CalibrateConfig(run=str(run), calib_file=str(tmp_path / "none.txt")), **QUIET)


def test_calibration_file_formats(tmp_path):
    names = ("neg", "pos")
    (tmp_path / "a.txt").write_text("one\n\n two \n")
    assert load_calibration_file(tmp_path / "a.txt", names).texts == ["one", "two"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n{"text": "y"}\n')
    got = load_calibration_file(tmp_path / "b.jsonl", names)
    assert got.texts == ["x", "y"] and got.labels is None
    (tmp_path / "c.csv").write_text("text,label\nx,pos\ny,neg\n")
    assert load_calibration_file(tmp_path / "c.csv", names).labels.tolist() == [1, 0]
    (tmp_path / "d.jsonl").write_text('{"text": "x", "label": 1}\n{"text": "y"}\n')
    with pytest.raises(DataError, match="label"):  # labelled on some rows only
        load_calibration_file(tmp_path / "d.jsonl", names)
    (tmp_path / "e.tsv").write_text("x\n")
    with pytest.raises(DataError, match="unsupported"):
        load_calibration_file(tmp_path / "e.tsv", names)


def _drop(points: float):
    from cartosplit.device_runtime.policy import Objective

    return Objective("max-drop", points)


def test_demo_loosens_to_the_smallest_certifiable_bound_and_says_so(run):
    from cartosplit.export.demo import _calibrate_or_loosen, _calibration_matches

    said = []
    cfg = CalibrateConfig(run=str(run))  # LTT at 0.5 pt: refused on 100 samples
    _calibrate_or_loosen(cfg, run, said.append)
    assert any(line.startswith("refused: cannot certify") for line in said)
    saved = json.loads((run / "calibration.json").read_text())["guarantee"]
    assert saved["requested_epsilon_pt"] == 0.5 and saved["epsilon_pt"] > 0.5 and saved["certification"]["certified"]
    assert _calibration_matches(run, cfg)  # a second demo reuses it
    assert not _calibration_matches(run, CalibrateConfig(run=str(run), guarantee="crc"))
    assert not _calibration_matches(run, CalibrateConfig(run=str(run), calib_file="traffic.txt"))


def test_plain_search_takes_any_max_drop_and_says_it_guarantees_nothing(run):
    summary = calibrate(CalibrateConfig(run=str(run), guarantee="none", objective=_drop(100.0)), **QUIET)
    assert summary["guarantee"]["statement"].startswith("none: plain search within 100 pt")
    assert summary["guarantee"]["certification"] is None
