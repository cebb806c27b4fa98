"""TFLite export (litert-torch) and the torch-free LiteRT runtime, on the tiny random BERT.

Each slice is converted once per (slice, precision) at bucket 16 and shared by the tests of this file.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="TFLite export needs litert-torch: pip install 'cartosplit[tflite]'")

import torch

from cartosplit.device_runtime.buckets import bucket_for, pad_to
from cartosplit.device_runtime.litert_backend import LiteRTSession
from cartosplit.device_runtime.text import encode, load_tokenizer

BUCKET = 16
SENTENCES = [
    "the movie was very good",
    "boring",
    "this film is quite awful but the actors were superb",
    "a lovely plot",
]
SLICES = ("device_head", "device_tail", "edge")


@pytest.fixture(scope="module")
def slices(tiny_model):
    from cartosplit.export.model import build_model
    from cartosplit.export.router import Router
    from cartosplit.export.slices import build_slices

    torch.manual_seed(0)
    model = build_model(str(tiny_model), num_labels=2, device_split=1, edge_split=2).eval()
    return model, build_slices(model, Router(32, "logreg"), router_depth=1)


@pytest.fixture(scope="module")
def encoded(tiny_model):
    """(ids, mask, types) int64 [1, S] per sentence, unpadded."""
    tokenizer = load_tokenizer(tiny_model / "tokenizer.json", BUCKET)
    rows = []
    for ids, types in encode(tokenizer, SENTENCES):
        ids, types = np.array([ids], dtype=np.int64), np.array([types], dtype=np.int64)
        rows.append((ids, np.ones_like(ids), types))
    assert len({r[0].shape[1] for r in rows}) > 1  # lengths differ: padding is really exercised
    return rows


def padded(row):
    return [pad_to(a, BUCKET) for a in row]


@pytest.fixture(scope="module")
def converted(slices, tmp_path_factory):
    """(slice name, int8) -> LiteRTSession, converting on first use."""
    from cartosplit.export.tflite import convert_to_tflite

    _, graphs = slices
    folder = tmp_path_factory.mktemp("tflite")
    hidden = torch.randn(1, BUCKET, 32)
    mask = torch.ones(1, BUCKET, dtype=torch.int64)
    mask[:, 10:] = 0
    tokens = (torch.randint(5, 20, (1, BUCKET)), mask, torch.zeros(1, BUCKET, dtype=torch.int64))
    cache = {}

    def get(name: str, int8: bool) -> LiteRTSession:
        if (name, int8) not in cache:
            module, input_names, _ = graphs[name]
            example = tokens if input_names[0] == "input_ids" else (hidden, mask)
            path = folder / f"{name}-{BUCKET}-{'int8' if int8 else 'fp32'}.tflite"
            assert convert_to_tflite(module, example, path, int8=int8) == path
            cache[name, int8] = LiteRTSession(path, num_threads=2)
        return cache[name, int8]

    return get


def torch_chain(graphs, row):
    """Per slice: (inputs as numpy, torch outputs as numpy), chaining hidden states, at the row's own length."""
    ids, mask, types = (torch.from_numpy(a) for a in row)
    steps = {}
    with torch.no_grad():
        router_logits, hidden = graphs["device_head"][0](ids, mask, types)
        steps["device_head"] = ([ids, mask, types], [router_logits, hidden])
        for name in ("device_tail", "edge"):
            inputs = [hidden, mask]
            hidden, logits = graphs[name][0](*inputs)
            steps[name] = (inputs, [hidden, logits])
    return {k: ([a.numpy() for a in i], [a.numpy() for a in o]) for k, (i, o) in steps.items()}


@pytest.mark.parametrize("name", SLICES)
def test_fp32_slice_matches_torch_on_padded_sentences(name, slices, encoded, converted):
    _, graphs = slices
    session = converted(name, False)
    assert session.input_dtypes[-1] == np.int32  # the attention mask: int64 became int32
    for row in encoded:
        inputs, expected = torch_chain(graphs, padded(row))[name]
        outputs = session.run(inputs)  # int64 token inputs are cast by the session
        assert [o.shape for o in outputs] == [e.shape for e in expected]  # torch's output order
        for got, want in zip(outputs, expected, strict=True):
            assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("name", SLICES)
def test_int8_slice_runs_smaller_and_close(name, slices, encoded, converted):
    _, graphs = slices
    fp32, int8 = converted(name, False), converted(name, True)
    assert int8.path.stat().st_size < fp32.path.stat().st_size
    assert int8.input_shapes == fp32.input_shapes and int8.output_shapes == fp32.output_shapes
    for row in encoded:
        inputs, expected = torch_chain(graphs, padded(row))[name]
        outputs = int8.run(inputs)
        assert [o.shape for o in outputs] == [e.shape for e in expected]
        assert all(np.isfinite(o).all() for o in outputs)
        logits = 0 if name == "device_head" else 1  # router logits come first, exit logits last
        assert np.abs(outputs[logits] - expected[logits]).max() < 0.5


