"""The typed bundle contract: manifest.json round-trips byte for byte, and a bad one is refused with every
problem named by its path."""

from __future__ import annotations

import copy
import json

import pytest

from cartosplit.device_runtime.bundle import load_bundle
from cartosplit.device_runtime.json_checks import Problems
from cartosplit.device_runtime.manifest import (
    SCHEMA_VERSION,
    BundleError,
    FormatVerdict,
    Manifest,
    cloud_graph,
    cloud_graph_depth,
    graph_path,
)

HEAD = ["input_ids", "attention_mask", "token_type_ids"]


def _verdict(passed: bool = True) -> dict:
    return {
        "max_abs_diff": {"router_logits": 1e-7, "device_logits": 2e-7},
        "agreement": {"router_argmax": 1.0, "router_decisions": 1.0, "device": 1.0},
        "passed": passed,
        "failures": [] if passed else ["device agreement 0.9000 < 0.995"],
    }


def _raw() -> dict:
    """A manifest as the exporter writes it: ONNX fp32 and int8, TFLite int8 for the device graphs."""
    onnx = {g: {"onnx-fp32": f"onnx/fp32/{g}.onnx", "onnx-int8": f"onnx/int8/{g}.onnx"} for g in ("edge", "full")}
    head = {"tflite-int8": {"16": "tflite/int8/device_head_s16.tflite", "32": "tflite/int8/device_head_s32.tflite"}}
    files = [*(p for by in onnx.values() for p in by.values()), *head["tflite-int8"].values(), "tokenizer.json"]
    return {
        "schema_version": SCHEMA_VERSION,
        "cartosplit_version": "0.1.0",
        "created": "2026-12-02T05:55:56+00:00",
        "model": {
            "id": "tiny",
            "task": "sst2",
            "labels": ["negative", "positive"],
            "num_layers": 4,
            "hidden_size": 32,
            "vocab_size": 29,
            "max_length": 32,
            "pooling": "mean",
        },
        "split_points": {"router_depth": 1, "device": 1, "edge": 2, "total": 4},
        "router": {"kind": "logreg", "depth": 1, "fit_samples": 320, "groups": ["easy", "medium", "hard"], "x": {}},
        "tokenizer": "tokenizer.json",
        "policy": {"alpha_device": 0.9, "alpha_edge": 0.0, "hard_margin": None, "medium_margin": None},
        "cost_profile": {
            "device_per_layer": 0.1,
            "edge_per_layer": 0.05,
            "cloud_per_layer": 0.02,
            "device_to_edge": 0.2,
            "edge_to_cloud": 0.3,
            "device_to_cloud": 0.5,
            "device_to_cloud_tokens": None,
            "unit": "unit",
            "source": "default SplitEE/DIMEC unit convention",
        },
        "calibration_objective": {"kind": "max-drop", "max_drop": 0.5, "beta": 1.0, "metric": "accuracy"},
        "calibration_guarantee": None,
        "formats": {
            "onnx-fp32": {"opset": 17, "dynamic_axes": ["batch", "sequence"]},
            "onnx-int8": {
                "opset": 17,
                "quantization": "onnxruntime dynamic",
                "weight_type": "QUInt8",
                "per_channel": False,
                "candidates": [{"weight_type": "QUInt8", "per_channel": False, "mean_label_agreement": 0.99}],
            },
            "tflite-int8": {"buckets": [16, 32], "batch": 1, "graphs": ["device_head"], "quantization": "x"},
        },
        "graphs": {
            "device_head": {"inputs": HEAD, "outputs": ["router_logits", "hidden_out"], "files": head},
            "edge": {
                "inputs": ["hidden_in", "attention_mask"],
                "outputs": ["hidden_out", "logits"],
                "files": onnx["edge"],
            },
            "full": {"inputs": HEAD, "outputs": ["logits"], "files": onnx["full"]},
        },
        "validation": {
            "samples": 64,
            "source": "calibration split (held out from training)",
            "formats": {"onnx-fp32": _verdict(), "onnx-int8": _verdict()},
        },
        "exporter": {
            "torch": "2.13.0",
            "onnx": "1.23.2",
            "onnxruntime": "1.32.0",
            "litert-torch": None,
            "seconds": 5.2,
        },
        "files": {rel: {"size": 100, "sha256": "0" * 64} for rel in sorted(files)},
    }


