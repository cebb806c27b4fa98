"""Static int8 (batch- and host-independent answers) and what the servers do with older, dynamic int8 bundles."""

from types import SimpleNamespace

from cartosplit.device_runtime.json_checks import Problems
from cartosplit.device_runtime.manifest import DYNAMIC_QUANTIZATION, STATIC_QUANTIZATION, OnnxInt8Format
from cartosplit.serving.servicer import TierServicer

DYNAMIC = {
    "opset": 17,
    "quantization": DYNAMIC_QUANTIZATION,
    "weight_type": "QUInt8",
    "per_channel": True,
    "candidates": [{"weight_type": "QUInt8", "per_channel": True, "mean_label_agreement": 0.98}],
}


def _read(raw: dict) -> OnnxInt8Format:
    problems = Problems()
    info = OnnxInt8Format.read(raw, "formats.onnx-int8", problems)
    assert info is not None, problems.found
    return info


def test_a_dynamic_int8_bundle_still_loads_and_says_it_depends_on_its_batch():
    info = _read(DYNAMIC)
    assert not info.batch_independent and info.recipe is None
    assert info.to_dict() == DYNAMIC  # round-trips: the fields it lacks stay absent


def test_static_int8_fields_round_trip():
    raw = {
        **DYNAMIC,
        "quantization": STATIC_QUANTIZATION,
        "weight_type": "QInt8",
        "candidates": [{**DYNAMIC["candidates"][0], "recipe": "ffn-out-fp32"}],
        "recipe": "ffn-out-fp32",
        "recipe_description": "...",
        "activation_type": "QUInt8",
        "reduce_range": True,
        "calibration_samples": 256,
    }
    info = _read(raw)
    assert info.batch_independent and info.to_dict() == raw


def _limit(fmt: str, int8: OnnxInt8Format, max_batch: int = 16) -> int:
    server = SimpleNamespace(
        bundle=SimpleNamespace(manifest=SimpleNamespace(formats={"onnx-int8": int8})),
        config=SimpleNamespace(fmt=fmt, max_batch=max_batch),
        tier_name="edge",
    )
    return TierServicer.batch_limit(server)


def test_servers_do_not_batch_dynamic_int8_and_batch_everything_else(caplog):
    dynamic, static = _read(DYNAMIC), _read({**DYNAMIC, "quantization": STATIC_QUANTIZATION})
    assert _limit("onnx-int8", dynamic) == 1
    assert "batching_off" in caplog.text
    assert _limit("onnx-int8", static) == 16
    assert _limit("onnx-fp32", dynamic) == 16  # fp32 answers do not depend on the batch
