"""The bundle: a folder with ``manifest.json`` and every file a tier needs, each listed with size and sha256.

Loading verifies the schema version and every file's size and hash before anything runs, so a
tampered, truncated or missing file is refused with a clear error instead of producing wrong answers.
Torch-free: phones, boards and servers all load bundles through this module.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
# formats a graph may be stored in; TFLite graphs have fixed shapes, one file per sequence bucket
ONNX_FP32, ONNX_INT8, TFLITE_FP32, TFLITE_INT8 = "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"
FORMATS = (ONNX_FP32, ONNX_INT8, TFLITE_FP32, TFLITE_INT8)


class BundleError(ValueError):
    """A bundle that cannot be trusted or used: wrong schema, tampered/missing file, bad manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, relpaths: list[str]) -> dict[str, dict]:
    """Size and sha256 of each file, keyed by its path relative to the bundle folder (POSIX separators)."""
    return {
        rel: {"size": (folder / rel).stat().st_size, "sha256": sha256_file(folder / rel)} for rel in sorted(relpaths)
    }


@dataclass
class Bundle:
    folder: Path
    manifest: dict
    bundle_id: str = ""  # sha256 of manifest.json: every tier must serve the same bundle

    @property
    def split_points(self) -> dict:
        return self.manifest["split_points"]

    @property
    def labels(self) -> list[str]:
        return self.manifest["model"]["labels"]

    def path(self, rel: str) -> Path:
        return self.folder / rel

    def graph_file(self, graph: str, fmt: str, bucket: int | None = None) -> Path:
        """File of ``graph`` in ``fmt`` (and sequence ``bucket`` for TFLite)."""
        graphs = self.manifest["graphs"]
        if graph not in graphs:
            raise BundleError(f"bundle has no graph {graph!r}; it has {sorted(graphs)}")
        files = graphs[graph]["files"]
        if fmt not in files:
            raise BundleError(f"graph {graph!r} is not exported as {fmt}; available: {sorted(files)}")
        entry = files[fmt]
        if isinstance(entry, dict):  # per-bucket files
            if bucket is None or str(bucket) not in entry:
                raise BundleError(
                    f"graph {graph!r} in {fmt} exists for buckets {sorted(map(int, entry))}, not {bucket}"
                )
            entry = entry[str(bucket)]
        return self.folder / entry


_REQUIRED = ("schema_version", "model", "split_points", "tokenizer", "policy", "cost_profile", "graphs", "files")


def load_bundle(folder: str | Path, verify: bool = True) -> Bundle:
    """Read and check a bundle. ``verify=False`` skips hashing (only for trusted, already-checked folders)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{folder} is not a cartosplit bundle: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{folder}: bundle schema version {version!r} is not supported by this cartosplit "
            f"(it reads version {SCHEMA_VERSION}); re-export the bundle or install a matching cartosplit"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks required fields {missing}")
    listed = manifest["files"]
    for graph, spec in manifest["graphs"].items():
        for entry in spec["files"].values():
            for rel in entry.values() if isinstance(entry, dict) else [entry]:
                if rel not in listed:
                    raise BundleError(f"{manifest_path}: graph {graph!r} uses {rel}, which has no size/sha256 entry")
    if manifest["tokenizer"] not in listed:
        raise BundleError(f"{manifest_path}: the tokenizer file has no size/sha256 entry")
    if verify:
        for rel, entry in listed.items():
            path = folder / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise BundleError(f"{manifest_path}: file entry {rel!r} points outside the bundle")
            if not path.is_file():
                raise BundleError(f"{folder}: {rel} is missing")
            size = path.stat().st_size
            if size != entry["size"]:
                raise BundleError(f"{folder}: {rel} has {size} bytes, the manifest says {entry['size']} (truncated?)")
            if sha256_file(path) != entry["sha256"]:
                raise BundleError(f"{folder}: {rel} does not match its sha256 in the manifest (modified or corrupt)")
    return Bundle(folder, manifest, hashlib.sha256(manifest_path.read_bytes()).hexdigest())


def describe(bundle: Bundle) -> str:
    """A readable summary of a bundle (``cartosplit inspect``)."""
    m = bundle.manifest
    sp = m["split_points"]
    lines = [
        f"bundle {bundle.folder}  (schema {m['schema_version']}, cartosplit {m.get('cartosplit_version', '?')}, "
        f"created {m.get('created', '?')})",
        f"model    {m['model'].get('id')}  task {m['model'].get('task')}  labels {m['model'].get('labels')}",
        f"         {sp['total']} layers x {m['model'].get('hidden_size')}, max length {m['model'].get('max_length')}, "
        f"pooling {m['model'].get('pooling')}",
        f"split    router after layer {sp['router_depth']}, device exit after {sp['device']}, "
        f"edge exit after {sp['edge']}, final at {sp['total']}",
        f"router   {m.get('router', {}).get('kind')} at depth {m.get('router', {}).get('depth')}",
        "policy   " + ", ".join(f"{k}={'inf' if v is None else round(v, 4)}" for k, v in m["policy"].items()),
        "costs    "
        + ", ".join(f"{k}={v}" for k, v in m["cost_profile"].items() if isinstance(v, (int, float)))
        + f" ({m['cost_profile'].get('unit')})",
        "formats  " + ", ".join(f"{k} {v}" for k, v in m.get("formats", {}).items()),
        "graphs",
    ]
    for graph, spec in m["graphs"].items():
        lines.append(f"  {graph:<16} in {list(spec['inputs'])} -> out {list(spec['outputs'])}")
    checked = m.get("validation", {})
    lines.append(
        f"validation on {checked.get('samples')} samples of the {checked.get('source')}: "
        "max abs diff vs torch; label / router agreement"
    )
    for fmt, report in checked.get("formats", {}).items():
        verdict = "ok" if report.get("passed") else "FAILED"
        parts = [f"{k} {v:.2e}" for k, v in report.get("max_abs_diff", {}).items()]
        parts += [f"{k} {v:.4f}" for k, v in report.get("agreement", {}).items()]
        lines.append(f"  {fmt:<12} {verdict}: " + ", ".join(parts))
    total = sum(e["size"] for e in m["files"].values())
    lines.append(f"files ({len(m['files'])}, {total / 1e6:.1f} MB)")
    for rel, entry in m["files"].items():
        lines.append(f"  {entry['size'] / 1e6:>8.2f} MB  {rel}  sha256 {entry['sha256'][:16]}…")
    return "\n".join(lines)