def _refused(raw: dict) -> str:
    with pytest.raises(BundleError) as caught:
        Manifest.from_dict(raw)
    return str(caught.value)


def test_what_the_exporter_writes_round_trips_byte_for_byte(bundle):
    text = (bundle / "manifest.json").read_text()
    raw = json.loads(text)
    manifest = Manifest.from_dict(raw)
    assert manifest.to_dict() == raw
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text  # the bundle id is the sha256 of these bytes
    assert load_bundle(bundle).manifest == manifest


def test_every_section_round_trips_and_reads_as_attributes():
    raw = _raw()
    m = Manifest.from_dict(copy.deepcopy(raw))
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)  # same keys, same order
    assert m.model.hidden_size == 32 and m.split_points.edge == 2 and m.router.groups == ["easy", "medium", "hard"]
    assert m.policy.alpha_device == 0.9 and m.policy.hard_margin == float("inf")  # null: never
    assert m.cost_profile.token_hop == 0.5
    assert m.formats["tflite-int8"].buckets == [16, 32] and m.formats["onnx-int8"].candidates[0].per_channel is False
    assert m.graphs["device_head"].bucket_files["tflite-int8"][16] == "tflite/int8/device_head_s16.tflite"
    assert m.graph_path("device_head", "tflite-int8", 32) == "tflite/int8/device_head_s32.tflite"
    assert m.graph_path("edge", "onnx-int8") == "onnx/int8/edge.onnx"
    assert m.validation.formats["onnx-fp32"].passed and m.exporter.versions["litert-torch"] is None
    assert m.files["tokenizer.json"].size == 100
    # the router's fit report is kept as written, whatever it holds
    assert m.router.report["x"] == {} and m.to_dict()["router"] == raw["router"]


def test_to_dict_hands_out_fresh_objects():
    m = Manifest.from_dict(_raw())
    m.to_dict()["model"]["labels"].append("neutral")
    m.to_dict()["graphs"]["edge"]["inputs"].clear()
    assert m.model.labels == ["negative", "positive"] and m.graphs["edge"].inputs == ["hidden_in", "attention_mask"]


def test_optional_fields_may_be_missing_and_take_their_defaults():
    raw = _raw()
    for key in ("cartosplit_version", "created", "router", "calibration_objective", "calibration_guarantee"):
        del raw[key]
    for key in ("formats", "validation", "exporter"):
        del raw[key]
    del raw["model"]["vocab_size"], raw["model"]["task"], raw["cost_profile"]["device_to_cloud_tokens"]
    m = Manifest.from_dict(raw)
    assert (m.router, m.validation, m.exporter, m.formats, m.created) == (None, None, None, {}, None)
    assert m.model.vocab_size is None and m.cost_profile.device_to_cloud_tokens is None
    # a server refuses a bundle exported before the vocabulary size was recorded: it must still see it absent
    assert "vocab_size" not in m.to_dict()["model"]


def test_an_entry_without_size_is_named_not_a_key_error(bundle, tmp_path):
    raw = _raw()
    del raw["files"]["tokenizer.json"]["size"]
    assert _refused(raw) == 'manifest.json: files["tokenizer.json"] lacks "size"'
    # on disk, through load_bundle: a BundleError naming the file and the field (it was a KeyError traceback)
    folder = tmp_path / "b"
    folder.mkdir()
    on_disk = json.loads((bundle / "manifest.json").read_text())
    del on_disk["files"]["tokenizer.json"]["size"]
    (folder / "manifest.json").write_text(json.dumps(on_disk))
    with pytest.raises(BundleError, match=r'manifest\.json: files\["tokenizer\.json"\] lacks "size"'):
        load_bundle(folder)


def test_missing_fields_are_named_by_path_and_reported_together():
    raw = _raw()
    del raw["tokenizer"], raw["model"]["hidden_size"], raw["policy"]["alpha_edge"]
    del raw["graphs"]["edge"]["outputs"], raw["validation"]["formats"]["onnx-int8"]["passed"]
    message = _refused(raw)
    for problem in (
        '"tokenizer" is missing',
        'model lacks "hidden_size"',
        'policy lacks "alpha_edge"',  # a missing threshold must not silently read as "never"
        'graphs["edge"] lacks "outputs"',
        'validation.formats["onnx-int8"] lacks "passed"',
    ):
        assert problem in message


