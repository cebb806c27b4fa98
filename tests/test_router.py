import json
import shutil

import numpy as np
import pytest
import torch

from cartosplit.export.router import (
    ROUTER_KINDS,
    RouterConfig,
    fit_router,
    load_router,
    reference_subset,
    router_probs,
    save_router,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tensors of a few hundred rows: a second thread only adds contention (20x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered(n_per_group: int = 150, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, dim))
    x = np.concatenate([c + rng.normal(0, 1, (n_per_group, dim)) for c in centres])
    y = np.repeat(np.arange(3), n_per_group)
    return x.astype(np.float32), y


def free_inputs(n: int = 450, dim: int = 16, seed: int = 0):
    """Random features; task labels, and groups that only the token count tells apart."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (n, dim)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64)
    n_tokens = rng.integers(3, 60, n)
    groups = np.digitize(n_tokens, [20, 40])
    return x, groups, labels, n_tokens


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_each_router_kind_learns_separable_groups(kind):
    x, y = clustered()
    router, report = fit_router(x, y, RouterConfig(kind=kind, holdout=0.2))
    assert report.holdout_accuracy > 0.9
    assert report.majority_accuracy < 0.5
    assert report.fit_samples + report.holdout_samples == len(y)
    assert np.array(report.confusion).sum() == report.holdout_samples
    probs = router_probs(router, x[:5])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_centroid_router_survives_a_group_with_no_sample():
    x, y = clustered()
    keep = y != 1
    router, report = fit_router(x[keep], y[keep], RouterConfig(kind="centroid"))
    assert router_probs(router, x)[:, 1].max() < 1e-3
    assert report.holdout_accuracy > 0.9


def test_router_save_and_load_round_trip(tmp_path):
    x, y = clustered()
    router, _ = fit_router(x, y, RouterConfig(kind="mlp", depth=2))
    save_router(router, RouterConfig(kind="mlp", depth=2), tmp_path)
    loaded, cfg = load_router(tmp_path)
    assert cfg.depth == 2 and cfg.kind == "mlp"
    np.testing.assert_allclose(router_probs(loaded, x), router_probs(router, x), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "svm"}, "router kind"),
        ({"holdout": 1.0}, "holdout"),
        ({"kind": "knn", "k": 0}, "k must be"),
        ({"kind": "knn", "pca_dims": 0}, "pca_dims"),
        ({"kind": "knn", "ref_dtype": "int8"}, "ref_dtype"),
        ({"kind": "knn", "smoothing": -1.0}, "smoothing"),
        ({"kind": "knn", "max_references": 0}, "max_references"),
        ({"kind": "knn", "free_features": True}, "free_features applies to"),
        ({"kind": "centroid", "free_features": True}, "free_features applies to"),
    ],
)
def test_router_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


def test_a_router_json_written_before_the_new_options_still_loads(tmp_path):
    x, y = clustered()
    cfg = RouterConfig(kind="logreg")
    router, _ = fit_router(x, y, cfg)
    save_router(router, cfg, tmp_path)
    meta = json.loads((tmp_path / "router.json").read_text())
    assert set(meta) == {"config", "in_dim"}  # logreg / mlp / centroid: the saved format is unchanged
    old = {k: meta["config"][k] for k in ("kind", "depth", "hidden_units", "steps", "lr", "weight_decay", "holdout")}
    (tmp_path / "router.json").write_text(json.dumps({"config": {**old, "seed": 0}, "in_dim": meta["in_dim"]}))
    loaded, _ = load_router(tmp_path)
    np.testing.assert_array_equal(router_probs(loaded, x), router_probs(router, x))


# --- knn ----------------------------------------------------------------------------------------------------


def brute_force_shares(x, y, cfg: RouterConfig, queries):
    """The knn router's probabilities, recomputed in numpy from the documented recipe."""
    order = np.random.default_rng(cfg.seed).permutation(len(y))
    fit = order[max(1, round(cfg.holdout * len(y))) :]
    xf, yf = x[fit].astype(np.float64), y[fit]
    mean, std = xf.mean(0), np.maximum(xf.std(0, ddof=1), 1e-6)
    z, q = (xf - mean) / std, (queries - mean) / std
    if cfg.pca_dims is not None and cfg.pca_dims < min(z.shape):
        axes = np.linalg.svd(z, full_matrices=False)[2][: cfg.pca_dims].T
        z, q = z @ axes, q @ axes
    keep = reference_subset(yf, cfg.max_references, cfg.seed)
    refs, ref_groups = z[keep], yf[keep]
    refs = refs / np.linalg.norm(refs, axis=1, keepdims=True)
    if cfg.ref_dtype == "float16":
        refs = refs.astype(np.float16).astype(np.float64)
    cosine = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ refs.T
    k = min(cfg.k, len(refs))
    nearest = np.argsort(-cosine, axis=1, kind="stable")[:, :k]
    counts = np.stack([(ref_groups[nearest] == g).sum(1) for g in range(3)], axis=1)
    return (counts + cfg.smoothing) / (k + 3 * cfg.smoothing)


@pytest.mark.parametrize(
    "options",
    [
        {"pca_dims": None},
        {"pca_dims": 6},
        {"pca_dims": 6, "ref_dtype": "float16"},
        {"pca_dims": None, "smoothing": 0.0, "k": 7},
        {"pca_dims": 64},  # more than the 16 features: no projection
        {"max_references": 100, "k": 500},  # subset of the fit samples; k capped at the references
    ],
)
def test_knn_probabilities_are_the_brute_force_neighbour_shares(options):
    x, y = clustered(n_per_group=120, dim=16, seed=1)
    x = x + np.random.default_rng(2).normal(0, 2.5, x.shape).astype(np.float32)  # overlapping groups
    cfg = RouterConfig(kind="knn", **options)
    router, report = fit_router(x, y, cfg)
    queries = clustered(n_per_group=40, dim=16, seed=3)[0] + np.random.default_rng(4).normal(0, 2.5, (120, 16))
    queries = queries.astype(np.float32)
    expected = brute_force_shares(x, y, cfg, queries.astype(np.float64))
    np.testing.assert_allclose(router_probs(router, queries), expected, atol=1e-5)
    assert report.fit_samples + report.holdout_samples == len(y)
    assert 0.0 < report.holdout_accuracy <= 1.0
    refs = router.references
    assert refs.dtype == (torch.float16 if cfg.ref_dtype == "float16" else torch.float32)
    projected = cfg.pca_dims is not None and cfg.pca_dims < 16
    assert refs.shape == ((cfg.pca_dims if projected else 16), min(cfg.max_references, report.fit_samples))
    assert hasattr(router, "projection") == projected
    assert router.trainable() == []  # nothing fitted by gradient steps


def test_knn_references_are_a_stratified_seeded_subset():
    groups = np.repeat([0, 1, 2], [700, 200, 100])
    pick = reference_subset(groups, 100, seed=0)
    assert len(pick) == 100 and len(set(pick)) == 100
    assert np.bincount(groups[pick]).tolist() == [70, 20, 10]
    np.testing.assert_array_equal(pick, reference_subset(groups, 100, seed=0))
    assert not np.array_equal(pick, reference_subset(groups, 100, seed=1))
    np.testing.assert_array_equal(reference_subset(groups, 5000, seed=0), np.arange(1000))


def test_knn_float16_references_halve_the_stored_bytes(tmp_path):
    x, y = clustered(n_per_group=300, dim=16)
    sizes = {}
    for dtype in ("float32", "float16"):
        cfg = RouterConfig(kind="knn", pca_dims=None, ref_dtype=dtype)
        router, _ = fit_router(x, y, cfg)
        save_router(router, cfg, tmp_path / dtype)
        sizes[dtype] = router.references.numel() * router.references.element_size()
        assert (tmp_path / dtype / "router.safetensors").stat().st_size > sizes[dtype]
    assert sizes["float16"] * 2 == sizes["float32"]


def test_knn_float16_references_stay_float16_in_the_onnx_file(tmp_path):
    import onnx
    import onnxruntime as ort

    class RouterOnly(torch.nn.Module):
        def __init__(self, router):
            super().__init__()
            self.router = router

        def forward(self, pooled):
            return self.router(pooled)

    x, y = clustered(n_per_group=400, dim=64)
    files = {}
    for dtype in ("float32", "float16"):
        router, _ = fit_router(x, y, RouterConfig(kind="knn", pca_dims=None, ref_dtype=dtype))
        path = tmp_path / f"{dtype}.onnx"
        torch.onnx.export(
            RouterOnly(router).eval(),
            (torch.from_numpy(x[:2]),),
            str(path),
            input_names=["pooled"],
            output_names=["router_logits"],
            dynamic_axes={"pooled": {0: "batch"}, "router_logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pooled": x})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, router(torch.from_numpy(x)).numpy(), atol=1e-5)
        files[dtype] = path.stat().st_size
    # not folded back to float32 by the exporter: the references' half is the file's half
    assert files["float16"] < 0.6 * files["float32"]
    assert "CastLike" in {n.op_type for n in onnx.load(str(tmp_path / "float16.onnx")).graph.node}


