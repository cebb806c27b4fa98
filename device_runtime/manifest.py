"""The bundle contract: ``manifest.json`` as typed dataclasses, and the rule that names graphs and their files.

``Manifest.from_dict`` checks every field the tiers rely on and refuses a bad manifest with one
``BundleError`` listing every problem by its path (``files["tokenizer.json"] lacks "size"``);
``to_dict`` gives back exactly the layout the exporter writes, keys in the same order, so that
``to_dict(from_dict(d)) == d`` and a re-written manifest keeps its bytes (the bundle id is their sha256).

Unknown keys are refused in the typed sections: a typo or a field of a newer exporter must not silently
fall back to a default. The report sections, written for people and never read by a tier (the router's
fit report, the calibration objective and guarantee), are kept as written. A manifest lacking an optional
field gains it, with its default, in ``to_dict`` (but ``model.vocab_size``, which servers need to see absent,
and ``tier``, ``source_bundle`` and ``tokenizer``, left out while None: a full bundle's bytes, and so its id,
stay as they were before tier bundles existed).
How problems are collected: ``cartosplit.device_runtime.json_checks``.

Tier bundles: a full bundle (no ``tier``) holds every graph; a tier bundle, cut from one
(``cartosplit.device_runtime.tier_bundles``), holds only what one tier opens (``graphs_of_tier``), names that
tier and its ``source_bundle`` (the full bundle's id), and may omit the tokenizer when it is the edge's or the
cloud's.

Torch-free: the exporter builds a ``Manifest``; phones, boards and servers read one.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from cartosplit.device_runtime.costs import CostProfile, SplitPoints
from cartosplit.device_runtime.json_checks import (
    INT,
    LIST,
    NUMBER,
    OBJECT,
    STR,
    STRS,
    Check,
    Flat,
    Problems,
    at,
    entries,
    item,
    nullable,
    plain,
)
from cartosplit.device_runtime.policy import Policy

SCHEMA_VERSION = 1
# formats a graph may be stored in; TFLite graphs have fixed shapes, one file per sequence bucket
ONNX_FP32, ONNX_INT8, TFLITE_FP32, TFLITE_INT8 = "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"
# onnx-int8's quantization: static (calibrated, QDQ: fixed activation scales, so an answer does not depend on its
# batch) since schema 1 bundles of cartosplit 0.x; older bundles say DYNAMIC_QUANTIZATION (one scale per batch)
STATIC_QUANTIZATION, DYNAMIC_QUANTIZATION = "onnxruntime static (QDQ)", "onnxruntime dynamic"
FORMATS = (ONNX_FP32, ONNX_INT8, TFLITE_FP32, TFLITE_INT8)
BUCKETED_FORMATS = (TFLITE_FP32, TFLITE_INT8)


class BundleError(ValueError):
    """A bundle that cannot be trusted or used: wrong schema, tampered/missing file, bad manifest."""


# --- graph and file names ------------------------------------------------------------------------------

DEVICE_HEAD, DEVICE_TAIL, EDGE, FULL = "device_head", "device_tail", "edge", "full"
DEVICE_GRAPHS = (DEVICE_HEAD, DEVICE_TAIL)  # what a phone runs; the only graphs exported to TFLite
EDGE_GRAPHS = (EDGE,)
_CLOUD = re.compile(r"cloud_from_(\d+)")


def cloud_graph(depth: int) -> str:
    """The cloud graph that takes the hidden state at ``depth`` and runs the remaining layers and the final
    exit. Depth 0 has none: there the cloud gets tokens and runs ``full``."""
    if depth < 1:
        raise ValueError(f"a cloud graph starts after at least one layer, got depth {depth}")
    return f"cloud_from_{depth}"


def cloud_graph_depth(graph: str) -> int | None:
    """The depth a ``cloud_graph`` starts from; None for every other graph."""
    match = _CLOUD.fullmatch(graph)
    return int(match.group(1)) if match else None


def cloud_graphs_by_depth(split: SplitPoints) -> dict[int, str]:
    """Entry depth -> the cloud's graph: the edge split e and the router depth r (when r > 0) take hidden
    states (``cloud_from_<depth>``), depth 0 takes tokens (``full``, the all-cloud path)."""
    graphs = {0: FULL}
    for depth in (split.edge, split.router_depth):
        if depth > 0:
            graphs[depth] = cloud_graph(depth)
    return graphs


# --- tiers and the graphs their bundles hold ----------------------------------------------------------------

# A full bundle (manifest ``tier`` absent) holds every graph and serves every tier; a tier bundle, cut from a
# full one (``cartosplit bundle split``), holds one tier's graphs and names the full bundle in ``source_bundle``.
DEVICE_TIER, EDGE_TIER, CLOUD_TIER = "device", "edge", "cloud"
TIERS = (DEVICE_TIER, EDGE_TIER, CLOUD_TIER)
TOKENIZER_TIERS = (DEVICE_TIER,)  # the only tier that reads text; edge and cloud tier bundles may omit it


def named_tier(tier: str) -> str:
    """``a device`` / ``an edge``: the tier with its article, for messages."""
    return f"{'an' if tier[:1] in 'aeiou' else 'a'} {tier}"


def graphs_of_tier(tier: str, split: SplitPoints) -> tuple[str, ...]:
    """The graphs a tier opens, hence what its tier bundle holds: the device ``device_head`` and ``device_tail``
    (and the tokenizer), the edge ``edge``, the cloud ``cloud_from_<e>``, ``cloud_from_<r>`` (r > 0) and ``full``."""
    if tier == DEVICE_TIER:
        return DEVICE_GRAPHS
    if tier == EDGE_TIER:
        return EDGE_GRAPHS
    if tier == CLOUD_TIER:
        return tuple(cloud_graphs_by_depth(split).values())
    raise ValueError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")


def format_folder(fmt: str) -> str:
    """The bundle folder of a format's files: ``onnx-int8`` -> ``onnx/int8``."""
    return fmt.replace("-", "/")