def test_wrong_types_are_named_by_path():
    raw = _raw()
    raw["model"]["hidden_size"] = "32"
    raw["model"]["labels"] = [0, 1]
    raw["files"]["tokenizer.json"]["size"] = True  # a bool is not a size
    raw["graphs"]["device_head"]["files"]["tflite-int8"] = "tflite/int8/device_head_s16.tflite"
    raw["formats"]["onnx-int8"]["candidates"][0]["mean_label_agreement"] = "high"
    raw["policy"]["hard_margin"] = "never"
    message = _refused(raw)
    for problem in (
        "model.hidden_size must be an integer, got str '32'",
        "model.labels must be a list of strings",
        'files["tokenizer.json"].size must be an integer, got bool True',
        'graphs["device_head"].files["tflite-int8"] must be an object of bucket -> path',
        'formats["onnx-int8"].candidates[0].mean_label_agreement must be a number',
        "policy.hard_margin must be a number or null",
    ):
        assert problem in message


def test_bad_values_unknown_fields_and_unlisted_files_are_refused():
    raw = _raw()
    raw["split_points"]["device"] = 3  # past the edge split
    raw["cost_profile"]["device_per_layer"] = -1
    raw["model"]["hidden_sise"] = 32  # a typo must not fall back to a default
    raw["formats"]["onnx-fp16"] = {"opset": 17}
    assert "split points must satisfy" in _refused(raw)
    message = _refused(raw)
    assert "cost_profile: cost device_per_layer must be a non-negative number" in message
    assert 'model has an unknown field "hidden_sise"' in message
    assert 'formats["onnx-fp16"] is an unknown format' in message
    raw = _raw()
    del raw["files"]["onnx/int8/edge.onnx"], raw["files"]["tokenizer.json"]
    message = _refused(raw)
    assert "graph 'edge' uses onnx/int8/edge.onnx, which has no size/sha256 entry" in message
    assert "the tokenizer file has no size/sha256 entry" in message


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_an_unknown_schema_version_is_refused_before_anything_else(version):
    raw = {"schema_version": version, "model": "whatever a later schema means"}
    if version is None:
        del raw["schema_version"]
    message = _refused(raw)
    assert f"bundle schema version {version!r} is not supported" in message and "model" not in message
    with pytest.raises(BundleError, match="must hold a JSON object"):
        Manifest.from_dict([])


def test_graph_lookups_say_what_exists():
    m = Manifest.from_dict(_raw())
    with pytest.raises(BundleError, match=r"no graph 'cloud_from_2'"):
        m.graph_path("cloud_from_2", "onnx-fp32")
    with pytest.raises(BundleError, match=r"not exported as tflite-fp32; available: \['tflite-int8'\]"):
        m.graph_path("device_head", "tflite-fp32", 16)
    with pytest.raises(BundleError, match=r"exists for buckets \[16, 32\], not 64"):
        m.graph_path("device_head", "tflite-int8", 64)


def test_one_rule_names_the_graphs_and_their_files():
    assert cloud_graph(4) == "cloud_from_4" and cloud_graph_depth("cloud_from_4") == 4
    assert cloud_graph_depth("full") is None and cloud_graph_depth("cloud_from_x") is None
    with pytest.raises(ValueError, match="depth 0"):
        cloud_graph(0)  # at r = 0 the cloud gets tokens and runs `full`
    assert graph_path("onnx-fp32", "edge") == "onnx/fp32/edge.onnx"
    assert graph_path("tflite-fp32", "device_tail", 64) == "tflite/fp32/device_tail_s64.tflite"


def test_a_format_verdict_records_how_many_samples_it_checked():
    import numpy as np

    from cartosplit.device_runtime.policy import Policy
    from cartosplit.export.validation import compare, judge

    rng = np.random.default_rng(0)
    rows = [{"router_logits": rng.normal(size=(n, 3)), "device_logits": rng.normal(size=(n, 2))} for n in (1, 1, 3)]
    verdict = judge(compare(rows, rows, Policy(0.9, 0.9, 0.5, 0.5)), 1e-3, 0.99)
    assert verdict.passed and verdict.samples == 5  # TFLite checks one sample per row, ONNX a batch
    assert verdict.to_dict()["samples"] == 5
    old = {k: v for k, v in verdict.to_dict().items() if k != "samples"}  # bundles exported before it
    assert FormatVerdict.read(old, "validation.formats.x", Problems()).to_dict() == old
