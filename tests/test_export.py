import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from cartosplit.cli import main
from cartosplit.device_runtime.bundle import BundleError, load_bundle
from cartosplit.device_runtime.costs import SplitPoints
from cartosplit.device_runtime.manifest import STATIC_QUANTIZATION
from cartosplit.export.bundle_writer import ExportConfig, ExportError, export_bundle
from cartosplit.export.onnx_export import STATIC_INT8_RECIPES
from tests.conftest import ONNX_ONLY

QUIET = {"log": lambda *_: None}


def test_bundle_manifest_describes_everything(bundle):
    loaded = load_bundle(bundle)
    m = loaded.manifest
    assert m.schema_version == 1
    assert m.split_points == SplitPoints(router_depth=1, device=1, edge=2, total=4)
    assert m.model.labels == ["negative", "positive"] and m.model.hidden_size == 32
    assert set(m.graphs) == {"device_head", "device_tail", "edge", "cloud_from_2", "cloud_from_1", "full"}
    assert m.tokenizer == "tokenizer.json" and "tokenizer.json" in m.files
    assert m.formats["onnx-fp32"].opset == 17
    int8 = m.formats["onnx-int8"]
    assert int8.quantization == STATIC_QUANTIZATION and int8.batch_independent and int8.reduce_range
    assert [c.recipe for c in int8.candidates] == [r.name for r in STATIC_INT8_RECIPES]
    assert int8.recipe in {r.name for r in STATIC_INT8_RECIPES} and int8.calibration_samples > 0
    cpu = m.validation.cpu  # where the int8 verdicts were measured
    assert cpu["arch"] and isinstance(cpu["features"], dict) and "int8_dot" in cpu
    for rel, entry in m.files.items():
        assert (bundle / rel).stat().st_size == entry.size and len(entry.sha256) == 64
    assert not list(bundle.parent.glob("*.partial"))


def test_fp32_matches_torch_and_int8_agrees_on_labels(bundle):
    validation = load_bundle(bundle).manifest.validation.formats
    fp32, int8 = validation["onnx-fp32"], validation["onnx-int8"]
    assert fp32.passed and max(fp32.max_abs_diff.values()) < 1e-4
    assert all(v == 1.0 for v in fp32.agreement.values())
    assert int8.passed
    for exit_name in ("device", "edge", "final", "full"):
        assert int8.agreement[exit_name] >= 0.95


