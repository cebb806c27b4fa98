"""bench router's headline: only deployable variants count, chosen by what they spare on held-out path samples."""

from __future__ import annotations

from cartosplit.benchmarks.router_gain import _rounded, headline, markdown


def _row(name, cut, kept, held_out, drop=0.1):
    return {"variant": name, "cut": cut, "gain_pt": cut - 10.0, "gain_ci95": [cut - 12, cut - 8],
            "kept": kept, "held_out_score": held_out, "acc_drop_pt": drop, "acc_drop_pt_ci95": [0.0, 0.2],
            "path_score": 0.5}  # fmt: skip


def _task(rows):
    cascade = {"cut": 10.0, "held_out_score": 0.9, "acc_drop_pt": 0.2, "acc_drop_pt_ci95": [0.0, 0.4]}
    return {"splits": {"0": {"profiles": {"p": {"cascade": cascade, "variants": rows}}, "verdicts": {}}}}


def test_the_best_variant_is_the_deployable_one_that_spares_most_on_held_out_path_samples():
    rows = [
        _row("best-on-dev-but-refused", 40.0, kept=False, held_out=0.1),
        _row("spares-most", 18.0, kept=True, held_out=0.5),
        _row("spares-less", 25.0, kept=True, held_out=0.7),
    ]
    h = headline(_task(rows), {"kind": "crc"})["p"]
    assert h["best_variant"] == "spares-most" and h["gain_pt"] == 8.0 and h["cascade_cut"] == 10.0
    assert h["best_on_dev_gain_pt"] == 30.0  # reported as an upper bound only
    assert h["variants_kept"] == 2 and h["guarantee"] == {"kind": "crc"}


def test_with_no_deployable_variant_the_cascade_stays_and_the_gain_is_zero():
    h = headline(_task([_row("refused", 40.0, kept=False, held_out=0.1)]), {})["p"]
    assert h["best_variant"] is None and h["gain_pt"] == 0.0 and h["best_variant_cut"] == 10.0
    report = {"command": "c", "machine": "m", "guarantee": {"statement": "s"}, "router": {"t": {"p": h}},
              "details": {"t": {"splits": {"0": {"verdicts": {}}}}}}  # fmt: skip
    assert "none kept: cascade" in markdown(report)


def test_results_are_rounded_for_the_committed_json():
    assert _rounded({"a": [0.123456789, {"b": 2.0000001}], "c": "x", "d": 3}) == {
        "a": [0.1235, {"b": 2.0}],
        "c": "x",
        "d": 3,
    }


def test_with_more_calibration_cuts_each_gets_its_own_selection_and_a_mean():
    task = _task([_row("a", 18.0, kept=True, held_out=0.5)])
    task["splits"]["1"] = _task([_row("b", 40.0, kept=False, held_out=0.1)])["splits"]["0"]
    h = headline(task, {})["p"]
    assert h["gain_pt_by_split"] == {"0": 8.0, "1": 0.0} and h["gain_pt_mean_over_splits"] == 4.0
