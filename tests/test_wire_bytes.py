"""Bytes-on-the-wire benchmark: requests sized as the device really builds them, the codec round trip,
the accuracy comparison, and one smoke run on the tiny bundle with the synthetic dev file."""

import json

import numpy as np
import pytest

from cartosplit.benchmarks import wire_bytes
from cartosplit.benchmarks.wire_bytes import bucket_of, compare, hidden_request, round_trip, token_request, wire_size
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.protos import tiers_pb2 as pb


@pytest.fixture(scope="module")
def hidden():
    return np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)


@pytest.mark.parametrize("encoding", ["fp32", "fp16", "int8"])
def test_request_sizes_match_what_the_device_runtime_sends(bundle, hidden, encoding):
    runtime = DeviceRuntime(bundle, encoding=encoding)  # no edge, no cloud: only its request builder is used
    code = {"fp32": pb.FP32, "fp16": pb.FP16, "int8": pb.INT8}[encoding]
    ours = hidden_request(runtime.bundle.bundle_id, 1, hidden, code)
    assert wire_size(ours) == runtime._request(1, hidden=hidden).ByteSize()
    tokens = {"input_ids": np.array([[2, 7, 9, 3]]), "token_type_ids": np.zeros((1, 4), dtype=np.int64)}
    all_cloud = token_request(runtime.bundle.bundle_id, [2, 7, 9, 3], [0, 0, 0, 0])
    assert wire_size(all_cloud) == runtime._request(0, tokens=tokens).ByteSize()


def test_sizes_differ_by_exactly_the_tensor_bytes(hidden):
    size = {code: wire_size(hidden_request("b" * 64, 2, hidden, code)) for code in (pb.FP32, pb.FP16, pb.INT8)}
    assert size[pb.FP32] - size[pb.FP16] == hidden.size * 2
    int8 = hidden_request("b" * 64, 2, hidden, pb.INT8).hidden
    affine = pb.Tensor(scale=int8.scale, zero_point=int8.zero_point).ByteSize()  # INT8's extra fields
    assert size[pb.FP16] - size[pb.INT8] == hidden.size - affine
    forwarded = hidden_request("b" * 64, 2, hidden, pb.FP32, edge_timing=True)
    timing = pb.InferRequest(timings=[pb.TierTiming(tier=pb.EDGE, compute_ms=1.25, queue_ms=0.5)]).ByteSize()
    assert wire_size(forwarded) - size[pb.FP32] == timing


def test_codec_round_trip_is_exact_for_fp32_and_close_for_fp16_and_int8(hidden):
    assert np.array_equal(round_trip(hidden, pb.FP32), hidden)
    assert np.abs(round_trip(hidden, pb.FP16) - hidden).max() < 1e-2
    scale = (hidden.max() - hidden.min()) / 255
    assert np.abs(round_trip(hidden, pb.INT8) - hidden).max() <= scale / 2 + 1e-6


def test_compare_counts_flips_and_points():
    reference = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    encoded = reference.copy()
    encoded[2] = [0.0, 0.5]  # sample 2 flips from 0 to 1 (gold 0: a loss)
    result = compare(reference, encoded, np.array([0, 1, 0, 1]))
    assert result["reference_accuracy"] == 1.0 and result["accuracy"] == 0.75
    assert result["delta_points"] == pytest.approx(-25.0) and result["label_flips"] == 1
    assert result["max_abs_logit_diff"] == 1.0


def test_bucket_is_the_smallest_that_fits():
    assert bucket_of(5, [64, 32, 128]) == 32 and bucket_of(33, [32, 64, 128]) == 64
    with pytest.raises(ValueError, match="fits no bucket"):
        bucket_of(200, [32, 64, 128])


def test_bytes_smoke_run_on_the_tiny_bundle(bundle, synthetic_files, tmp_path):
    out = tmp_path / "bytes"
    argv = ["--bundle", str(bundle), "--data-file", str(synthetic_files[1]), "--limit", "60", "--out", str(out)]
    assert wire_bytes.main(argv) == 0
    r = json.loads(out.with_suffix(".json").read_text())
    assert r["command"].startswith("cartosplit bench bytes --bundle") and r["samples"] == 60
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0
    assert r["encodings"] == ["fp32-padded-max", "fp32", "fp16", "int8"]  # no TFLite buckets in this bundle
    assert r["skipped"][0]["what"] == "fp32-padded-bucket"
    assert r["hops"] == ["device_to_edge", "edge_to_cloud", "device_to_cloud"]
    for hop in r["hops"]:
        mean = {enc: r["bytes"][hop][enc]["mean"] for enc in r["encodings"]}
        assert mean["fp32-padded-max"] > mean["fp32"] > mean["fp16"] > mean["int8"]
        assert r["bytes"][hop]["fp32"]["vs_fp32"] == 1.0
    raw = r["raw_input_bytes"]
    assert (
        0 < raw["text_utf8"]["mean"] < raw["token_ids_all_cloud"]["mean"] < r["bytes"]["device_to_edge"]["int8"]["mean"]
    )
    for exit_name, result in r["accuracy"]["fp32"].items():  # the codec is lossless in fp32
        assert result["label_flips"] == 0 and result["max_abs_logit_diff"] == 0.0, exit_name
    for result in r["accuracy"]["fp32-padded-max"].values():  # padding hidden by the mask
        assert result["label_flips"] == 0 and result["max_abs_logit_diff"] < 1e-4
    for result in r["accuracy"]["int8"].values():
        assert 0 < result["max_abs_logit_diff"] < 1.0


def test_no_data_skips_cleanly_and_writes_nothing(bundle, tmp_path, capsys):
    out = tmp_path / "bytes"
    assert wire_bytes.main(["--bundle", str(bundle), "--data-dir", str(tmp_path), "--out", str(out)]) == 0
    assert "skipped, nothing written" in capsys.readouterr().err
    assert not out.with_suffix(".json").exists()