def graph_path(fmt: str, graph: str, bucket: int | None = None) -> str:
    """Where a graph's file lives in the bundle: ``onnx/int8/edge.onnx``, ``tflite/fp32/device_head_s32.tflite``
    (the ``_s<bucket>`` suffix is what docs/android.md tells apps to expect)."""
    if fmt in BUCKETED_FORMATS:
        return f"{format_folder(fmt)}/{graph}_s{bucket}.tflite"
    return f"{format_folder(fmt)}/{graph}.onnx"


# --- sections --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ModelInfo(Flat):
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("vocab_size", "text_pairs")

    id: str
    task: str | None = None  # None: trained on a data file, not a GLUE task
    labels: list[str]
    num_layers: int
    hidden_size: int
    vocab_size: int | None = None  # bundles exported before the wire contract lack it
    max_length: int
    pooling: str | None = None
    # True: trained on (text, text_pair) rows (MRPC, RTE, QNLI, or a data file with text_pair), so an input is a
    # pair; False: single texts; None: a bundle exported before it was recorded (unknown), absent from its JSON
    text_pairs: bool | None = None


@dataclass(kw_only=True)
class FileEntry(Flat):
    size: int
    sha256: str


@dataclass(kw_only=True)
class Int8Candidate(Flat):
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("recipe",)

    weight_type: str
    per_channel: bool
    mean_label_agreement: float
    recipe: str | None = None  # static int8's recipe name; absent for dynamic candidates


@dataclass(kw_only=True)
class OnnxFormat(Flat):
    opset: int
    dynamic_axes: list[str]


