import itertools
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cartosplit.device_runtime.costs import (
    TIER_CLOUD_DIRECT,
    TIER_CLOUD_VIA_EDGE,
    TIER_DEVICE,
    TIER_EDGE,
    CostProfile,
    SplitPoints,
)
from cartosplit.device_runtime.policy import (
    ExitSignals,
    Objective,
    Policy,
    _threshold_grid,
    device_decision,
    evaluate_policy,
    leaves_for_cloud,
    route,
    search_policy,
)

SPLIT = SplitPoints(router_depth=1, device=2, edge=4, total=6)


def test_default_profile_costs_follow_the_method_formulas():
    costs = CostProfile().tier_costs(SPLIT)
    # device 2*0.1; edge + 0.2 + 2*0.05; via edge + 0.3 + 2*0.02; direct 1*0.1 + 0.5 + 5*0.02
    np.testing.assert_allclose(costs, [0.2, 0.5, 0.84, 0.7])
    assert CostProfile().all_cloud_cost(SPLIT) == pytest.approx(0.62)
    # r = 0 sends raw tokens: the same as all-cloud
    r0 = SplitPoints(0, 2, 4, 6)
    assert CostProfile().tier_costs(r0)[TIER_CLOUD_DIRECT] == pytest.approx(CostProfile().all_cloud_cost(r0))


def test_all_cloud_and_r0_cloud_direct_pay_the_token_hop_r_above_0_the_hidden_state_hop():
    profile = CostProfile(device_to_cloud_tokens=0.1)  # tokens are cheaper to send than a hidden state
    assert profile.token_hop == 0.1
    # all-cloud: 0.1 + 6*0.02, not o_dc = 0.5
    assert profile.all_cloud_cost(SPLIT) == pytest.approx(0.22)
    # r = 1 sends the hidden state: 1*0.1 + 0.5 + 5*0.02, unchanged; the other tiers do not touch either hop
    np.testing.assert_allclose(profile.tier_costs(SPLIT), [0.2, 0.5, 0.84, 0.7])
    # r = 0 sends tokens: 0*0.1 + 0.1 + 6*0.02, the all-cloud request
    r0 = SplitPoints(0, 2, 4, 6)
    assert profile.tier_costs(r0)[TIER_CLOUD_DIRECT] == pytest.approx(0.22)
    assert CostProfile(device_to_cloud_tokens=0.0).all_cloud_cost(SPLIT) == pytest.approx(0.12)  # 0 is a cost, not None


def test_token_hop_none_falls_back_to_device_to_cloud():
    profile = CostProfile(device_to_cloud=0.7)
    assert profile.device_to_cloud_tokens is None and profile.token_hop == 0.7
    assert profile.all_cloud_cost(SPLIT) == pytest.approx(0.7 + 6 * 0.02)
    r0 = SplitPoints(0, 2, 4, 6)
    assert profile.tier_costs(r0)[TIER_CLOUD_DIRECT] == pytest.approx(0.7 + 6 * 0.02)


def test_token_hop_json_round_trip_old_profiles_and_manifests(tmp_path):
    path = tmp_path / "p.json"
    measured = CostProfile(device_to_cloud=65.5, device_to_cloud_tokens=50.3, unit="ms")
    path.write_text(json.dumps(measured.to_dict()))
    assert CostProfile.from_json(path) == measured
    path.write_text(json.dumps(CostProfile().to_dict()))
    assert json.loads(path.read_text())["device_to_cloud_tokens"] is None  # None stays null
    assert CostProfile.from_json(path) == CostProfile()
    # a profile or bundle manifest written before the token hop existed: loads, and prices as before
    old = {k: v for k, v in CostProfile(device_to_cloud=0.9).to_dict().items() if k != "device_to_cloud_tokens"}
    path.write_text(json.dumps(old))
    assert CostProfile.from_json(path).device_to_cloud_tokens is None
    assert CostProfile(**old).all_cloud_cost(SPLIT) == pytest.approx(0.9 + 6 * 0.02)  # as DeviceRuntime builds it
    for bad in (-1, "50", float("nan")):
        path.write_text(json.dumps({"device_to_cloud_tokens": bad}))
        with pytest.raises(ValueError, match="device_to_cloud_tokens must be a non-negative number"):
            CostProfile.from_json(path)


