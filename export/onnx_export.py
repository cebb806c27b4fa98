"""ONNX export of one slice (dynamic batch and sequence axes), and onnxruntime int8 quantization of it.

The bundle's int8 graphs are *static* (calibrated, QDQ): every activation scale is fixed at export, so an
answer does not depend on what else is in its batch (dynamic quantization takes one activation scale per
tensor, i.e. per batch: 1-2 % of labels moved with the batch). Their weights are 7-bit (``reduce_range``) so
that no x86 CPU saturates: without VNNI, onnxruntime's u8 x s8 kernels add pairs of products into 16 bits
(VPMADDUBSW), which overflows for 8-bit weights and makes int8 answers depend on the host's instruction set;
with 7-bit weights the integer products are exact on AVX2, AVX-512, VNNI and ARM alike. Dynamic
quantization (``quantize_int8``) stays for the benchmarks that compare against it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# opset 17: the TorchScript exporter's well-trodden path (LayerNormalization is native from 17);
# onnxruntime >= 1.14 and every mobile build we target run it.
DEFAULT_OPSET = 17
INT8_CANDIDATES = (("QInt8", False), ("QInt8", True), ("QUInt8", False), ("QUInt8", True))  # dynamic


@dataclass(frozen=True)
class StaticInt8Recipe:
    """One way to quantize a slice statically. Weights: int8 per output channel, 7-bit (see the module
    docstring); activations: uint8 with a fixed scale and zero point per tensor, from the calibration samples'
    min/max; only MatMuls with a constant weight (the dense layers), as dynamic quantization does."""

    name: str
    # the feed-forward output layers read GELU's output, whose rare large values stretch a min/max scale
    # until the common small ones round to a few steps; keeping those MatMuls in fp32 costs some speed
    keep_ffn_output_fp32: bool
    moving_average: bool  # min/max as a moving average over calibration batches, not the extreme of all

    def describe(self) -> str:
        parts = ["MatMul weights int8 per channel (7-bit)", "activations uint8, static min/max"]
        if self.moving_average:
            parts[-1] += " (moving average)"
        if self.keep_ffn_output_fp32:
            parts.append("feed-forward output layers fp32")
        return ", ".join(parts)


STATIC_INT8_RECIPES = (
    StaticInt8Recipe("ffn-out-fp32", keep_ffn_output_fp32=True, moving_average=False),
    StaticInt8Recipe("ffn-out-fp32-moving-average", keep_ffn_output_fp32=True, moving_average=True),
    StaticInt8Recipe("all-dense-moving-average", keep_ffn_output_fp32=False, moving_average=True),
)


def _dynamic_axes(names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    axes = {}
    for name in names:
        if name in ("logits", "router_logits"):
            axes[name] = {0: "batch"}
        else:  # token inputs, attention mask, hidden states
            axes[name] = {0: "batch", 1: "sequence"}
    return axes


def export_onnx(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    path: Path,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Trace ``module`` to ``path`` with dynamic batch and sequence axes; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, on every call
        torch.onnx.export(
            module,
            example_inputs,
            str(tmp),
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=_dynamic_axes(input_names + output_names),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, path)
    return path


def quantize_int8(src: Path, dst: Path, weight_type: str = "QInt8", per_channel: bool = False) -> Path:
    """onnxruntime dynamic quantization: int8 weights, activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst.parent.mkdir(parents=True, exist_ok=True)
    prepared = dst.with_suffix(".prep.onnx")
    # onnxruntime's recommended pre-processing (shape inference + graph optimisation) before quantizing
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)  # symbolic: fails on BERT slices
    try:
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType[weight_type], per_channel=per_channel)
    finally:
        prepared.unlink(missing_ok=True)
    return dst


class FeedsReader:
    """onnxruntime's ``CalibrationDataReader``: one feed (input name -> array) per ``get_next`` call."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def ffn_output_matmuls(path: Path) -> list[str]:
    """Names of the MatMuls that read an activation function's output (GELU, exported as Erf ... Mul)."""
    import onnx

    model = onnx.load(str(path))
    producer = {out: node for node in model.graph.node for out in node.output}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and node.input[0] in producer
        and producer[node.input[0]].op_type in ("Mul", "Gelu", "FastGelu")
    ]


def quantize_int8_static(
    src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], recipe: StaticInt8Recipe = STATIC_INT8_RECIPES[0]
) -> Path:
    """onnxruntime static quantization (QDQ) of ``src``, calibrated on ``feeds`` (the graph's inputs on
    calibration samples); see :class:`StaticInt8Recipe`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not feeds:
        raise ValueError(f"static int8 quantization of {src.name} needs calibration samples; got none")
    dst.parent.mkdir(parents=True, exist_ok=True)
    prepared = dst.with_suffix(".prep.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(dst),
            FeedsReader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=ffn_output_matmuls(prepared) if recipe.keep_ffn_output_fp32 else None,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"MatMulConstBOnly": True, "CalibMovingAverage": recipe.moving_average},
        )
    finally:
        prepared.unlink(missing_ok=True)
    return dst
