"""The TFLite device graphs' signatures match the table in docs/android.md, which an Android app relies on.

The table is parsed out of the guide itself, so the guide and the exported artifacts cannot drift apart:
change what the exporter writes and this test names the row of the guide to update. The tiny random BERT
bundle is exported with both TFLite precisions at two buckets (16, 32). The guide's tokenizer (the Kotlin
example's, ported to Python in docs/android/wordpiece_check.py) is checked against `tokenizers`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from cartosplit.device_runtime.bundle import TFLITE_FP32, TFLITE_INT8, load_bundle

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "android.md"
BUCKETS = (16, 32)
SIGNATURE = "serving_default"


def _between(text: str, marker: str) -> list[str]:
    match = re.search(rf"<!-- {marker}:start -->\n(.*?)<!-- {marker}:end -->", text, re.S)
    assert match, f"docs/android.md lost its {marker} markers"
    return [line for line in match.group(1).splitlines() if line.strip()]


def signature_table(text: str) -> list[dict]:
    """Rows of the guide's signature table: graph, signature, tensor, shape (symbols), dtype, manifest name."""
    lines = _between(text, "signature-table")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:6] == ["graph", "signature", "tensor", "shape", "dtype", "manifest name"], header
    rows = []
    for line in lines[2:]:  # after the header and the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def resolve_shape(symbolic: str, sizes: dict[str, int]) -> tuple[int, ...]:
    """``[1, S, H]`` -> (1, 16, 32) given S, H, K."""
    items = [x.strip() for x in symbolic.strip("[]").split(",")]
    return tuple(int(x) if x.isdigit() else sizes[x] for x in items)


@pytest.fixture(scope="module")
def tflite_bundle(calibrated_run, tmp_path_factory) -> Path:
    """The tiny calibrated run exported to TFLite only (fp32 and int8, buckets 16 and 32)."""
    pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch: pip install 'cartosplit[tflite]'")
    from cartosplit.export.bundle_writer import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("tflite-bundle") / "tiny"
    cfg = ExportConfig(
        run=str(calibrated_run),
        out=str(out),
        formats=(TFLITE_FP32, TFLITE_INT8),
        buckets=BUCKETS,
        validation_samples=16,
    )
    export_bundle(cfg, log=lambda *_: None)
    return out


def test_the_guide_table_is_complete_and_ordered():
    rows = signature_table(GUIDE.read_text(encoding="utf-8"))
    by_graph: dict[str, list[str]] = {}
    for row in rows:
        assert row["signature"] == SIGNATURE
        assert row["dtype"] in ("int32", "float32"), row
        by_graph.setdefault(row["graph"], []).append(row["tensor"])
    assert by_graph == {
        "device_head": ["args_0", "args_1", "args_2", "output_0", "output_1"],
        "device_tail": ["args_0", "args_1", "output_0", "output_1"],
    }


@pytest.mark.parametrize("fmt", [TFLITE_FP32, TFLITE_INT8])
def test_every_device_tflite_file_has_the_signature_the_guide_documents(tflite_bundle, fmt):
    from ai_edge_litert.interpreter import Interpreter

    bundle = load_bundle(tflite_bundle)
    m = bundle.manifest
    rows = signature_table(GUIDE.read_text(encoding="utf-8"))
    assert sorted(m.formats[fmt].buckets) == list(BUCKETS)
    checked = 0
    for graph in ("device_head", "device_tail"):
        graph_rows = [r for r in rows if r["graph"] == graph]
        inputs = [r for r in graph_rows if r["tensor"].startswith("args_")]
        outputs = [r for r in graph_rows if r["tensor"].startswith("output_")]
        # the guide's "manifest name" column maps args_i / output_i onto the manifest's named graph interface
        assert [r["manifest name"] for r in inputs] == m.graphs[graph].inputs
        assert [r["manifest name"] for r in outputs] == m.graphs[graph].outputs
        for bucket in BUCKETS:
            path = bundle.graph_file(graph, fmt, bucket)
            assert path.name == f"{graph}_s{bucket}.tflite"  # the naming the guide tells apps to expect
            interpreter = Interpreter(model_path=str(path))
            signatures = interpreter.get_signature_list()
            assert signatures == {
                SIGNATURE: {"inputs": [r["tensor"] for r in inputs], "outputs": [r["tensor"] for r in outputs]}
            }, path
            runner = interpreter.get_signature_runner(SIGNATURE)
            details = {**runner.get_input_details(), **runner.get_output_details()}
            sizes = {"S": bucket, "H": m.model.hidden_size, "K": len(m.model.labels)}
            for row in graph_rows:
                detail = details[row["tensor"]]
                where = f"{path.name} {row['tensor']} (docs/android.md row: {row})"
                assert tuple(int(d) for d in detail["shape"]) == resolve_shape(row["shape"], sizes), where
                assert np.dtype(detail["dtype"]).name == row["dtype"], where
                checked += 1
    assert checked == 9 * len(BUCKETS)


