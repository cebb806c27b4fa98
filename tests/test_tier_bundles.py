"""Tier bundles: cut from a full bundle what one tier opens; the lineage id lets the tiers of one export work
together and refuses bundles of another export."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys

import grpc
import numpy as np
import pytest

from cartosplit.cli import main
from cartosplit.cloud_server.server import build_cloud_server
from cartosplit.device_runtime.bundle import BundleError, describe, load_bundle
from cartosplit.device_runtime.manifest import TIERS, Manifest, graphs_of_tier
from cartosplit.device_runtime.policy import Policy
from cartosplit.device_runtime.runtime import DeviceRuntime
from cartosplit.device_runtime.tier_bundles import bundle_size, cut_tier_bundle
from cartosplit.edge_server.server import build_edge_server
from cartosplit.export.bundle_writer import ExportConfig, ExportError, export_bundle, write_tier_bundles
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.codec import PROTOCOL_VERSION
from cartosplit.serving.config import ServerConfig
from tests.test_manifest import _raw
from tests.test_runtime import TEXTS, reference_final

FP32, INT8 = "onnx-fp32", "onnx-int8"
NO_TORCH = "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "


@pytest.fixture(scope="module")
def tiers(bundle, tmp_path_factory):
    """The device, edge and cloud tier bundles of the tiny bundle, every format it has."""
    root = tmp_path_factory.mktemp("tiers")
    return {tier: cut_tier_bundle(bundle, tier, None, root / tier) for tier in TIERS}


@pytest.fixture
def source(bundle, tmp_path):
    """A private copy of the tiny bundle (to tamper with, or to cut beside)."""
    return shutil.copytree(bundle, tmp_path / "full")


def _other_export(bundle, folder):
    """The same graphs under another manifest: another export, as far as ids go."""
    shutil.copytree(bundle, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["created"] = "2000-01-01T00:00:00+00:00"
    (folder / "manifest.json").write_text(json.dumps(raw, indent=2) + "\n")
    return folder


def _on_disk(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------- what a cut holds


def test_each_tier_bundle_holds_only_what_its_tier_opens(bundle, tiers):
    full = load_bundle(bundle)
    assert full.tier is None and full.bundle_id == full.manifest_sha256
    full_raw = json.loads((bundle / "manifest.json").read_text())
    assert "tier" not in full_raw and "source_bundle" not in full_raw  # a full bundle's bytes, and id, unchanged
    expected = {
        "device": {"device_head", "device_tail"},
        "edge": {"edge"},
        "cloud": {"full", "cloud_from_1", "cloud_from_2"},  # r = 1, e = 2
    }
    for tier, folder in tiers.items():
        cut = load_bundle(folder)  # verified
        m = cut.manifest
        assert (m.tier, m.source_bundle) == (tier, full.bundle_id)
        assert cut.bundle_id == full.bundle_id != cut.manifest_sha256  # lineage id vs the file's own hash
        assert set(m.graphs) == expected[tier] == set(graphs_of_tier(tier, m.split_points))
        assert list(m.formats) == [FP32, INT8] and set(m.validation.formats) == {FP32, INT8}
        for same in ("model", "split_points", "router", "policy", "cost_profile", "created", "exporter"):
            assert getattr(m, same) == getattr(full.manifest, same), same
        graph_files = {rel for spec in m.graphs.values() for rel in spec.paths()}
        assert set(m.files) == graph_files | ({"tokenizer.json"} if tier == "device" else set())
        assert _on_disk(folder) == sorted([*m.files, "manifest.json"])
        for rel, entry in m.files.items():
            assert entry == full.manifest.files[rel]
        text = (folder / "manifest.json").read_text()
        assert json.dumps(Manifest.from_dict(json.loads(text)).to_dict(), indent=2) + "\n" == text
    assert tiers["device"].joinpath("tokenizer.json").is_file()
    assert "tokenizer" not in json.loads((tiers["edge"] / "manifest.json").read_text())
    assert load_bundle(tiers["cloud"]).manifest.tokenizer is None
    assert bundle_size(tiers["device"]) < bundle_size(bundle) / 3


def test_formats_asked_are_the_only_ones_kept_and_a_missing_one_is_named(source, tmp_path):
    cut = load_bundle(cut_tier_bundle(source, "device", [INT8], tmp_path / "d"))
    assert list(cut.manifest.formats) == [INT8] and list(cut.manifest.validation.formats) == [INT8]
    assert all(f.startswith("onnx/int8/") for f in cut.manifest.files if f != "tokenizer.json")
    with pytest.raises(BundleError, match=r"does not hold the edge's graphs in tflite-int8; it has them in "):
        cut_tier_bundle(source, "edge", ["tflite-int8"], tmp_path / "e")
    with pytest.raises(BundleError, match="tier must be one of device, edge, cloud"):
        cut_tier_bundle(source, "phone", None, tmp_path / "p")
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


def test_an_existing_out_is_refused_and_loses_nothing(source, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists and is not empty"):
        cut_tier_bundle(source, "device", None, out)
    assert _on_disk(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_bundle(cut_tier_bundle(source, "edge", None, empty)).tier == "edge"  # an empty folder is fine
    assert not list(tmp_path.glob("*.partial"))


def test_a_modified_source_file_or_a_tier_bundle_as_source_is_refused(source, tiers, tmp_path):
    graph = source / "onnx" / "int8" / "device_tail.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"onnx/int8/device_tail.onnx does not match its sha256"):
        cut_tier_bundle(source, "device", None, tmp_path / "d")
    graph.write_bytes(bytes(data[:-10]))
    with pytest.raises(BundleError, match=r"device_tail.onnx has \d+ bytes, the manifest says"):
        cut_tier_bundle(source, "device", None, tmp_path / "d")
    assert not (tmp_path / "d").exists() and not list(tmp_path.glob("*.partial"))
    cut_tier_bundle(source, "edge", None, tmp_path / "e")  # the edge takes no device file: it is not blocked
    with pytest.raises(BundleError, match="is already a device tier bundle: cut tier bundles from the full"):
        cut_tier_bundle(tiers["device"], "device", [INT8], tmp_path / "again")


# ---------------------------------------------------------------------------------------- the manifest contract


def _edge_raw() -> dict:
    raw = _raw()
    raw["tier"], raw["source_bundle"] = "edge", "ab" * 32
    raw["graphs"] = {"edge": raw["graphs"]["edge"]}
    del raw["formats"]["tflite-int8"], raw["tokenizer"]
    raw["files"] = {rel: e for rel, e in raw["files"].items() if "/edge." in rel}
    # the typed sections keep their key order: tier and source_bundle follow created
    order = ["schema_version", "cartosplit_version", "created", "tier", "source_bundle"]
    return {k: raw[k] for k in order} | {k: v for k, v in raw.items() if k not in order}


def test_an_edge_tier_manifest_needs_no_tokenizer_and_round_trips():
    raw = _edge_raw()
    m = Manifest.from_dict(copy.deepcopy(raw))
    assert (m.tier, m.source_bundle, m.tokenizer) == ("edge", "ab" * 32, None)
    assert m.to_dict() == raw and list(m.to_dict()) == list(raw)


def _problems(raw: dict) -> str:
    with pytest.raises(BundleError) as caught:
        Manifest.from_dict(raw)
    return str(caught.value)


def test_a_bad_tier_manifest_is_refused_naming_each_problem():
    raw = _edge_raw()
    raw["tier"] = "phone"
    assert "tier 'phone' is not a tier (known: device, edge, cloud)" in _problems(raw)
    raw = _edge_raw()
    del raw["source_bundle"]
    assert "a tier bundle names both its tier and its source_bundle" in _problems(raw)
    raw = _raw()
    raw["source_bundle"] = "ab" * 32
    assert "this manifest has source_bundle only" in _problems(raw)
    raw = _edge_raw()
    raw["source_bundle"] = "XYZ"
    assert "source_bundle must be a bundle id (64 lowercase hex digits)" in _problems(raw)
    raw = _edge_raw()
    raw["tier"] = "device"  # a device bundle reads text: its tokenizer is required, and its graphs differ
    message = _problems(raw)
    assert '"tokenizer" is missing' in message
    raw = _edge_raw()
    full = _raw()
    raw["graphs"]["full"] = full["graphs"]["full"]
    raw["files"].update({rel: e for rel, e in full["files"].items() if "/full." in rel})
    assert "an edge tier bundle holds only ['edge'], not ['full']" in _problems(raw)
    raw = _edge_raw()
    del raw["graphs"]["edge"]["files"]["onnx-int8"]
    assert "graph 'edge' of a tier bundle is held in ['onnx-fp32'], but formats lists" in _problems(raw)
    raw = _edge_raw()
    raw["tier"] = "cloud"
    assert "a cloud tier bundle needs graphs ['full', 'cloud_from_2', 'cloud_from_1']" in _problems(raw)


# ------------------------------------------------------------------------------------------------- end to end


def _servers(cloud_bundle, edge_bundle):
    cloud = build_cloud_server(ServerConfig(cloud_bundle, fmt=FP32, max_wait_ms=2)).start()
    edge = build_edge_server(ServerConfig(edge_bundle, fmt=FP32, max_wait_ms=2), cloud.address).start()
    return cloud, edge


def test_device_edge_and_cloud_tier_bundles_of_one_export_answer_end_to_end(bundle, tiers):
    expected = reference_final(bundle, TEXTS)
    cloud, edge = _servers(tiers["cloud"], tiers["edge"])
    try:
        with DeviceRuntime(tiers["device"], edge=edge.address, cloud=cloud.address, fmt=FP32, encoding="fp32") as rt:
            rt.policy = Policy(alpha_device=math.inf, alpha_edge=math.inf, hard_margin=0.0)
            direct = rt.predict(TEXTS)
            rt.policy = Policy(alpha_device=math.inf, alpha_edge=math.inf)
            via_edge = rt.predict(TEXTS)
            all_cloud = rt.predict_all_cloud(TEXTS)
    finally:
        edge.stop(0)
        cloud.stop(0)
    for predictions in (direct, via_edge, all_cloud):
        assert all(not p.degraded and not p.errors for p in predictions), predictions
    assert {p.route for p in direct} == {"cloud_direct"} and {p.route for p in via_edge} <= {"edge", "cloud_via_edge"}
    for predictions in (direct, all_cloud):
        np.testing.assert_allclose([p.probabilities for p in predictions], expected, atol=1e-5)
    # the device alone answers alike from its tier bundle and from the full bundle
    answers = []
    for folder in (bundle, tiers["device"]):
        with DeviceRuntime(folder, fmt=INT8) as rt:
            rt.policy = Policy(alpha_device=0.0)
            answers.append([p.probabilities for p in rt.predict(TEXTS)])
    np.testing.assert_array_equal(*answers)


def test_a_tier_bundle_of_another_export_is_refused_naming_both_ids(bundle, tiers, tmp_path):
    other = _other_export(bundle, tmp_path / "other")
    other_cloud = cut_tier_bundle(other, "cloud", [FP32], tmp_path / "other-cloud")
    theirs, ours = load_bundle(other_cloud).bundle_id, load_bundle(tiers["device"]).bundle_id
    assert theirs != ours
    cloud = build_cloud_server(ServerConfig(other_cloud, fmt=FP32, max_wait_ms=2)).start()
    try:
        stub = pb_grpc.CloudTierStub(grpc.insecure_channel(cloud.address))
        envelope = pb.InferRequest(request_id="x", bundle_id=ours, protocol_version=PROTOCOL_VERSION, depth=0)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Infer(envelope, timeout=10)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = refused.value.details()
        assert ours[:12] in details and theirs[:12] in details and "come from different exports" in details
        with DeviceRuntime(tiers["device"], cloud=cloud.address, fmt=FP32) as rt:
            rt.policy = Policy(alpha_device=math.inf, alpha_edge=math.inf, hard_margin=0.0)
            (answer,) = rt.predict(TEXTS[:1])
        assert answer.tier == "device" and answer.degraded and "FAILED_PRECONDITION" in answer.errors[0]
    finally:
        cloud.stop(0)


def test_each_tier_refuses_a_bundle_cut_for_another(tiers, capsys):
    with pytest.raises(BundleError, match=r"is an edge tier bundle .*the device needs the full bundle or a device"):
        DeviceRuntime(tiers["edge"])
    with pytest.raises(BundleError, match=r"is a device tier bundle .*the cloud needs the full bundle or a cloud"):
        build_cloud_server(ServerConfig(tiers["device"], fmt=FP32))
    with pytest.raises(BundleError, match=r"is a cloud tier bundle .*the edge needs the full bundle or an edge"):
        build_edge_server(ServerConfig(tiers["cloud"], fmt=FP32), "127.0.0.1:1")
    assert main(["run", "--bundle", str(tiers["cloud"])]) == 2
    assert "is a cloud tier bundle" in capsys.readouterr().err
    done = subprocess.run(
        [sys.executable, "-c", "from cartosplit.cli import main; raise SystemExit(main(['serve-cloud', "
         f"'--bundle', {str(tiers['device'])!r}, '--port', '0']))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "is a device tier bundle" in done.stderr and "Traceback" not in done.stderr


def test_inspect_names_the_tier_and_the_source(bundle, tiers, capsys):
    full_id = load_bundle(bundle).bundle_id
    assert "tier     full bundle: serves the device, the edge and the cloud" in describe(load_bundle(bundle))
    assert main(["inspect", str(tiers["device"])]) == 0
    out = capsys.readouterr().out
    assert f"tier     device tier bundle: serves the device only; cut from bundle {full_id}" in out
    assert f"id       {full_id} (requests carry it); manifest.json sha256 " in out


# ---------------------------------------------------------------------------------------------- command lines


def test_bundle_split_command_writes_beside_the_source_and_refuses_twice(source, capsys):
    assert main(["bundle", "split", str(source), "--tier", "device", "--formats", INT8]) == 0
    out = capsys.readouterr().out
    assert f"device tier bundle written to {source}-device: onnx-int8, 3 files" in out
    assert load_bundle(source.with_name("full-device")).manifest.tier == "device"
    assert main(["bundle", "split", str(source), "--tier", "device"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["bundle", "split", str(source), "--tier", "cloud", "--formats", "tflite-fp32"]) == 2
    assert "it has them in onnx-fp32, onnx-int8" in capsys.readouterr().err


def test_bundle_split_needs_no_torch(source, tmp_path):
    argv = ["bundle", "split", str(source), "--tier", "edge", "--out", str(tmp_path / "edge")]
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH + f"from cartosplit.cli import main; raise SystemExit(main({argv!r}))"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert load_bundle(tmp_path / "edge").tier == "edge"


def test_export_tiers_are_checked_before_any_work(calibrated_run, tmp_path):
    with pytest.raises(ExportError, match="unknown tiers"):
        ExportConfig(run=str(calibrated_run), out=str(tmp_path / "b"), tiers=("phone",))
    with pytest.raises(ExportError, match="add device to the tiers"):
        ExportConfig(run=str(calibrated_run), out=str(tmp_path / "b"), tiers=("edge",), device_formats=(INT8,))
    with pytest.raises(ExportError, match="must be exported formats"):
        ExportConfig(run=str(calibrated_run), out="b", formats=(FP32, INT8), tiers=("device",), device_formats=("x",))
    (tmp_path / "b-edge").mkdir()
    cfg = ExportConfig(run=str(calibrated_run), out=str(tmp_path / "b"), formats=(FP32, INT8), tiers=("edge",))
    with pytest.raises(ExportError, match="b-edge exists: pass --overwrite"):
        export_bundle(cfg, log=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_export_command_with_tiers(calibrated_run, tmp_path, capsys):
    out = tmp_path / "b"
    common = ["export", "--run", str(calibrated_run), "--out", str(out), "--formats", FP32]
    assert main([*common, "--validation-samples", "8", "--tiers", "device,edge,cloud", "--device-formats", FP32]) == 0
    full_id = load_bundle(out).bundle_id
    for tier in TIERS:
        cut = load_bundle(tmp_path / f"b-{tier}")
        assert (cut.tier, cut.bundle_id, list(cut.manifest.formats)) == (tier, full_id, [FP32])
    assert main([*common, "--tiers", "phone"]) == 2
    assert "unknown tiers ['phone']" in capsys.readouterr().err


def test_export_writes_each_tier_beside_the_full_bundle(source):
    logged = []
    written = write_tier_bundles(source, ("device", "edge", "cloud"), (INT8,), overwrite=False, log=logged.append)
    assert written == {t: source.with_name(f"full-{t}") for t in ("device", "edge", "cloud")}
    assert list(load_bundle(written["device"]).manifest.formats) == [INT8]
    assert list(load_bundle(written["cloud"]).manifest.formats) == [FP32, INT8]
    with pytest.raises(BundleError, match="exists and is not empty"):
        write_tier_bundles(source, ("edge",), None, overwrite=False, log=logged.append)
    write_tier_bundles(source, ("edge",), None, overwrite=True, log=logged.append)  # replaced
    assert len(logged) == 4 and "edge tier bundle written to" in logged[-1]


def test_the_tier_bundles_benchmark_on_the_tiny_bundle(bundle, tmp_path):
    from cartosplit.benchmarks.cli import run_benchmark

    out = tmp_path / "tier-bundles"
    argv = ["--bundle", str(bundle), "--out", str(out), "--repeats", "2", "--work", str(tmp_path)]
    assert run_benchmark("tier-bundles", argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["command"].startswith("cartosplit bench tier-bundles --bundle ")
    assert [d["format"] for d in report["device"]] == [FP32, INT8]
    for d in report["device"]:
        assert d["ratio_tier_to_loaded"] <= 1.1 and d["tier_bundle_bytes"] < d["full_bundle_bytes"]
        assert d["loaded_bytes"]["tokenizer"] > 0 and len(d["runs"]["tier"]) == 2
        assert d["start_up_tier"]["total_ms"] > 0 and d["start_up_full"]["verify_ms"] > 0
    assert {(s["tier"], s["format"]) for s in report["servers"]} == {
        (t, f) for t in ("edge", "cloud") for f in (FP32, INT8)
    }
    assert all(c["held"] for c in report["checks"]) and "## Device" in out.with_suffix(".md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the cut bundles went with their temporary folder