def test_padding_to_bucket_keeps_the_unpadded_torch_logits(slices, encoded, converted):
    model, graphs = slices
    head, tail, edge = (converted(name, False) for name in SLICES)
    for row in encoded:
        unpadded = torch_chain(graphs, row)
        with torch.no_grad():
            exit_logits, _ = model(*(torch.from_numpy(a) for a in row))
        ids, mask, types = padded(row)
        router_logits, hidden = head.run([ids, mask, types])
        hidden, device_logits = tail.run([hidden, mask])
        hidden, edge_logits = edge.run([hidden, mask])
        np.testing.assert_allclose(router_logits, unpadded["device_head"][1][0], atol=1e-4)
        np.testing.assert_allclose(device_logits, exit_logits[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(edge_logits, exit_logits[1].numpy(), atol=1e-4)
        length = row[0].shape[1]  # the real tokens' hidden state is the unpadded one
        np.testing.assert_allclose(hidden[:, :length], unpadded["edge"][1][0], atol=1e-4)


def test_session_rejects_bad_inputs_with_clear_errors(converted):
    session = converted("device_tail", False)
    hidden = np.zeros((1, BUCKET, 32), dtype=np.float32)
    mask = np.ones((1, BUCKET), dtype=np.int64)
    assert session.input_shapes == [(1, BUCKET, 32), (1, BUCKET)]
    with pytest.raises(ValueError, match="takes 2 inputs, got 1"):
        session.run([hidden])
    with pytest.raises(ValueError, match="takes 2 inputs, got 3"):
        session.run([hidden, mask, mask])
    with pytest.raises(ValueError, match=r"shape \[1, 17\].*exactly \[1, 16\]"):
        session.run([hidden, np.ones((1, BUCKET + 1), dtype=np.int64)])
    with pytest.raises(ValueError, match="takes integers"):
        session.run([hidden, mask.astype(np.float32)])
    with pytest.raises(ValueError, match="outside int32"):
        session.run([hidden, np.full((1, BUCKET), 2**40, dtype=np.int64)])
    outputs = session.run([hidden, mask])  # the interpreter still works after the rejections
    assert [o.shape for o in outputs] == [(1, BUCKET, 32), (1, 2)]


def test_session_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LiteRTSession(tmp_path / "absent.tflite")


def test_conversion_writes_one_file_and_no_temporary(converted):
    folder = converted("device_head", False).path.parent
    assert not list(folder.glob("*.tmp"))
    assert all(p.suffix == ".tflite" for p in folder.iterdir())


def test_convert_without_litert_torch_says_how_to_install(monkeypatch, slices, tmp_path):
    from cartosplit.export.tflite import convert_to_tflite

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # import now raises ImportError
    module = slices[1]["device_tail"][0]
    with pytest.raises(ImportError, match=r"cartosplit\[tflite\]"):
        convert_to_tflite(module, (torch.zeros(1, 4, 32), torch.ones(1, 4)), tmp_path / "x.tflite")
    assert not (tmp_path / "x.tflite").exists()


def test_bucket_for():
    assert bucket_for(1, (32, 64, 128)) == 32
    assert bucket_for(32, (32, 64, 128)) == 32
    assert bucket_for(33, (128, 32, 64)) == 64  # order of the buckets does not matter
    assert bucket_for(128, (32, 64, 128)) == 128
    with pytest.raises(ValueError, match=r"129 tokens.*largest bucket \(128\)"):
        bucket_for(129, (32, 64, 128))
    with pytest.raises(ValueError, match="no sequence-length buckets"):
        bucket_for(4, ())


def test_pad_to():
    ids = np.array([[2, 7, 3]], dtype=np.int64)
    out = pad_to(ids, 5)
    assert out.dtype == np.int64 and out.tolist() == [[2, 7, 3, 0, 0]]
    hidden = np.ones((1, 3, 4), dtype=np.float32)
    out = pad_to(hidden, 6)
    assert out.shape == (1, 6, 4) and out.dtype == np.float32
    assert out[:, :3].sum() == 12 and not out[:, 3:].any()
    assert pad_to(ids, 3) is ids
    assert pad_to(ids, 4, value=9).tolist() == [[2, 7, 3, 9]]
    with pytest.raises(ValueError, match="size 3 down to 2"):
        pad_to(ids, 2)