def test_int8_answer_does_not_depend_on_its_batch(bundle):
    """Static int8: a sample's server-side logits are the same alone and padded into a batch of others of
    other lengths (dynamic int8 took one activation scale per batch, and labels moved with it)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    rng = np.random.default_rng(3)
    lengths = [4, 9, 17, 6, 12, 3, 20, 8]
    scales = (1, 3, 0.5, 8) * 2  # samples of very different ranges: a per-batch scale would move with them
    hidden = [rng.normal(scale=s, size=(n, 32)).astype(np.float32) for n, s in zip(lengths, scales, strict=True)]
    for name in ("edge", "cloud_from_2"):
        spec = manifest["graphs"][name]
        session = ort.InferenceSession(str(bundle / spec["files"]["onnx-int8"]), providers=["CPUExecutionProvider"])
        logits = [o.name for o in session.get_outputs()].index("logits")
        batch = np.zeros((len(hidden), max(lengths), 32), dtype=np.float32)
        mask = np.zeros((len(hidden), max(lengths)), dtype=np.int64)
        for i, h in enumerate(hidden):
            batch[i, : len(h)], mask[i, : len(h)] = h, 1
        together = session.run(None, {"hidden_in": batch, "attention_mask": mask})[logits]
        for i, h in enumerate(hidden):
            alone = session.run(None, {"hidden_in": h[None], "attention_mask": np.ones((1, len(h)), np.int64)})[logits]
            np.testing.assert_allclose(alone[0], together[i], atol=1e-4, err_msg=f"{name}, sample {i}")


def test_every_graph_runs_in_plain_onnxruntime_with_any_batch_and_length(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    for spec in manifest["graphs"].values():
        for fmt in ("onnx-fp32", "onnx-int8"):
            session = ort.InferenceSession(str(bundle / spec["files"][fmt]), providers=["CPUExecutionProvider"])
            assert [i.name for i in session.get_inputs()] == spec["inputs"]
            for batch, length in ((1, 5), (3, 17)):
                mask = np.ones((batch, length), dtype=np.int64)
                if spec["inputs"][0] == "input_ids":
                    feed = {"input_ids": np.full((batch, length), 7), "attention_mask": mask}
                    feed["token_type_ids"] = np.zeros((batch, length), dtype=np.int64)
                else:
                    feed = {"hidden_in": np.random.default_rng(0).normal(size=(batch, length, 32)).astype(np.float32)}
                    feed["attention_mask"] = mask
                outputs = session.run(None, feed)
                assert [o.name for o in session.get_outputs()] == spec["outputs"]
                assert set(spec["outputs"]) & {"logits", "router_logits"}
                assert all(np.isfinite(o).all() and o.shape[0] == batch for o in outputs)


def _copy(bundle, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(bundle, target)
    return target


def test_tampered_truncated_and_missing_files_are_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    graph = b / "onnx" / "fp32" / "edge.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"edge\.onnx does not match its sha256"):
        load_bundle(b)
    graph.write_bytes(bytes(data[:100]))
    with pytest.raises(BundleError, match=r"edge\.onnx has 100 bytes"):
        load_bundle(b)
    graph.unlink()
    with pytest.raises(BundleError, match=r"edge\.onnx is missing"):
        load_bundle(b)


def test_wrong_schema_version_and_bad_manifests_are_refused(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    manifest = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(BundleError, match="schema version 99 is not supported"):
        load_bundle(b)
    escaped = {**manifest, "files": {**manifest["files"], "../outside": {"size": 1, "sha256": "0" * 64}}}
    (b / "manifest.json").write_text(json.dumps(escaped))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b)
    unlisted = json.loads(json.dumps(manifest))
    del unlisted["files"]["onnx/int8/edge.onnx"]
    (b / "manifest.json").write_text(json.dumps(unlisted))
    with pytest.raises(BundleError, match="no size/sha256 entry"):
        load_bundle(b)
    (b / "manifest.json").write_text("{broken")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(b)
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(b)


def test_inspect_prints_a_verified_bundle_and_refuses_a_tampered_one(bundle, tmp_path, capsys):
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "router after layer 1, device exit after 1" in out and "all files match their sha256" in out
    b = _copy(bundle, tmp_path)
    (b / "tokenizer.json").write_text("{}")
    assert main(["inspect", str(b)]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_export_refuses_when_no_format_passes_and_keeps_the_rejected_bundle(calibrated_run, tmp_path):
    """Nothing within tolerance: no bundle, every failure named, the artifacts kept at OUT.rejected to look at
    (a partly passing export keeps what passed: tests/test_export_partial.py)."""
    out = tmp_path / "strict"
    cfg = ExportConfig(run=str(calibrated_run), out=str(out), formats=("onnx-fp32",), fp32_tolerance=0.0)
    with pytest.raises(ExportError, match="no format passed"):
        export_bundle(cfg, **QUIET)
    assert not out.exists()
    report = json.loads((tmp_path / "strict.rejected" / "manifest.json").read_text())
    assert not report["validation"]["formats"]["onnx-fp32"]["passed"]


def test_export_prerequisites_and_options_are_checked(calibrated_run, trained_run, tmp_path, bundle):
    with pytest.raises(ExportError, match="exists"):
        export_bundle(ExportConfig(run=str(calibrated_run), out=str(bundle), formats=ONNX_ONLY), **QUIET)
    with pytest.raises(ExportError, match="unknown formats"):
        ExportConfig(run="r", out="o", formats=("onnx-fp16",))
    with pytest.raises(ExportError, match="include both"):
        ExportConfig(run="r", out="o", formats=("onnx-int8",))
    uncalibrated = tmp_path / "uncalibrated"
    shutil.copytree(trained_run, uncalibrated)
    shutil.rmtree(uncalibrated / "router", ignore_errors=True)
    (uncalibrated / "calibration.json").unlink(missing_ok=True)
    with pytest.raises(ExportError, match="not calibrated"):
        export_bundle(ExportConfig(run=str(uncalibrated), out=str(tmp_path / "x"), formats=ONNX_ONLY), **QUIET)


def test_tflite_device_graphs_per_bucket_run_in_plain_litert(calibrated_run, tmp_path):
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch (the tflite extra)")
    from ai_edge_litert.interpreter import Interpreter

    out = tmp_path / "with-tflite"
    cfg = ExportConfig(run=str(calibrated_run), out=str(out), buckets=(16, 32), validation_samples=48)
    export_bundle(cfg, **QUIET)
    m = load_bundle(out).manifest
    for fmt in ("tflite-fp32", "tflite-int8"):
        report = m.validation.formats[fmt]
        assert report.passed, report.failures
        assert m.formats[fmt].buckets == [16, 32]
        for graph in ("device_head", "device_tail"):
            assert set(m.graphs[graph].bucket_files[fmt]) == {16, 32}
        assert fmt not in m.graphs["edge"].formats()
    assert max(m.validation.formats["tflite-fp32"].max_abs_diff.values()) < 1e-4
    # a phone needs nothing of cartosplit to run a graph: plain LiteRT, fixed shape [1, bucket]
    interpreter = Interpreter(model_path=str(out / m.graphs["device_head"].bucket_files["tflite-int8"][16]))
    runner = interpreter.get_signature_runner()
    tokens = {name: np.ones((1, 16), dtype=np.int32) for name in runner.get_input_details()}
    outputs = runner(**tokens)
    assert {v.shape for v in outputs.values()} == {(1, 3), (1, 16, 32)}


def test_device_runtime_loads_and_runs_a_bundle_without_torch(bundle):
    import subprocess
    import sys

    code = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
sys.modules["transformers"] = None
import numpy as np
from cartosplit import cli
from cartosplit.device_runtime import bundle, commands, costs, litert_backend, onnx_backend, policy, text
b = bundle.load_bundle({str(bundle)!r})
tok = text.load_tokenizer(b.path(b.manifest.tokenizer), 32)
batch = text.pad_batch(text.encode(tok, ["the film was good", "bad plot"]))
head = onnx_backend.OnnxSession(b.graph_file("device_head", "onnx-int8"))
router_logits, hidden = head.run([batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]])
print(router_logits.shape, hidden.shape)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "(2, 3) (2, 6, 32)" in done.stdout