@pytest.mark.parametrize(
    "cfg",
    [
        RouterConfig(kind="knn", pca_dims=5, ref_dtype="float16", k=9, depth=2),
        RouterConfig(kind="knn", pca_dims=None, max_references=50, smoothing=0.0),
        RouterConfig(kind="logreg", free_features=True),
        RouterConfig(kind="mlp", free_features=True, hidden_units=8),
    ],
    ids=["knn-pca-fp16", "knn-subset", "logreg-free", "mlp-free"],
)
def test_save_and_load_round_trip_gives_identical_outputs(tmp_path, cfg):
    x, groups, labels, n_tokens = free_inputs()
    router, _ = fit_router(x, groups, cfg, labels=labels, n_tokens=n_tokens)
    save_router(router, cfg, tmp_path)
    loaded, loaded_cfg = load_router(tmp_path)
    assert loaded_cfg == cfg
    tokens = n_tokens if cfg.free_features else None
    np.testing.assert_array_equal(router_probs(loaded, x, tokens), router_probs(router, x, tokens))
    saved, now = router.state_dict(), loaded.state_dict()
    assert saved.keys() == now.keys()
    assert all(saved[k].dtype == now[k].dtype and saved[k].shape == now[k].shape for k in saved)


# --- free features ------------------------------------------------------------------------------------------