@dataclass(kw_only=True)
class OnnxInt8Format(Flat):
    """onnxruntime int8 and the candidates it was chosen from (by measured agreement with torch): static
    (STATIC_QUANTIZATION, with its recipe and calibration) or, in older bundles, dynamic."""

    CHECKS: ClassVar[dict[str, Check]] = {"candidates": LIST}  # each item: Int8Candidate.read
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = (
        "recipe",
        "recipe_description",
        "activation_type",
        "reduce_range",
        "calibration_samples",
    )

    opset: int
    quantization: str
    weight_type: str
    per_channel: bool
    candidates: list[Int8Candidate]
    # static int8 only (absent in dynamic bundles)
    recipe: str | None = None
    recipe_description: str | None = None
    activation_type: str | None = None
    reduce_range: bool | None = None  # 7-bit weights: exact integer products on every CPU (no x86 saturation)
    calibration_samples: int | None = None  # training samples the activation scales were set on

    @property
    def batch_independent(self) -> bool:
        """Static scales: a sample's answer does not depend on what else is in its batch."""
        return self.quantization == STATIC_QUANTIZATION

    @classmethod
    def read(cls, raw: Any, path: str, problems: Problems) -> OnnxInt8Format | None:
        info = super().read(raw, path, problems)
        if info is None:
            return None
        candidates = [Int8Candidate.read(c, f"{path}.candidates[{i}]", problems) for i, c in enumerate(info.candidates)]
        if any(c is None for c in candidates):
            return None
        info.candidates = candidates
        return info


@dataclass(kw_only=True)
class TfliteFormat(Flat):
    buckets: list[int]  # sequence lengths, one file per graph and bucket
    batch: int
    graphs: list[str]
    quantization: str | None


FormatInfo = OnnxFormat | OnnxInt8Format | TfliteFormat
FORMAT_INFO = {ONNX_FP32: OnnxFormat, ONNX_INT8: OnnxInt8Format, TFLITE_FP32: TfliteFormat, TFLITE_INT8: TfliteFormat}


def _formats(raw: Any, problems: Problems) -> dict[str, FormatInfo] | None:
    if not problems.check(raw, "formats", OBJECT):
        return None
    read = {}
    for name, info in raw.items():
        if name in FORMAT_INFO:
            read[name] = FORMAT_INFO[name].read(info, item("formats", name), problems)
        else:
            problems.add(f"{item('formats', name)} is an unknown format (known: {', '.join(FORMATS)})")
    return read if len(read) == len(raw) and all(v is not None for v in read.values()) else None


def _bucket_paths(v: Any) -> bool:
    return isinstance(v, dict) and all(isinstance(b, str) and b.isdigit() and isinstance(p, str) for b, p in v.items())


@dataclass
class GraphSpec:
    """A graph's named interface and its file in each format (TFLite: one per sequence bucket)."""

    inputs: list[str]
    outputs: list[str]
    files: dict[str, str] = field(default_factory=dict)  # format -> path
    bucket_files: dict[str, dict[int, str]] = field(default_factory=dict)  # format -> bucket -> path

    @classmethod
    def read(cls, raw: Any, path: str, problems: Problems) -> GraphSpec | None:
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        inputs = problems.take(raw, path, "inputs", STRS)
        outputs = problems.take(raw, path, "outputs", STRS)
        problems.only(raw, path, ("inputs", "outputs", "files"))
        files, bucket_files = {}, {}
        for fmt, entry in (problems.take(raw, path, "files") or {}).items():
            where = item(at(path, "files"), fmt)
            if fmt not in FORMATS:
                problems.add(f"{where} is an unknown format (known: {', '.join(FORMATS)})")
            elif fmt not in BUCKETED_FORMATS:
                if problems.check(entry, where, STR):
                    files[fmt] = entry
            elif problems.check(entry, where, ("an object of bucket -> path", _bucket_paths)):
                bucket_files[fmt] = {int(b): rel for b, rel in entry.items()}
        return cls(inputs, outputs, files, bucket_files) if len(problems.found) == before else None

    def to_dict(self) -> dict:
        files: dict[str, Any] = dict(self.files)
        files.update({fmt: {str(b): rel for b, rel in by.items()} for fmt, by in self.bucket_files.items()})
        return {"inputs": list(self.inputs), "outputs": list(self.outputs), "files": files}

    def formats(self) -> list[str]:
        return [*self.files, *self.bucket_files]

    def paths(self) -> list[str]:
        return [*self.files.values(), *(rel for by in self.bucket_files.values() for rel in by.values())]


