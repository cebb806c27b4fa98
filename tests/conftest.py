"""Shared fixtures: a tiny random BERT with its own tokenizer, and a synthetic task it learns in seconds.

Nothing here downloads anything: the vocabulary, tokenizer and weights are made on the spot.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.export.tiny import make_tiny_bert, synthetic_rows, tiny_train_config, write_csv

__all__ = ["make_tiny_bert", "synthetic_rows", "tiny_train_config", "write_csv"]  # tests import them from here

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test must never reach for the hub


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def synthetic_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("synthetic")
    return (
        write_csv(folder / "train.csv", synthetic_rows(600, seed=1)),
        write_csv(folder / "dev.csv", synthetic_rows(200, seed=2, noise=0.0)),
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model, synthetic_files) -> Path:
    """One trained tiny run shared by the tests that only read it."""
    from cartosplit.export.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_train_config(out, tiny_model, synthetic_files), log=lambda *_: None)
    return out


ONNX_ONLY = ("onnx-fp32", "onnx-int8")


@pytest.fixture(scope="session")
def calibrated_run(trained_run, tmp_path_factory) -> Path:
    """The tiny run, calibrated with a logreg router at depth 1."""
    run = tmp_path_factory.mktemp("calibrated") / "run"
    shutil.copytree(trained_run, run)
    from cartosplit.export.calibrate import CalibrateConfig, calibrate
    from cartosplit.export.router import RouterConfig

    calibrate(
        CalibrateConfig(run=str(run), router=RouterConfig(kind="logreg", depth=1), guarantee="none"),
        log=lambda *_: None,
    )
    return run


@pytest.fixture(scope="session")
def bundle(calibrated_run, tmp_path_factory) -> Path:
    """An ONNX (fp32 + int8) bundle of the tiny run: split r=1, d=1, e=2, L=4, hidden 32."""
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    from cartosplit.export.bundle_writer import ExportConfig, export_bundle

    cfg = ExportConfig(run=str(calibrated_run), out=str(out), formats=ONNX_ONLY, validation_samples=64)
    export_bundle(cfg, log=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def loaded(bundle: Path) -> Bundle:
    """The tiny bundle, loaded (and verified) once per test module."""
    return load_bundle(bundle)