def test_free_features_read_the_token_count():
    x, groups, labels, n_tokens = free_inputs(n=600)
    _, plain = fit_router(x, groups, RouterConfig(kind="logreg"))
    router, free = fit_router(x, groups, RouterConfig(kind="logreg", free_features=True), labels, n_tokens)
    assert plain.holdout_accuracy < 0.5 < 0.8 < free.holdout_accuracy
    assert router.trainable() and all(not p.requires_grad for p in router.label_head.parameters())
    # the label head learnt the task at depth r: its max probability is high where x[:, 0] is far from 0
    with torch.no_grad():
        head = torch.softmax(router.label_head((torch.from_numpy(x) - router.mean) / router.scale), -1).numpy()
    assert (head.argmax(1) == labels).mean() > 0.9


def test_free_features_refuse_missing_labels_or_token_counts():
    x, groups, labels, n_tokens = free_inputs()
    cfg = RouterConfig(kind="mlp", free_features=True)
    with pytest.raises(ValueError, match="free_features needs the task labels"):
        fit_router(x, groups, cfg, n_tokens=n_tokens)
    with pytest.raises(ValueError, match="free_features needs each sample's token count"):
        fit_router(x, groups, cfg, labels=labels)
    with pytest.raises(ValueError, match="one label and one token count per sample"):
        fit_router(x, groups, cfg, labels=labels[:-1], n_tokens=n_tokens)
    router, _ = fit_router(x, groups, cfg, labels=labels, n_tokens=n_tokens)
    with pytest.raises(ValueError, match="uses free features: pass n_tokens"):
        router_probs(router, x)
    with pytest.raises(ValueError, match="uses free features: pass n_tokens"):
        router(torch.from_numpy(x))
    # routers without free features ignore a token count they are given
    plain, _ = fit_router(x, groups, RouterConfig(kind="logreg"))
    np.testing.assert_array_equal(router_probs(plain, x, n_tokens), router_probs(plain, x))


# --- export: the router inside the device_head graph --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_multi_exit(tiny_model):
    from cartosplit.export.model import build_model

    torch.manual_seed(0)
    return build_model(str(tiny_model), num_labels=2, device_split=1, edge_split=2).eval()


