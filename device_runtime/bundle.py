"""The bundle: a folder with ``manifest.json`` and every file a tier needs, each listed with size and sha256.

Loading verifies the schema version and every file's size and hash before anything runs, so a
tampered, truncated or missing file is refused with a clear error instead of producing wrong answers.
A tier bundle (``cartosplit bundle split``) lists only its tier's files, so only those are read and hashed.

Ids: ``Bundle.manifest_sha256`` is the sha256 of this folder's manifest.json; ``Bundle.bundle_id``, which every
request carries and every server compares with its own, is the lineage id: a full bundle's own sha256, or the
``source_bundle`` a tier bundle was cut from. So a device, an edge and a cloud bundle cut from one export work
together, and bundles of different exports refuse each other.
Torch-free: phones, boards and servers all load bundles through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from cartosplit.device_runtime.costs import SplitPoints

# the contract's names are imported from here by every tier; they live with the Manifest
from cartosplit.device_runtime.manifest import (  # noqa: F401
    FORMATS,
    ONNX_FP32,
    ONNX_INT8,
    SCHEMA_VERSION,
    TFLITE_FP32,
    TFLITE_INT8,
    TIERS,
    BundleError,
    FileEntry,
    FormatVerdict,
    Manifest,
    named_tier,
)

MANIFEST_FILE = "manifest.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, relpaths: list[str]) -> dict[str, FileEntry]:
    """Size and sha256 of each file, keyed by its path relative to the bundle folder (POSIX separators)."""
    return {
        rel: FileEntry(size=(folder / rel).stat().st_size, sha256=sha256_file(folder / rel)) for rel in sorted(relpaths)
    }


@dataclass
class Bundle:
    folder: Path
    manifest: Manifest
    bundle_id: str = ""  # the lineage id requests carry: a full bundle's manifest sha256, a tier bundle's source
    manifest_sha256: str = ""  # sha256 of this folder's manifest.json (for a full bundle: its bundle_id)

    @property
    def tier(self) -> str | None:
        """The one tier a tier bundle serves; None for a full bundle (every tier)."""
        return self.manifest.tier

    def serves(self, tier: str) -> bool:
        return self.manifest.tier in (None, tier)

    def require_tier(self, tier: str) -> None:
        """Refuse, naming both tiers, a tier bundle cut for another tier than ``tier`` (device, edge or cloud)."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
        if not self.serves(tier):
            raise BundleError(
                f"{self.folder} is {named_tier(self.tier)} tier bundle (cut from bundle {self.bundle_id[:12]}): "
                f"the {tier} needs the full bundle or {named_tier(tier)} tier bundle "
                f"(cartosplit bundle split FULL --tier {tier})"
            )

    @property
    def split_points(self) -> SplitPoints:
        return self.manifest.split_points

    @property
    def labels(self) -> list[str]:
        return self.manifest.model.labels

    def path(self, rel: str) -> Path:
        return self.folder / rel

    def graph_file(self, graph: str, fmt: str, bucket: int | None = None) -> Path:
        """File of ``graph`` in ``fmt`` (and sequence ``bucket`` for TFLite)."""
        return self.folder / self.manifest.graph_path(graph, fmt, bucket)


def load_bundle(folder: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle. ``verify=False`` skips hashing (only for trusted, already-checked folders)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{folder} is not a cartosplit bundle: {MANIFEST_FILE} is missing")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    manifest = Manifest.from_dict(raw, str(manifest_path))
    if verify:
        for rel, entry in manifest.files.items():
            path = folder / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"{manifest_path}: file entry {rel!r} points outside the bundle")
            if not path.is_file():
                raise BundleError(f"{folder}: {rel} is missing")
            size = path.stat().st_size
            if size != entry.size:
                raise BundleError(f"{folder}: {rel} has {size} bytes, the manifest says {entry.size} (truncated?)")
            if sha256_file(path) != entry.sha256:
                raise BundleError(f"{folder}: {rel} does not match its sha256 in the manifest (modified or corrupt)")
    own = hashlib.sha256(manifest_path.read_bytes()).hexdigest()
    return Bundle(folder, manifest, manifest.source_bundle or own, own)


