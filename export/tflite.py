"""Convert one slice (see ``cartosplit.export.slices``) to a fixed-shape TFLite file with litert-torch, and the
bundle's TFLite exporters (the device graphs at every sequence bucket, fp32 and int8).

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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from cartosplit.device_runtime.buckets import bucket_for, pad_to
from cartosplit.device_runtime.manifest import (
    DEVICE_GRAPHS,
    TFLITE_FP32,
    TFLITE_INT8,
    FormatVerdict,
    TfliteFormat,
    graph_path,
)
from cartosplit.device_runtime.text import pad_batch
from cartosplit.export.exporters import ExportContext, Exported
from cartosplit.export.validation import chain, compare, judge, torch_runner

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


# --- the bundle's TFLite formats ------------------------------------------------------------------------


@dataclass
class TfliteFp32Exporter:
    """The device graphs (``device_head``, ``device_tail``) at each sequence bucket, batch 1, fixed shapes."""

    # the same bars as the ONNX formats: one --fp32-tolerance / --int8-min-agreement sets both
    ATOL_FOR_VALIDATION: ClassVar[float | None] = 1e-3
    MIN_AGREEMENT: ClassVar[float] = 0.995
    fmt: ClassVar[str] = TFLITE_FP32
    INT8: ClassVar[bool] = False

    buckets: tuple[int, ...]
    atol: float | None = ATOL_FOR_VALIDATION
    min_agreement: float = MIN_AGREEMENT

    def __post_init__(self) -> None:
        self.buckets = tuple(sorted(self.buckets))

    def export(self, ctx: ExportContext) -> Exported:
        files: dict[str, dict[int, str]] = {}
        for name in DEVICE_GRAPHS:
            module, ins, _ = ctx.slices[name]
            files[name] = {}
            for bucket in self.buckets:
                if ins[0] == "input_ids":
                    example = tuple(torch.zeros(1, bucket, dtype=torch.long) for _ in ins)
                else:
                    example = (torch.zeros(1, bucket, ctx.hidden_size), torch.ones(1, bucket, dtype=torch.long))
                files[name][bucket] = graph_path(self.fmt, name, bucket)
                convert_to_tflite(module, example, ctx.work / files[name][bucket], int8=self.INT8)
        info = TfliteFormat(
            buckets=list(self.buckets),
            batch=1,
            graphs=list(DEVICE_GRAPHS),
            quantization="dynamic_wi8_afp32" if self.INT8 else None,
        )
        return Exported(info, files)

    def validate(self, ctx: ExportContext) -> FormatVerdict:
        """Batch 1, each sample padded to the smallest bucket that fits, as the device runtime does; buckets no
        held-out sample needs are checked with short samples padded up to them."""
        from cartosplit.device_runtime.litert_backend import LiteRTSession

        held = ctx.held_out
        sessions = {
            (name, b): LiteRTSession(ctx.work / graph_path(self.fmt, name, b), ctx.threads)
            for name in DEVICE_GRAPHS
            for b in self.buckets
        }
        reference, produced = [], []
        for bucket in self.buckets:
            fits = [x for x in held.encoded if len(x[0]) <= bucket]
            chosen = [x for x in fits if bucket_for(len(x[0]), self.buckets) == bucket] or fits[:16]
            for sample in chosen[:64]:
                single = pad_batch([sample])
                padded = {k: pad_to(v, bucket) for k, v in single.items()}

                def run(name, inputs, bucket=bucket):
                    return sessions[(name, bucket)].run(inputs)

                reference.append(chain(torch_runner(ctx.slices), single, DEVICE_GRAPHS, held.r, held.e))
                produced.append(chain(run, padded, DEVICE_GRAPHS, held.r, held.e))
        return judge(compare(reference, produced, held.policy), self.atol, self.min_agreement)


@dataclass
class TfliteInt8Exporter(TfliteFp32Exporter):
    """Dynamic range int8 of the fp32 conversion (``dynamic_wi8_afp32``)."""

    ATOL_FOR_VALIDATION: ClassVar[float | None] = None  # quantized: logits move, only the decisions are judged
    MIN_AGREEMENT: ClassVar[float] = 0.95
    fmt: ClassVar[str] = TFLITE_INT8
    INT8: ClassVar[bool] = True

    atol: float | None = ATOL_FOR_VALIDATION
    min_agreement: float = MIN_AGREEMENT