def token_batch(seed: int, batch: int = 24, length: int = 12):
    """Random ids with a padded tail of random length per row (at least 3 real tokens)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 29, (batch, length))
    mask = (np.arange(length)[None] < rng.integers(3, length + 1, (batch, 1))).astype(np.int64)
    return ids * mask, mask, np.zeros_like(ids)


def pooled_at(model, tokens, depth: int = 1) -> np.ndarray:
    ids, mask, types = (torch.from_numpy(t) for t in tokens)
    with torch.no_grad():
        hidden = model.embed(ids, types)
        hidden = model.run_layers(hidden, model.additive_mask(mask, hidden.dtype), 0, depth)
        return model.pool(hidden, mask).numpy()


@pytest.mark.parametrize(
    "cfg",
    [
        RouterConfig(kind="knn", pca_dims=8, k=5),
        RouterConfig(kind="knn", pca_dims=None, k=5, ref_dtype="float16"),
        RouterConfig(kind="logreg", free_features=True, steps=50),
    ],
    ids=["knn-pca", "knn-fp16", "logreg-free"],
)
def test_device_head_with_the_router_runs_in_onnxruntime_like_torch(tiny_multi_exit, cfg, tmp_path):
    import onnx
    import onnxruntime as ort

    from cartosplit.export.onnx_export import export_onnx, quantize_int8
    from cartosplit.export.slices import build_slices

    model = tiny_multi_exit
    fit_tokens = token_batch(seed=0, batch=200)
    features, n_tokens = pooled_at(model, fit_tokens), fit_tokens[1].sum(1)
    rng = np.random.default_rng(0)
    groups, labels = np.digitize(features[:, 0], np.quantile(features[:, 0], [0.5, 0.8])), rng.integers(0, 2, 200)
    router, _ = fit_router(features, groups, cfg, labels=labels, n_tokens=n_tokens)
    module, ins, outs = build_slices(model, router, router_depth=1)["device_head"]
    example = tuple(torch.from_numpy(t) for t in token_batch(seed=1, batch=2))
    path = export_onnx(module, example, ins, outs, tmp_path / "device_head.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("TopK" in ops) == (cfg.kind == "knn")

    tokens = token_batch(seed=2)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_logits, got_hidden = session.run(None, dict(zip(ins, tokens, strict=True)))
    with torch.no_grad():
        want_logits, want_hidden = (t.numpy() for t in module(*(torch.from_numpy(t) for t in tokens)))
    np.testing.assert_allclose(got_hidden, want_hidden, atol=1e-4)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-4)
    # what calibration computes offline from pooled features and token counts is what the graph computes
    tokens_or_none = tokens[1].sum(1) if cfg.free_features else None
    offline = router_probs(router, pooled_at(model, tokens), tokens_or_none)
    np.testing.assert_allclose(torch.softmax(torch.from_numpy(got_logits), -1).numpy(), offline, atol=1e-4)

    # the bundle writer's int8 path quantizes the graph; it must still run and give the same shapes
    int8 = quantize_int8(path, tmp_path / "device_head.int8.onnx")
    q_logits, q_hidden = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]).run(
        None, dict(zip(ins, tokens, strict=True))
    )
    assert q_logits.shape == got_logits.shape and q_hidden.shape == got_hidden.shape
    assert np.isfinite(q_logits).all()


def test_a_knn_router_calibrates_and_exports_as_a_validated_bundle(trained_run, tmp_path):
    from cartosplit.device_runtime.bundle import load_bundle
    from cartosplit.export.bundle_writer import ExportConfig, export_bundle
    from cartosplit.export.calibrate import CalibrateConfig, calibrate
    from tests.conftest import ONNX_ONLY

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    router_cfg = RouterConfig(kind="knn", depth=1, k=15, pca_dims=16, ref_dtype="float16")
    calibrate(CalibrateConfig(run=str(run), router=router_cfg, guarantee="none"), log=lambda *_: None)
    loaded, cfg = load_router(run / "router")
    assert cfg == router_cfg and loaded.references.dtype == torch.float16
    cfg = ExportConfig(run=str(run), out=str(tmp_path / "bundle"), formats=ONNX_ONLY, validation_samples=64)
    validation = load_bundle(export_bundle(cfg, log=lambda *_: None)).manifest.validation.formats
    fp32 = validation["onnx-fp32"]
    assert fp32.passed and fp32.agreement["router_decisions"] == 1.0
    assert fp32.max_abs_diff["router_logits"] < 1e-4
    assert validation["onnx-int8"].passed
