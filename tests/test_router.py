import numpy as np
import pytest

from export.router import ROUTER_KINDS, RouterConfig, fit_router, load_router, router_probs, save_router


def clustered(n_per_group: int = 150, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (3, dim))
    x = np.concatenate([c + rng.normal(0, 1, (n_per_group, dim)) for c in centres])
    y = np.repeat(np.arange(3), n_per_group)
    return x.astype(np.float32), y


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


@pytest.mark.parametrize(("kwargs", "match"), [({"kind": "svm"}, "router kind"), ({"holdout": 1.0}, "holdout")])
def test_router_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)