def test_the_graphs_run_as_the_guide_says(tflite_bundle):
    """Feed the documented inputs by signature name and read the documented outputs: shapes, finite values,
    and the padded hidden state cut to the real tokens equals an unpadded-bucket run's (masking holds)."""
    from ai_edge_litert.interpreter import Interpreter

    from cartosplit.device_runtime.text import encode, load_tokenizer

    bundle = load_bundle(tflite_bundle)
    m = bundle.manifest
    tokenizer = load_tokenizer(bundle.path(m.tokenizer), m.model.max_length)
    (ids, types), *_ = encode(tokenizer, ["the movie was very good"])
    length = len(ids)
    results = {}
    for bucket in BUCKETS:
        pad = bucket - length
        feed = {
            "args_0": np.array([ids + [0] * pad], dtype=np.int32),
            "args_1": np.array([[1] * length + [0] * pad], dtype=np.int32),
            "args_2": np.array([types + [0] * pad], dtype=np.int32),
        }
        head = Interpreter(model_path=str(bundle.graph_file("device_head", TFLITE_FP32, bucket)))
        head_out = head.get_signature_runner(SIGNATURE)(**feed)
        tail = Interpreter(model_path=str(bundle.graph_file("device_tail", TFLITE_FP32, bucket)))
        tail_out = tail.get_signature_runner(SIGNATURE)(args_0=head_out["output_1"], args_1=feed["args_1"])
        assert head_out["output_0"].shape == (1, 3) and tail_out["output_1"].shape == (1, len(m.model.labels))
        assert all(np.isfinite(v).all() for v in (*head_out.values(), *tail_out.values()))
        results[bucket] = (head_out["output_0"], tail_out["output_0"][0, :length], tail_out["output_1"])
    (r16, h16, l16), (r32, h32, l32) = results[16], results[32]
    np.testing.assert_allclose(r16, r32, atol=1e-4)
    np.testing.assert_allclose(l16, l32, atol=1e-4)
    np.testing.assert_allclose(h16, h32, atol=1e-4)


def test_every_manifest_field_the_guide_names_exists(tflite_bundle):
    manifest = load_bundle(tflite_bundle).manifest
    layout = json.loads((tflite_bundle / "manifest.json").read_text())  # what an app reads
    fields = [line.strip().lstrip("-").strip().strip("`") for line in _between(GUIDE.read_text(), "manifest-fields")]
    assert len(fields) >= 10
    for path in fields:
        node = layout
        for key in path.split("."):
            assert isinstance(node, dict) and key in node, f"docs/android.md names manifest field {path!r}: missing"
            node = node[key]
    assert manifest.router.groups == ["easy", "medium", "hard"]  # the order the guide's policy steps use


def test_the_guides_wordpiece_gives_the_ids_tokenizers_gives(tiny_model):
    import importlib.util

    from cartosplit.device_runtime.text import encode, load_tokenizer

    path = GUIDE.parent / "android" / "wordpiece_check.py"
    spec = importlib.util.spec_from_file_location("wordpiece_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer_json = tiny_model / "tokenizer.json"
    guide = module.GuideWordPiece(tokenizer_json, max_length=12)
    reference = load_tokenizer(tokenizer_json, 12)
    texts = [
        "the movie was very good",
        "The MOVIE was Very-good!!",  # case, punctuation as words of their own
        "naïve fílm, résumé: supérb",  # accents stripped after NFD
        "日本 good 映画",  # CJK characters split apart, unknown -> [UNK]
        "a\u00a0film\u2003is\tgood\nbad",  # non-breaking and em spaces, tab, newline
        "ctrl\x07bad\u200bdull",  # control and format characters dropped
        "goodbad superbgood",  # no continuation pieces in the tiny vocab: [UNK]
        "x" * 150,  # over 100 characters: [UNK]
        "good " * 20,  # truncated to max_length with [SEP] kept
    ]
    for text in texts:
        assert guide.encode(text) == encode(reference, [text])[0][0], text
