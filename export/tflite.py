"""Convert one slice (see ``cartosplit.export.slices``) to a fixed-shape TFLite file with litert-torch.

litert-torch 0.10 lowers only static shapes, so a slice is converted once per sequence-length bucket
(the shape of ``example_inputs``) and the device pads to the bucket (``cartosplit.device_runtime.litert_backend``).

What the converter does to the interface (checked on every conversion, see ``_check``):
- int64 inputs become int32 (we trace with int32 ids/masks, so no silent downcast happens);
- inputs are named ``args_0..`` in ``forward`` order and outputs ``output_0..`` in the returned tuple's
  order, in one signature ``serving_default``; the interpreter's raw output tensor list is NOT in that
  order, which is why ``LiteRTSession`` maps by signature name.

int8 is dynamic range: weights int8 per channel, activations float and quantized on the fly
(ai-edge-quantizer recipe ``dynamic_wi8_afp32``), applied to the fp32 flatbuffer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

INSTALL_HINT = "pip install 'cartosplit[tflite]'"
FP32_ATOL = 1e-3  # converted fp32 vs torch on the example inputs; real diffs are ~1e-6


@contextlib.contextmanager
def _quiet():
    """litert-torch prints a progress tree, a root-logger warning and torch FutureWarnings per conversion."""
    saved = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        root.setLevel(level)
        if saved is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = saved


def _as_tuple(outputs) -> tuple[torch.Tensor, ...]:
    return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


def _to_int32(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype in (torch.int64, torch.int16, torch.int8, torch.uint8, torch.bool):
        return tensor.to(torch.int32)
    return tensor


def _quantize_int8(model_bytes: bytes) -> bytes:
    try:
        from ai_edge_quantizer import quantizer, recipe
    except ImportError:
        raise ImportError(f"int8 TFLite needs ai-edge-quantizer: {INSTALL_HINT}") from None
    qt = quantizer.Quantizer(bytearray(model_bytes), recipe.dynamic_wi8_afp32())
    # 0.10.0 does not pass enable_progress_bar on to its graph transformation step, whose tqdm bar then
    # shows for any model of 100+ tensors: swallow it (errors still raise)
    with contextlib.redirect_stderr(io.StringIO()):
        result = qt.quantize(enable_progress_bar=False, enable_progress_report=False)
    return bytes(result.quantized_model)


def _write_atomic(data: bytes, path: Path, check=None) -> None:
    """Write to a temporary file beside ``path``, run ``check(tmp)``, then rename: a failed conversion or
    check never replaces a good file, and a reader never sees a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file 0600; a bundle is copied to devices and read by a service user
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check(path: Path, inputs: tuple[torch.Tensor, ...], expected: tuple[torch.Tensor, ...], exact: bool) -> None:
    """Input/output count, shapes and order of a converted file against the torch module."""
    from cartosplit.device_runtime.litert_backend import LiteRTSession

    session = LiteRTSession(path)
    shapes = [tuple(t.shape) for t in inputs]
    if session.input_shapes != shapes:
        raise RuntimeError(f"{path}: converted inputs {session.input_shapes} differ from torch inputs {shapes}")
    outputs = session.run([t.numpy() for t in inputs])
    for i, (got, want) in enumerate(zip(outputs, expected, strict=True)):
        want = want.detach().numpy()
        if got.shape != want.shape:
            raise RuntimeError(f"{path}: output {i} has shape {got.shape}, torch gives {want.shape} (order changed?)")
        if not np.all(np.isfinite(got)):
            raise RuntimeError(f"{path}: output {i} is not finite on the example inputs")
        if exact and not np.allclose(got, want, atol=FP32_ATOL, rtol=FP32_ATOL):
            diff = float(np.abs(got - want).max())
            raise RuntimeError(f"{path}: output {i} differs from torch by {diff:.3g} on the example inputs")


def convert_to_tflite(
    module: torch.nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    int8: bool = False,
    *,
    verify: bool = True,
) -> Path:
    """Convert ``module`` at the FIXED shapes of ``example_inputs`` and write it to ``path`` atomically.

    Integer inputs (token ids, masks) become int32 inputs. Outputs keep the torch order (``output_i`` is
    the i-th returned tensor). With ``verify`` the written file is run once on ``example_inputs``:
    shapes and output order must match torch and, for fp32, values too (atol/rtol 1e-3).
    """
    try:
        import litert_torch
    except ImportError:
        raise ImportError(f"TFLite export needs litert-torch: {INSTALL_HINT}") from None
    path = Path(path)
    if not isinstance(example_inputs, tuple) or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("example_inputs must be a tuple of tensors")
    inputs = tuple(_to_int32(t.detach()) for t in example_inputs)
    module.eval()
    with torch.no_grad():
        expected = _as_tuple(module(*inputs))
    with _quiet(), torch.no_grad():
        edge_model = litert_torch.convert(module, inputs)
        data = edge_model.model_content()
    if int8:
        data = _quantize_int8(data)
    check = (lambda tmp: _check(tmp, inputs, expected, exact=not int8)) if verify else None
    _write_atomic(data, path, check)
    return path