def test_cost_profile_json_round_trip_and_errors(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"device_per_layer": 3.0, "unit": "ms"}))
    profile = CostProfile.from_json(path)
    assert profile.device_per_layer == 3.0 and profile.unit == "ms" and profile.edge_per_layer == 0.05
    path.write_text(json.dumps({"device_per_layr": 3.0}))
    with pytest.raises(ValueError, match="unknown keys"):
        CostProfile.from_json(path)
    path.write_text(json.dumps({"device_per_layer": -1}))
    with pytest.raises(ValueError, match="non-negative"):
        CostProfile.from_json(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CostProfile.from_json(path)
    with pytest.raises(ValueError, match="does not exist"):
        CostProfile.from_json(tmp_path / "missing.json")


@pytest.mark.parametrize(("r", "d", "e", "total"), [(3, 2, 4, 6), (0, 0, 4, 6), (0, 4, 4, 6), (0, 2, 6, 6)])
def test_split_points_out_of_range_are_refused(r, d, e, total):
    with pytest.raises(ValueError, match=r"split points|at least one layer"):
        SplitPoints(r, d, e, total)


def _probs(conf, pred):
    """Binary probabilities whose max is ``conf`` on class ``pred``."""
    conf, pred = np.asarray(conf, float), np.asarray(pred)
    out = np.stack([1 - conf, conf], axis=1)
    out[pred == 0] = out[pred == 0][:, ::-1]
    return out


def test_route_follows_router_then_exit_confidence():
    signals = ExitSignals(
        probs_device=_probs([0.95, 0.95, 0.6, 0.6, 0.99], [1, 1, 1, 1, 1]),
        probs_edge=_probs([0.9, 0.9, 0.9, 0.6, 0.99], [1, 1, 1, 1, 1]),
        probs_final=_probs([0.9] * 5, [1] * 5),
        router_probs=np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.5, 0.3, 0.2], [0.4, 0.3, 0.3], [0.0, 0.1, 0.9]]),
    )
    policy = Policy(alpha_device=0.9, alpha_edge=0.8, hard_margin=0.85, medium_margin=0.7)
    assert route(policy, signals).tolist() == [
        TIER_DEVICE,  # confident device exit
        TIER_EDGE,  # router sure it is medium: device exit skipped
        TIER_EDGE,  # device unsure, edge sure
        TIER_CLOUD_VIA_EDGE,  # nobody sure
        TIER_CLOUD_DIRECT,  # router sure it is hard, even though the device would be confident
    ]
    # infinite margins: the plain cascade, router ignored
    cascade = Policy(0.9, 0.8)
    assert not cascade.uses_router
    assert route(cascade, signals).tolist() == [TIER_DEVICE, TIER_DEVICE, TIER_EDGE, TIER_CLOUD_VIA_EDGE, TIER_DEVICE]


def test_policy_json_round_trip_keeps_infinity():
    policy = Policy(0.9, 0.8, math.inf, 0.7)
    raw = json.loads(json.dumps(policy.to_dict()))
    assert raw["hard_margin"] is None
    assert Policy.from_dict(raw) == policy


def test_router_policy_without_router_probs_is_an_error():
    signals = ExitSignals(_probs([0.9], [1]), _probs([0.9], [1]), _probs([0.9], [1]))
    with pytest.raises(ValueError, match="router"):
        route(Policy(0.5, 0.5, hard_margin=0.5), signals)


def _route_as_it_was(policy: Policy, signals: ExitSignals) -> np.ndarray:
    """``route`` before device_decision took over its device steps, kept as the reference."""
    n = len(signals)
    if signals.router_probs is None:
        direct = skip_device = np.zeros(n, dtype=bool)
    else:
        direct = signals.router_probs[:, 2] >= policy.hard_margin
        skip_device = ~direct & (signals.router_probs[:, 1] >= policy.medium_margin)
    at_device = ~direct & ~skip_device & (signals.probs_device.max(axis=1) >= policy.alpha_device)
    at_edge = ~direct & ~at_device & (signals.probs_edge.max(axis=1) >= policy.alpha_edge)
    tiers = np.full(n, TIER_CLOUD_VIA_EDGE, dtype=np.int64)
    tiers[at_edge] = TIER_EDGE
    tiers[at_device] = TIER_DEVICE
    tiers[direct] = TIER_CLOUD_DIRECT
    return tiers


def _threshold(draw, observed: np.ndarray) -> float:
    """A threshold that often equals an observed value (where >= and > part), else anywhere, or never (inf)."""
    kind = draw(st.sampled_from(["observed", "uniform", "inf", "zero"]))
    if kind == "observed":
        return float(observed.flat[draw(st.integers(0, observed.size - 1))])
    return {"uniform": draw(st.floats(0.0, 1.0)), "inf": math.inf, "zero": 0.0}[kind]