def refused_formats(manifest: Manifest) -> dict[str, FormatVerdict]:
    """The formats the export validated and refused: their verdicts stay in ``validation``, their graphs are not in
    the bundle (``formats`` and ``graphs`` list only what it holds, so no tier ever tries to load them)."""
    if manifest.validation is None:
        return {}
    return {f: v for f, v in manifest.validation.formats.items() if not v.passed and f not in manifest.formats}


def _input_kind(text_pairs: bool | None) -> str:
    if text_pairs is None:
        return "not recorded (exported before cartosplit recorded it)"
    return "text pairs (text, text_pair)" if text_pairs else "single texts"


def describe(bundle: Bundle) -> str:
    """A readable summary of a bundle (``cartosplit inspect``)."""
    m = bundle.manifest
    sp, model, router, costs = m.split_points, m.model, m.router, m.cost_profile
    lines = [
        f"bundle {bundle.folder}  (schema {m.schema_version}, cartosplit {m.cartosplit_version or '?'}, "
        f"created {m.created or '?'})",
        "tier     "
        + (
            "full bundle: serves the device, the edge and the cloud"
            if m.tier is None
            else f"{m.tier} tier bundle: serves the {m.tier} only; cut from bundle {m.source_bundle}"
        ),
        f"id       {bundle.bundle_id} (requests carry it)"
        + ("" if bundle.manifest_sha256 == bundle.bundle_id else f"; manifest.json sha256 {bundle.manifest_sha256}"),
        f"model    {model.id}  task {model.task or 'own data files'}  labels {model.labels}",
        f"         {sp.total} layers x {model.hidden_size}, max length {model.max_length}, pooling {model.pooling}",
        f"input    {_input_kind(model.text_pairs)}",
        f"split    router after layer {sp.router_depth}, device exit after {sp.device}, "
        f"edge exit after {sp.edge}, final at {sp.total}",
        f"router   {router and router.kind} at depth {router and router.depth}",
        "policy   " + ", ".join(f"{k}={'inf' if v is None else round(v, 4)}" for k, v in m.policy.to_dict().items()),
        "costs    "
        + ", ".join(f"{k}={v}" for k, v in costs.to_dict().items() if isinstance(v, (int, float)))
        + f" ({costs.unit})",
        "formats  " + ", ".join(f"{k} {v.to_dict()}" for k, v in m.formats.items()),
    ]
    refused = refused_formats(m)
    if refused:
        lines.append(f"refused  {', '.join(refused)} at export: not in the bundle (validation below says why)")
    lines.append("graphs")
    for graph, spec in m.graphs.items():
        lines.append(f"  {graph:<16} in {spec.inputs} -> out {spec.outputs}")
    checked = m.validation
    lines.append(
        f"validation on {checked and checked.samples} samples of the {checked and checked.source}: "
        "max abs diff vs torch; label / router agreement"
    )
    for fmt, report in (checked.formats if checked else {}).items():
        verdict = "ok" if report.passed else ("REFUSED, not in the bundle" if fmt in refused else "FAILED")
        if report.samples is not None and checked and report.samples != checked.samples:
            verdict += f" on {report.samples} samples"
        parts = [f"{k} {v:.2e}" for k, v in report.max_abs_diff.items()]
        parts += [f"{k} {v:.4f}" for k, v in report.agreement.items()]
        lines.append(f"  {fmt:<12} {verdict}" + (": " + ", ".join(parts) if parts else ""))
        lines += [f"  {'':<12} failed: {failure}" for failure in report.failures]
    total = sum(e.size for e in m.files.values())
    lines.append(f"files ({len(m.files)}, {total / 1e6:.1f} MB)")
    for rel, entry in m.files.items():
        lines.append(f"  {entry.size / 1e6:>8.2f} MB  {rel}  sha256 {entry.sha256[:16]}…")
    return "\n".join(lines)
