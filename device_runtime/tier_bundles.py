"""Tier bundles: cut from a full bundle what one tier opens, and nothing else (``cartosplit bundle split``).

A full bundle holds every graph in every format (hundreds of MB with TFLite); a device opens two graphs in one
format and the tokenizer. ``cut_tier_bundle`` copies one tier's graphs (``manifest.graphs_of_tier``) in the
formats asked, the tokenizer for the device, and writes a manifest that lists and hashes only those files and
names the tier and the full bundle it came from (``source_bundle``, whose id requests carry: see
``cartosplit.device_runtime.bundle``). Policy, costs, split points, model and router stay as they are;
``formats`` and ``validation`` keep only the formats held.

Every copied file is hashed as copied and checked against the source manifest before anything is published, so
a modified source file is refused (the copy is the source's bytes: one read verifies both). The new bundle is
written next to ``out`` and renamed into place: an interrupted cut leaves no half bundle under ``out``.

Here, not in ``export/``: it is part of the bundle contract and imports no torch, so it runs on any install,
a device or a server image included (those copy no ``export/``). Torch-free.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from cartosplit.cli_args import comma_list
from cartosplit.device_runtime.bundle import MANIFEST_FILE, BundleError, load_bundle
from cartosplit.device_runtime.manifest import (
    FORMATS,
    TIERS,
    TOKENIZER_TIERS,
    FileEntry,
    GraphSpec,
    Manifest,
    Validation,
    graphs_of_tier,
    named_tier,
)


def tier_formats(manifest: Manifest, tier: str) -> list[str]:
    """The formats in which ``manifest`` holds every graph of ``tier``, in FORMATS order."""
    graphs = graphs_of_tier(tier, manifest.split_points)
    missing = [g for g in graphs if g not in manifest.graphs]
    if missing:
        raise BundleError(f"the bundle lacks the {tier}'s graphs {missing}")
    return [f for f in FORMATS if all(f in manifest.graphs[g].formats() for g in graphs)]


def tier_manifest(source: Manifest, source_id: str, tier: str, formats: Sequence[str]) -> Manifest:
    """``source``'s manifest cut down to ``tier`` in ``formats``; ``files`` still the source's entries."""
    graphs = {}
    for name in graphs_of_tier(tier, source.split_points):
        spec = source.graphs[name]
        graphs[name] = GraphSpec(
            list(spec.inputs),
            list(spec.outputs),
            {f: rel for f, rel in spec.files.items() if f in formats},
            {f: dict(by) for f, by in spec.bucket_files.items() if f in formats},
        )
    tokenizer = source.tokenizer if tier in TOKENIZER_TIERS else None
    held = [rel for spec in graphs.values() for rel in spec.paths()] + ([tokenizer] if tokenizer else [])
    validation = source.validation
    if validation is not None:
        validation = Validation(
            validation.samples, validation.source, {f: v for f, v in validation.formats.items() if f in formats}
        )
    # through to_dict/from_dict: fresh objects, and the cut checked by the same contract that will load it
    cut = replace(
        source,
        tier=tier,
        source_bundle=source_id,
        tokenizer=tokenizer,
        formats={f: info for f, info in source.formats.items() if f in formats},
        graphs=graphs,
        validation=validation,
        files={rel: source.files[rel] for rel in sorted(held)},
    )
    return Manifest.from_dict(cut.to_dict(), f"the {tier} tier manifest")


def _copy_verified(source: Path, work: Path, rel: str, entry: FileEntry, chunk: int = 1 << 20) -> FileEntry:
    """Copy ``source/rel`` to ``work/rel``, hashing as it goes; refuse a source file that does not match ``entry``."""
    src, dst = source / rel, work / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise BundleError(f"{source}: file entry {rel!r} points outside the bundle")
    if not src.is_file():
        raise BundleError(f"{source}: {rel} is missing")
    dst.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with src.open("rb") as fin, dst.open("wb") as fout:
        while block := fin.read(chunk):
            digest.update(block)
            fout.write(block)
            size += len(block)
    found = FileEntry(size=size, sha256=digest.hexdigest())
    if size != entry.size:
        raise BundleError(f"{source}: {rel} has {size} bytes, the manifest says {entry.size} (truncated?)")
    if found != entry:
        raise BundleError(f"{source}: {rel} does not match its sha256 in the manifest (modified or corrupt)")
    return found


def _refuse_existing(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BundleError(f"{out} exists and is not empty: choose another --out, or remove it first")


def cut_tier_bundle(source: str | Path, tier: str, formats: Sequence[str] | None, out: str | Path) -> Path:
    """Write at ``out`` the ``tier`` bundle of the full bundle ``source``, holding ``formats`` (None: every
    format ``source`` holds all that tier's graphs in); returns ``out``.

    Refuses a tier bundle as source (cut from the full bundle), an unknown tier, a format the source lacks
    for this tier (naming those it has), a modified source file, and an existing non-empty ``out``.
    """
    source, out = Path(source), Path(out)
    if tier not in TIERS:
        raise BundleError(f"tier must be one of {', '.join(TIERS)}, got {tier!r}")
    _refuse_existing(out)
    full = load_bundle(source, verify=False)  # the files it takes are verified as they are copied
    if full.tier is not None:
        raise BundleError(
            f"{source} is already {named_tier(full.tier)} tier bundle: cut tier bundles from the full bundle it "
            f"came from (id {full.bundle_id[:12]})"
        )
    available = tier_formats(full.manifest, tier)
    if formats is None:
        formats = available
    if not formats:
        raise BundleError(f"choose at least one format; {source} has the {tier}'s graphs in {available}")
    lacking = [f for f in formats if f not in available]
    if lacking:
        raise BundleError(
            f"{source} does not hold the {tier}'s graphs in {', '.join(lacking)}; it has them in "
            f"{', '.join(available) or 'no format'}"
        )
    formats = [f for f in FORMATS if f in formats]  # FORMATS order, duplicates dropped
    manifest = tier_manifest(full.manifest, full.bundle_id, tier, formats)

    work = out.with_name(out.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        # each entry written is the copy's own size and hash, equal to the source's or refused
        manifest.files = {rel: _copy_verified(source, work, rel, entry) for rel, entry in manifest.files.items()}
        (work / MANIFEST_FILE).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
        load_bundle(work)  # the contract's own check of what was written (re-hashes the copies)
        _refuse_existing(out)  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()  # empty: checked above
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def bundle_size(folder: Path) -> int:
    """Bytes of every file under ``folder`` (manifest.json included)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# --- cartosplit bundle split --------------------------------------------------------------------------------


def add_bundle_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit bundle``: its subcommands (``split``)."""
    sub = parser.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND", required=True)
    split = sub.add_parser(
        "split",
        help="cut from a full bundle what one tier opens (device, edge or cloud)",
        description="Copy from the full bundle SOURCE the graphs one tier opens (device: device_head, device_tail "
        "and the tokenizer; edge: edge; cloud: cloud_from_* and full) in the formats asked, into a new bundle whose "
        "manifest lists and hashes only those files and names the tier and SOURCE's id. The tiers of one export "
        "interoperate whichever mix of full and tier bundles they hold; bundles of different exports refuse each "
        "other. Every copied file is checked against SOURCE's manifest. Needs no torch.",
    )
    split.add_argument("source", metavar="SOURCE", help="the full bundle folder (as `cartosplit export` wrote it)")
    split.add_argument("--tier", required=True, choices=TIERS, help="the tier the new bundle serves")
    split.add_argument(
        "--formats",
        type=comma_list(str),
        help="comma-separated formats to keep, e.g. tflite-int8 (default: every format SOURCE holds the tier's "
        "graphs in; the servers run onnx-fp32/onnx-int8)",
    )
    split.add_argument("--out", help="the folder to write; must not exist or be empty (default: SOURCE-TIER)")


def cmd_bundle(args: argparse.Namespace) -> int:
    """``cartosplit bundle split``."""
    source = Path(args.source)
    out = Path(args.out) if args.out else source.with_name(f"{source.name}-{args.tier}")
    cut_tier_bundle(source, args.tier, args.formats, out)
    cut = load_bundle(out, verify=False)  # just verified by the cut
    print(
        f"{args.tier} tier bundle written to {out}: {', '.join(cut.manifest.formats)}, "
        f"{len(cut.manifest.files)} files, {bundle_size(out) / 1e6:.1f} MB (the full bundle: "
        f"{bundle_size(source) / 1e6:.1f} MB); bundle id {cut.bundle_id[:12]}, as its source's"
    )
    return 0
