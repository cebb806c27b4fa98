"""``cartosplit bench drift``'s parts that need no model: the corruption, the misread stream, the replay."""

import math
import random

import numpy as np

from cartosplit.benchmarks.drift import corrupt, misread_stream, replay, summarise_rate
from cartosplit.device_runtime.audit import AuditSettings
from cartosplit.device_runtime.policy import Policy

ISSUE_KEYS = {"audit_rate", "detected_after_inputs", "drop_before_pt", "drop_after_adaptation_pt", "audit_cost_share"}
COSTS = np.array([0.4, 0.75, 1.09, 1.5])


def test_corruption_is_seeded_and_touches_only_words() -> None:
    text = "the movie , though long , was a wonderful surprise"
    assert corrupt(text, 0.0, random.Random(0)) == text
    once, again = corrupt(text, 1.0, random.Random(3)), corrupt(text, 1.0, random.Random(3))
    assert once == again
    pairs = list(zip(text.split(), once.split(), strict=False))
    assert [b for a, b in pairs if not a.isalpha() or len(a) < 3] == [
        a for a, b in pairs if not a.isalpha() or len(a) < 3
    ]
    changed = [a != b for a, b in pairs if a.isalpha() and len(a) >= 3]
    assert sum(changed) >= 0.7 * len(changed)


def test_misread_stream_mixes_in_the_share_asked() -> None:
    answers = np.array([0, 1] * 500)
    cloud = answers.copy()
    cloud[::50] = 1 - cloud[::50]  # 20 misread texts
    candidates = np.arange(1000)
    order, pool = misread_stream(answers, cloud, candidates, 20000, 0.05, seed=0)
    assert pool == 20
    misread = answers[order] != cloud[order]
    assert abs(misread.mean() - 0.05) < 0.01


def _probs(n: int, flip: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    final = rng.integers(0, 2, n)
    early = np.where(rng.random(n) < flip, 1 - final, final)

    def onehot(labels, conf):
        p = np.full((n, 2), 1 - conf)
        p[np.arange(n), labels] = conf
        return p

    return {
        "router": rng.dirichlet([1, 1, 1], n),
        "device": onehot(early, 0.95),
        "edge": onehot(early, 0.95),
        "final": onehot(final, 0.99),
    }


def test_replay_detects_the_shift_and_reports_the_issue_keys() -> None:
    rng = np.random.default_rng(0)
    before, after = _probs(3000, 0.0, rng), _probs(6000, 0.1, rng)
    probs = {k: np.concatenate([before[k], after[k]]) for k in before}
    labels = probs["final"].argmax(1)
    anchor = Policy(alpha_device=0.9, alpha_edge=0.9)
    settings = AuditSettings(rate=0.2, epsilon=0.02, recalibrate_after=500, seed=0)
    run = replay(probs, labels, anchor, settings, COSTS, 1.5, shift=3000)
    assert not run["false_alarm"] and run["detected_at"] is not None and run["detected_at"] >= 3000
    assert math.isclose(run["after_detection"]["drop_pt"], 0.0, abs_tol=1e-9)  # safe, then certified
    off = replay(probs, labels, anchor, AuditSettings(rate=0.0), COSTS, 1.5, shift=3000)
    assert off["detected_at"] is None and off["audit_cost_share"] == 0.0
    assert off["after_shift"]["drop_pt"] > 5 > run["after_shift"]["drop_pt"]
    summary = summarise_rate(0.2, [run], p99_ratio=1.01)
    assert ISSUE_KEYS | {"p99_ratio"} <= set(summary) and summary["p99_ratio"] == 1.01
    assert summary["detected_after_inputs"] == run["detected_after_inputs"]
