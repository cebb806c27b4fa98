"""One exporter per bundle format, shaped like optimum's: ``export`` writes the format's graphs, ``validate``
judges them against torch with the format's tolerance (``ATOL_FOR_VALIDATION``, ``MIN_AGREEMENT``).

``export_bundle`` runs every exporter's ``export``, then every ``validate``, and only then decides, so that a
refused bundle lists the failures of every format. The TFLite exporters are in ``cartosplit.export.tflite``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import numpy as np
import torch

from cartosplit.device_runtime.manifest import (
    ONNX_FP32,
    ONNX_INT8,
    STATIC_QUANTIZATION,
    FormatInfo,
    FormatVerdict,
    Int8Candidate,
    OnnxFormat,
    OnnxInt8Format,
    format_folder,
    graph_path,
)
from cartosplit.device_runtime.onnx_backend import OnnxSession
from cartosplit.export.onnx_export import STATIC_INT8_RECIPES, export_onnx, quantize_int8_static
from cartosplit.export.validation import HeldOut, RunGraph, chain, judge, mean_label_agreement


class ExportError(ValueError):
    """Export refused: a missing prerequisite, or an artifact that does not match the torch model."""


@dataclass
class ExportContext:
    """What every exporter reads: the slices, the held-out samples with their torch reference, where to write."""

    held_out: HeldOut
    work: Path  # the bundle folder being written
    hidden_size: int
    opset: int
    threads: int | None
    log: Callable[[str], None]
    # padded token batches of training samples (never the held-out ones): what static int8 is calibrated on
    calibration: list[dict[str, np.ndarray]] = field(default_factory=list)

    @property
    def slices(self) -> dict:
        return self.held_out.slices


@dataclass
class Exported:
    info: FormatInfo  # the manifest's formats[fmt]
    files: dict[str, str | dict[int, str]]  # graph -> path in the bundle (TFLite: bucket -> path)


class Exporter(Protocol):
    fmt: str

    def export(self, ctx: ExportContext) -> Exported: ...

    def validate(self, ctx: ExportContext) -> FormatVerdict: ...


def _onnx_runner(folder: Path, ctx: ExportContext) -> RunGraph:
    sessions = {name: OnnxSession(folder / f"{name}.onnx", ctx.threads) for name in ctx.slices}
    return lambda name, inputs: sessions[name].run(inputs)


@dataclass
class OnnxFp32Exporter:
    """Every slice traced to ONNX with dynamic batch and sequence axes."""

    ATOL_FOR_VALIDATION: ClassVar[float] = 1e-3  # max abs diff of any logits
    MIN_AGREEMENT: ClassVar[float] = 0.995  # predicted labels and router decisions
    fmt: ClassVar[str] = ONNX_FP32

    atol: float = ATOL_FOR_VALIDATION
    min_agreement: float = MIN_AGREEMENT

    def export(self, ctx: ExportContext) -> Exported:
        example = ctx.held_out.batches[0]
        hidden = torch.zeros((*example["input_ids"].shape, ctx.hidden_size))
        mask = torch.from_numpy(example["attention_mask"])
        files = {}
        for name, (module, ins, outs) in ctx.slices.items():
            inputs = tuple(torch.from_numpy(example[k]) for k in ins) if ins[0] == "input_ids" else (hidden, mask)
            files[name] = graph_path(self.fmt, name)
            export_onnx(module, inputs, ins, outs, ctx.work / files[name], ctx.opset)
            session = OnnxSession(ctx.work / files[name])
            if (tuple(session.input_names), tuple(session.output_names)) != (ins, outs):
                raise ExportError(f"{name}.onnx has inputs {session.input_names} / outputs {session.output_names}")
        return Exported(OnnxFormat(opset=ctx.opset, dynamic_axes=["batch", "sequence"]), files)

    def validate(self, ctx: ExportContext) -> FormatVerdict:
        folder = ctx.work / format_folder(self.fmt)
        return judge(ctx.held_out.measure(_onnx_runner(folder, ctx)), self.atol, self.min_agreement)


@dataclass
class OnnxInt8Exporter:
    """onnxruntime static int8 (QDQ), quantized from the fp32 graphs (export those first) and calibrated on
    training samples (``ExportContext.calibration``), never on the held-out ones it is judged on. The recipe
    is chosen by measured label agreement with torch (:data:`STATIC_INT8_RECIPES`). Static, so an answer
    does not depend on its batch; 7-bit weights, so it does not depend on the host's CPU (see onnx_export)."""

    ATOL_FOR_VALIDATION: ClassVar[float | None] = None  # quantized: logits move, only the decisions are judged
    MIN_AGREEMENT: ClassVar[float] = 0.95
    fmt: ClassVar[str] = ONNX_INT8

    atol: float | None = ATOL_FOR_VALIDATION
    min_agreement: float = MIN_AGREEMENT
    # the candidate search already measured the chosen graphs against torch: validate judges that measurement
    _chosen_report: dict | None = field(default=None, init=False, repr=False)

    def export(self, ctx: ExportContext) -> Exported:
        if not ctx.calibration:
            raise ExportError(f"{self.fmt} is calibrated on training samples: the export context has none")
        onnx = ctx.work / "onnx"
        feeds = _graph_feeds(onnx / "fp32", ctx)
        candidates = []
        for recipe in STATIC_INT8_RECIPES:
            folder = onnx / f"int8-{recipe.name}"
            for name in ctx.slices:
                src = ctx.work / graph_path(ONNX_FP32, name)
                quantize_int8_static(src, folder / f"{name}.onnx", feeds[name], recipe)
            report = ctx.held_out.measure(_onnx_runner(folder, ctx))
            score = mean_label_agreement(report)
            candidates.append((score, recipe, folder, report))
            ctx.log(f"  int8 static {recipe.name}: mean label agreement {score:.4f}")
        _, recipe, folder, self._chosen_report = max(candidates, key=lambda c: c[0])
        folder.rename(ctx.work / format_folder(self.fmt))
        for _, _, other, _ in candidates:
            shutil.rmtree(other, ignore_errors=True)
        ctx.log(f"{self.fmt}: chose {recipe.name} ({recipe.describe()})")
        info = OnnxInt8Format(
            opset=ctx.opset,
            quantization=STATIC_QUANTIZATION,
            weight_type="QInt8",
            per_channel=True,
            candidates=[
                Int8Candidate(weight_type="QInt8", per_channel=True, mean_label_agreement=s, recipe=r.name)
                for s, r, *_ in candidates
            ],
            recipe=recipe.name,
            recipe_description=recipe.describe(),
            activation_type="QUInt8",
            reduce_range=True,
            calibration_samples=sum(len(b["input_ids"]) for b in ctx.calibration),
        )
        return Exported(info, {name: graph_path(self.fmt, name) for name in ctx.slices})

    def validate(self, ctx: ExportContext) -> FormatVerdict:
        if self._chosen_report is None:
            raise RuntimeError("validate() needs export() first: the candidate search measures the int8 graphs")
        return judge(self._chosen_report, self.atol, self.min_agreement)


def _graph_feeds(fp32: Path, ctx: ExportContext) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every slice's inputs on the calibration samples, as the fp32 tier chain produces them."""
    sessions = {name: OnnxSession(fp32 / f"{name}.onnx", ctx.threads) for name in ctx.slices}
    feeds: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in ctx.slices}

    def run(name: str, inputs: list[np.ndarray]) -> list[np.ndarray]:
        feeds[name].append(dict(zip(sessions[name].input_names, inputs, strict=True)))
        return sessions[name].run(inputs)

    for batch in ctx.calibration:
        chain(run, batch, set(ctx.slices), ctx.held_out.r, ctx.held_out.e)
    return feeds