@settings(max_examples=80, deadline=None)
@given(st.data(), st.integers(1, 40), st.integers(2, 4), st.integers(0, 10_000), st.booleans())
def test_device_decision_agrees_with_route_as_it_was_and_with_itself_per_sample(data, n, k, seed, with_router):
    rng = np.random.default_rng(seed)
    # float32 as the graphs give them, rounded so that ties between samples and thresholds are common
    probs = [np.round(rng.dirichlet(np.ones(k), n), 2).astype(np.float32) for _ in range(3)]
    router = np.round(rng.dirichlet(np.ones(3), n), 2).astype(np.float32) if with_router else None
    signals = ExitSignals(*probs, router)
    alphas = [_threshold(data.draw, p.max(axis=1)) for p in probs[:2]]
    margins = [_threshold(data.draw, router[:, g]) if with_router else math.inf for g in (2, 1)]
    policy = Policy(*alphas, *margins)

    tiers = route(policy, signals)
    assert tiers.dtype == np.int64
    np.testing.assert_array_equal(tiers, _route_as_it_was(policy, signals))
    decision = device_decision(policy, router, signals.probs_device)
    np.testing.assert_array_equal(decision, np.where(tiers == TIER_CLOUD_VIA_EDGE, TIER_EDGE, tiers))
    # the runtime's way: one sample at a time, the router's step first
    for i in range(n):
        one = device_decision(policy, None if router is None else router[i], signals.probs_device[i])
        assert one.shape == () and int(one) == decision[i]
        if router is not None:
            assert bool(leaves_for_cloud(policy, router[i])) == (decision[i] == TIER_CLOUD_DIRECT)


def test_device_decision_without_router_refuses_a_router_policy():
    with pytest.raises(ValueError, match="router"):
        device_decision(Policy(0.5, 0.5, medium_margin=0.5), None, _probs([0.9], [1]))
    assert device_decision(Policy(0.95), None, _probs([0.99, 0.9], [1, 0])).tolist() == [TIER_DEVICE, TIER_EDGE]


def random_problem(seed: int, n: int = 120):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)

    def exit_probs(skill):
        right = rng.random(n) < skill
        pred = np.where(right, labels, 1 - labels)
        return _probs(0.5 + 0.5 * rng.random(n) * np.where(right, 1.0, 0.6), pred)

    router = rng.dirichlet(np.ones(3), n)
    return ExitSignals(exit_probs(0.7), exit_probs(0.8), exit_probs(0.9), router), labels


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), drops=st.tuples(st.floats(0, 5), st.floats(0, 5)))
def test_more_tolerance_never_costs_more(seed, drops):
    signals, labels = random_problem(seed)
    costs = CostProfile().tier_costs(SPLIT)
    small, large = sorted(drops)
    tight = search_policy(signals, labels, costs, Objective("max-drop", small), grid_size=8, margin_grid_size=4)
    loose = search_policy(signals, labels, costs, Objective("max-drop", large), grid_size=8, margin_grid_size=4)
    assert loose.outcome.mean_cost <= tight.outcome.mean_cost + 1e-12
    for found, drop in ((tight, small), (loose, large)):
        assert found.outcome.accuracy >= found.reference_accuracy - drop / 100 - 1e-12


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(["max-drop", "reward"]))
def test_router_policy_never_loses_to_the_cascade_on_its_calibration_data(seed, kind):
    signals, labels = random_problem(seed)
    costs = CostProfile().tier_costs(SPLIT)
    objective = Objective(kind, max_drop=1.0, beta=1.0)
    cascade = search_policy(signals, labels, costs, objective, use_router=False, grid_size=8)
    dimec = search_policy(signals, labels, costs, objective, use_router=True, grid_size=8, margin_grid_size=4)
    if kind == "reward":
        score = lambda o: o.accuracy - o.mean_cost  # noqa: E731
        assert score(dimec.outcome) >= score(cascade.outcome) - 1e-12
    else:
        assert dimec.outcome.mean_cost <= cascade.outcome.mean_cost + 1e-12


def test_vectorised_search_finds_the_brute_force_optimum():
    signals, labels = random_problem(7, n=80)
    costs = CostProfile().tier_costs(SPLIT)
    objective = Objective("reward", beta=0.5)
    found = search_policy(signals, labels, costs, objective, grid_size=5, margin_grid_size=3)
    conf_d, conf_e = signals.probs_device.max(1), signals.probs_edge.max(1)
    best = -np.inf
    for a, b, h, m in itertools.product(
        _threshold_grid(conf_d, 5),
        _threshold_grid(conf_e, 5),
        _threshold_grid(signals.router_probs[:, 2], 3)[1:],
        _threshold_grid(signals.router_probs[:, 1], 3)[1:],
    ):
        o = evaluate_policy(Policy(a, b, h, m), signals, labels, costs)
        best = max(best, o.accuracy - 0.5 * o.mean_cost)
    assert found.outcome.accuracy - 0.5 * found.outcome.mean_cost == pytest.approx(best)


def test_objective_validation():
    with pytest.raises(ValueError, match="objective"):
        Objective("fastest")
    with pytest.raises(ValueError, match="non-negative"):
        Objective("max-drop", max_drop=-1)