@dataclass(kw_only=True)
class FormatVerdict(Flat):
    """One format's outputs against torch on the held-out samples, and whether they are within tolerance."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("samples",)

    max_abs_diff: dict[str, float]  # per logits output
    agreement: dict[str, float]  # labels at each exit, router argmax and decisions
    passed: bool
    failures: list[str]
    # samples this format was checked on, where fewer than the validation's (TFLite: at most 64 per bucket);
    # absent in bundles exported before it was recorded
    samples: int | None = None


@dataclass
class Validation:
    samples: int
    source: str  # which samples: the run's calibration split, held out from training
    formats: dict[str, FormatVerdict]
    # the exporting machine's CPU (cpu_features.CpuFeatures.summary()): int8 verdicts were measured there;
    # absent in bundles exported before it was recorded
    cpu: dict | None = None

    @classmethod
    def read(cls, raw: Any, path: str, problems: Problems) -> Validation | None:
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        samples = problems.take(raw, path, "samples", INT)
        source = problems.take(raw, path, "source", STR)
        verdicts = entries(problems.take(raw, path, "formats"), at(path, "formats"), problems, FormatVerdict.read)
        cpu = problems.take(raw, path, "cpu", nullable(OBJECT), required=False)
        problems.only(raw, path, ("samples", "source", "formats", "cpu"))
        return cls(samples, source, verdicts, copy.deepcopy(cpu)) if len(problems.found) == before else None

    def to_dict(self) -> dict:
        out = {"samples": self.samples, "source": self.source, "formats": plain(self.formats)}
        if self.cpu is not None:
            out["cpu"] = copy.deepcopy(self.cpu)
        return out


@dataclass
class ExporterInfo:
    """Package versions the bundle was exported with (None: not installed) and how long the export took."""

    versions: dict[str, str | None]  # torch, onnx, onnxruntime, litert-torch
    seconds: float

    @classmethod
    def read(cls, raw: Any, path: str, problems: Problems) -> ExporterInfo | None:
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        seconds = problems.take(raw, path, "seconds", NUMBER)
        versions = {k: v for k, v in raw.items() if k != "seconds"}
        for name, value in versions.items():
            problems.check(value, item(path, name), nullable(STR))
        return cls(versions, seconds) if len(problems.found) == before else None

    def to_dict(self) -> dict:
        return {**self.versions, "seconds": self.seconds}


@dataclass
class RouterInfo:
    """The calibration's router report, kept as written (its fit statistics are for people); the fields a tier
    relies on are checked and typed."""

    report: dict

    @property
    def kind(self) -> str:
        return self.report["kind"]

    @property
    def depth(self) -> int:
        return self.report["depth"]

    @property
    def groups(self) -> list[str]:
        """The order of the router's outputs (easy, medium, hard), which the policy's margins index."""
        return self.report["groups"]

    @classmethod
    def read(cls, raw: Any, path: str, problems: Problems) -> RouterInfo | None:
        if not problems.check(raw, path, OBJECT):
            return None
        before = len(problems.found)
        for key, check in (("kind", STR), ("depth", INT), ("groups", STRS)):
            problems.take(raw, path, key, check)
        return cls(copy.deepcopy(raw)) if len(problems.found) == before else None

    def to_dict(self) -> dict:
        return copy.deepcopy(self.report)


def _split_points(raw: Any, path: str, problems: Problems) -> SplitPoints | None:
    if not problems.exact(SplitPoints, raw, path, INT):
        return None
    try:
        return SplitPoints(**raw)
    except ValueError as exc:
        problems.add(f"{path}: {exc}")
        return None


def _policy(raw: Any, path: str, problems: Problems) -> Policy | None:
    # every threshold is required (null: never): a missing one would silently read as "never"
    return Policy.from_dict(raw) if problems.exact(Policy, raw, path, nullable(NUMBER)) else None


def _cost_profile(raw: Any, path: str, problems: Problems) -> CostProfile | None:
    # missing costs take CostProfile's defaults, as for a cost profile file (CostProfile.from_json)
    if not problems.check(raw, path, OBJECT):
        return None
    before = len(problems.found)
    problems.only(raw, path, [f.name for f in fields(CostProfile)])
    if len(problems.found) > before:
        return None
    try:
        return CostProfile(**raw)
    except ValueError as exc:
        problems.add(f"{path}: {exc}")
        return None


# --- the manifest ----------------------------------------------------------------------------------------

# section -> how to read it; the required ones are refused when missing
_REQUIRED = {
    "model": ModelInfo.read,
    "split_points": _split_points,
    "policy": _policy,
    "cost_profile": _cost_profile,
}
_OPTIONAL = {"router": RouterInfo.read, "validation": Validation.read, "exporter": ExporterInfo.read}


@dataclass(kw_only=True)
class Manifest:
    """``manifest.json``; the field order is the file's key order."""

    # fields left out of manifest.json while None: a full bundle's manifest (and so its id) is as it always was
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("tier", "source_bundle", "tokenizer")

    schema_version: int = SCHEMA_VERSION
    cartosplit_version: str | None = None
    created: str | None = None  # ISO 8601, UTC, to the second (a tier bundle keeps its source's)
    tier: str | None = None  # None: a full bundle, for every tier; else the one tier (TIERS) this bundle serves
    source_bundle: str | None = None  # a tier bundle's lineage: the id (manifest sha256) of the full bundle
    model: ModelInfo
    split_points: SplitPoints
    router: RouterInfo | None = None
    tokenizer: str | None  # path of tokenizer.json in the bundle; None only in an edge or cloud tier bundle
    policy: Policy
    cost_profile: CostProfile
    calibration_objective: dict | None = None  # as the calibration reported it
    # what the policy was certified to hold, on which samples (None for runs calibrated before it)
    calibration_guarantee: dict | None = None
    formats: dict[str, FormatInfo] = field(default_factory=dict)
    graphs: dict[str, GraphSpec]
    validation: Validation | None = None
    exporter: ExporterInfo | None = None
    files: dict[str, FileEntry]  # every file of the bundle but manifest.json, by POSIX path

    def graph_path(self, graph: str, fmt: str, bucket: int | None = None) -> str:
        """Path of ``graph`` in ``fmt`` (and sequence ``bucket`` for TFLite), relative to the bundle."""
        if graph not in self.graphs:
            raise BundleError(f"bundle has no graph {graph!r}; it has {sorted(self.graphs)}")
        found = self.graphs[graph]
        if fmt in found.files:
            return found.files[fmt]
        if fmt not in found.bucket_files:
            raise BundleError(f"graph {graph!r} is not exported as {fmt}; available: {sorted(found.formats())}")
        by_bucket = found.bucket_files[fmt]
        if bucket not in by_bucket:
            raise BundleError(f"graph {graph!r} in {fmt} exists for buckets {sorted(by_bucket)}, not {bucket}")
        return by_bucket[bucket]

    @classmethod
    def from_dict(cls, raw: Any, source: str = "manifest.json") -> Manifest:
        """Check and type a parsed manifest; every problem is named, with its path, in one ``BundleError``."""
        if not isinstance(raw, dict):
            raise BundleError(f"{source} must hold a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:  # the rest of another schema's manifest means something else: stop here
            raise BundleError(
                f"{source}: bundle schema version {version!r} is not supported by this cartosplit "
                f"(it reads version {SCHEMA_VERSION}); re-export the bundle or install a matching cartosplit"
            )
        p = Problems()
        values: dict[str, Any] = {"schema_version": version}
        for key in ("cartosplit_version", "created"):
            values[key] = p.take(raw, "", key, nullable(STR), required=False)
        values["tier"], values["source_bundle"] = _lineage(raw, p)
        for key, read in _REQUIRED.items():
            values[key] = read(raw[key], key, p) if key in raw else p.take(raw, "", key)
        for key, read in _OPTIONAL.items():
            values[key] = read(raw[key], key, p) if raw.get(key) is not None else None
        if values["tier"] in TOKENIZER_TIERS or values["tier"] is None:  # a full or device bundle reads text
            values["tokenizer"] = p.take(raw, "", "tokenizer", STR)
        else:
            values["tokenizer"] = p.take(raw, "", "tokenizer", nullable(STR), required=False)
        for key in ("calibration_objective", "calibration_guarantee"):
            values[key] = copy.deepcopy(p.take(raw, "", key, nullable(OBJECT), required=False))
        values["formats"] = _formats(raw.get("formats", {}), p)
        values["graphs"] = entries(p.take(raw, "", "graphs"), "graphs", p, GraphSpec.read)
        values["files"] = entries(p.take(raw, "", "files"), "files", p, FileEntry.read)
        p.only(raw, "", [f.name for f in fields(cls)])
        if not p.found:
            _check_listed(values, p)
        if not p.found and values["tier"] is not None:
            _check_tier(values, p)
        if p.found:
            raise BundleError(f"{source}: " + "; ".join(p.found))
        return cls(**values)

    def to_dict(self) -> dict:
        """The JSON layout of manifest.json, in fresh objects (changing them leaves the manifest as it is)."""
        return {
            f.name: plain(getattr(self, f.name))
            for f in fields(self)
            if not (f.name in self.OMIT_IF_NONE and getattr(self, f.name) is None)
        }


def _check_listed(values: dict, problems: Problems) -> None:
    """Every file a graph or the tokenizer names needs a size/sha256 entry: only listed files are verified."""
    listed = values["files"]
    for graph, spec in values["graphs"].items():
        for rel in spec.paths():
            if rel not in listed:
                problems.add(f"graph {graph!r} uses {rel}, which has no size/sha256 entry")
    if values["tokenizer"] is not None and values["tokenizer"] not in listed:
        problems.add("the tokenizer file has no size/sha256 entry")


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _lineage(raw: dict, problems: Problems) -> tuple[str | None, str | None]:
    """``tier`` and ``source_bundle``: both absent (a full bundle) or both set (a tier bundle)."""
    tier = problems.take(raw, "", "tier", nullable(STR), required=False)
    source = problems.take(raw, "", "source_bundle", nullable(STR), required=False)
    if tier is not None and tier not in TIERS:
        problems.add(f"tier {tier!r} is not a tier (known: {', '.join(TIERS)})")
    if source is not None and not _SHA256.fullmatch(source):
        problems.add(f"source_bundle must be a bundle id (64 lowercase hex digits), got {source[:70]!r}")
    if (tier is None) != (source is None):
        problems.add(
            "a tier bundle names both its tier and its source_bundle, a full bundle neither; "
            f"this manifest has {'tier' if tier is not None else 'source_bundle'} only"
        )
    return tier, source


def _check_tier(values: dict, problems: Problems) -> None:
    """A tier bundle holds exactly its tier's graphs, each in every format its ``formats`` lists and no other."""
    tier, graphs, formats = values["tier"], values["graphs"], set(values["formats"])
    wanted = graphs_of_tier(tier, values["split_points"])
    missing, foreign = [g for g in wanted if g not in graphs], [g for g in graphs if g not in wanted]
    if missing:
        problems.add(f"{named_tier(tier)} tier bundle needs graphs {missing}, which it lacks")
    if foreign:
        problems.add(f"{named_tier(tier)} tier bundle holds only {list(wanted)}, not {foreign}")
    if not formats:
        problems.add(f"{named_tier(tier)} tier bundle lists no format")
    for graph, spec in graphs.items():
        held = set(spec.formats())
        if held != formats:
            problems.add(
                f"graph {graph!r} of a tier bundle is held in {sorted(held)}, but formats lists {sorted(formats)}"
            )
