import json

import numpy as np
import pytest

from cartosplit.export.calibrate import CalibrateConfig, calibrate
from cartosplit.export.router import RouterConfig
from cartosplit.export.train import RunError, length_bucketed_batches, split_indices, train
from tests.conftest import tiny_train_config

QUIET = {"log": lambda *_: None}


def test_training_records_dynamics_of_the_right_shape(trained_run):
    with np.load(trained_run / "dynamics.npz") as d:
        gold, correct = d["gold_prob"], d["correct"]
        assert gold.shape == (3, 400, 3) and correct.shape == (3, 400, 3)
        assert np.isfinite(gold).all() and ((gold >= 0) & (gold <= 1)).all()
        assert len(np.unique(d["sample_index"])) == 400
    info = json.loads((trained_run / "run.json").read_text())
    assert info["status"] in ("trained", "calibrated")
    assert set(info["groups"]["counts"]) == {"easy", "medium", "hard"}
    assert sum(info["groups"]["counts"].values()) == 400
    # the synthetic task is learnable: the final exit beats chance on dev
    assert info["dev_accuracy"]["final"] > 0.8
    # training accuracy rises with epochs at the final exit
    assert correct[-1, :, 2].mean() > correct[0, :, 2].mean()
    assert (trained_run / "data_map.png").read_bytes()[:4] == b"\x89PNG"


def test_calibration_split_is_disjoint_from_training():
    train_idx, calib_idx = split_indices(100, 30, 20, seed=3)
    assert len(train_idx) == 30 and len(calib_idx) == 20
    assert not set(train_idx) & set(calib_idx)
    all_train, _ = split_indices(100, None, 20, seed=3)
    assert len(all_train) == 80
    with pytest.raises(RunError, match="train-size"):
        split_indices(100, 90, 20, seed=3)
    with pytest.raises(RunError, match="leaves no training sample"):
        split_indices(10, None, 10, seed=3)


def test_length_buckets_cover_every_sample_once_and_group_lengths():
    lengths = np.random.default_rng(0).integers(3, 60, 1000)
    batches = length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths)  # far less padding than random batches


def test_resume_after_an_interruption_reproduces_an_uninterrupted_run(
    tmp_path, tiny_model, synthetic_files, monkeypatch
):
    import cartosplit.export.train as train_module

    straight = tiny_train_config(tmp_path / "straight", tiny_model, synthetic_files, epochs=2, train_size=160)
    train(straight, **QUIET)

    save = train_module._save_checkpoint

    def save_then_interrupt(run, model, optimizer, scheduler, epoch, dynamics):
        save(run, model, optimizer, scheduler, epoch, dynamics)
        raise KeyboardInterrupt  # as if Ctrl-C arrived right after epoch 1 was saved

    interrupted = tiny_train_config(tmp_path / "resumed", tiny_model, synthetic_files, epochs=2, train_size=160)
    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted, **QUIET)
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    with pytest.raises(RunError, match="--resume"):
        train(interrupted, **QUIET)  # never silently overwrite a run
    train(interrupted, resume=True, **QUIET)
    with np.load(tmp_path / "straight" / "dynamics.npz") as a, np.load(tmp_path / "resumed" / "dynamics.npz") as b:
        np.testing.assert_allclose(a["gold_prob"], b["gold_prob"], atol=1e-5)
    straight_info = json.loads((tmp_path / "straight" / "run.json").read_text())
    resumed_info = json.loads((tmp_path / "resumed" / "run.json").read_text())
    assert resumed_info["dev_accuracy"] == pytest.approx(straight_info["dev_accuracy"], abs=1e-6)


def test_resume_with_another_configuration_is_refused(tmp_path, tiny_model, synthetic_files):
    cfg = tiny_train_config(tmp_path / "r", tiny_model, synthetic_files, epochs=1, train_size=64)
    train(cfg, **QUIET)
    changed = tiny_train_config(tmp_path / "r", tiny_model, synthetic_files, epochs=1, train_size=64, lr=0.5)
    with pytest.raises(RunError, match="lr"):
        train(changed, resume=True, **QUIET)
    with pytest.raises(RunError, match="holds no run"):
        train(tiny_train_config(tmp_path / "none", tiny_model, synthetic_files), resume=True, **QUIET)


@pytest.mark.parametrize("kind", ["logreg", "centroid"])
def test_calibrate_reports_policy_against_baselines(trained_run, kind):
    cfg = CalibrateConfig(run=str(trained_run), router=RouterConfig(kind=kind, depth=1), guarantee="none")
    summary = calibrate(cfg, **QUIET)
    saved = json.loads((trained_run / "calibration.json").read_text())
    assert saved["policy"] == summary["policy"]
    calib, dev = summary["results"]["calib"], summary["results"]["dev"]
    policy_row = f"dimec-dc ({kind}@1)"
    assert {"all-device", "all-edge", "all-cloud", "oracle", "cascade (max-softmax)", policy_row} == set(dev)
    # on the split it was tuned on, the policy obeys the 0.5 pt limit and never costs more than the cascade
    assert calib[policy_row]["accuracy_drop_points"] <= 0.5 + 1e-9
    assert calib[policy_row]["mean_cost"] <= calib["cascade (max-softmax)"]["mean_cost"] + 1e-12
    for rows in (calib, dev):
        assert rows["oracle"]["accuracy"] >= max(r["accuracy"] for r in rows.values())
    for row in dev.values():
        assert sum(row["shares"].values()) == pytest.approx(1.0)
    assert dev["all-cloud"]["cost_reduction_vs_all_cloud"] == pytest.approx(0.0)
    assert summary["router"]["holdout_samples"] == 80
    assert (trained_run / "router" / "router.safetensors").is_file()


def test_router_depth_past_the_device_split_is_refused(trained_run):
    with pytest.raises(ValueError, match="router depth 2 is past the device split"):
        calibrate(CalibrateConfig(run=str(trained_run), router=RouterConfig(depth=2)), **QUIET)


def test_calibrating_an_unfinished_run_is_refused(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"status": "training", "config": {}}))
    with pytest.raises(RunError, match="has not finished training"):
        calibrate(CalibrateConfig(run=str(tmp_path)), **QUIET)
    with pytest.raises(RunError, match="not a training run"):
        calibrate(CalibrateConfig(run=str(tmp_path / "nothing")), **QUIET)


def test_sigterm_during_training_keeps_the_last_epoch_and_says_so(tmp_path, tiny_model, synthetic_files):
    import os
    import signal

    from cartosplit.export.train import TrainingInterrupted

    cfg = tiny_train_config(tmp_path / "run", tiny_model, synthetic_files, epochs=2, train_size=64)
    said = []

    def log(message):  # a real SIGTERM to this process, right after epoch 1 was saved and logged
        said.append(message)
        if message.startswith("epoch 1:"):
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted):
        train(cfg, log=log)
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (info["status"], info["interrupted_by"], info["epochs_done"]) == ("interrupted", "SIGTERM", 1)
    assert "--resume" in said[-1] and "after epoch 1" in said[-1]
    train(cfg, resume=True, **QUIET)
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["status"] == "trained"
