"""ONNX export of one slice (dynamic batch and sequence axes) and onnxruntime dynamic int8 quantization."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

# opset 17: the TorchScript exporter's well-trodden path (LayerNormalization is native from 17);
# onnxruntime >= 1.14 and every mobile build we target run it.
DEFAULT_OPSET = 17
INT8_CANDIDATES = (("QInt8", False), ("QInt8", True), ("QUInt8", False), ("QUInt8", True))


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
