"""Fit one router variant on a trained run: which groups it learns, on which samples, and its verdict.

A variant is a router (kind, depth, features: ``cartosplit.export.router.RouterConfig``) plus where its groups come
from (``cartosplit.export.router_targets``). Groups from the trained samples fit the router on them; held-out groups
(the calibration split's dynamics, or its outcomes) fit it on the *path* part of the calibration split,
the samples that shape the policy path and never certify it. The path then sees out-of-fold router
probabilities, as unseen traffic will; the certifying samples and dev see the router fitted on all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from cartosplit.device_runtime.policy import HARD
from cartosplit.export.router import Router, RouterConfig, RouterReport, fit_router, router_probs
from cartosplit.export.router_targets import (
    RouterVerdict,
    check_variant,
    group_samples,
    heldout_cartography,
    judge_router,
    out_of_fold,
    outcome_groups,
)


@dataclass(frozen=True)
class RouterVariant:
    router: RouterConfig = field(default_factory=RouterConfig)
    groups: str = "train"  # cartosplit.export.router_targets.GROUP_SOURCES
    grouping: str = "fixed"  # cartosplit.export.router_targets.GROUPINGS (ignored by the outcome target)
    folds: int = 5  # cross-fitting of a router fitted on the path samples

    def __post_init__(self) -> None:
        check_variant(self.groups, self.grouping)
        if self.folds < 2:
            raise ValueError(f"cross-fitting needs at least 2 folds, got {self.folds}")

    @property
    def name(self) -> str:
        free = "+free" if getattr(self.router, "free_features", False) else ""
        target = "outcome" if self.groups == "outcome" else f"{self.groups}/{self.grouping}"
        return f"{self.router.kind}{free}@{self.router.depth} {target}"

    def to_dict(self) -> dict:
        return {"name": self.name, "groups": self.groups, "grouping": self.grouping, "router": asdict(self.router)}


@dataclass
class FittedRouter:
    variant: RouterVariant
    router: Router
    report: RouterReport
    group_shares: dict[str, float]  # of the samples it was fitted on
    fitted_on: str  # "trained samples" or "calibration path samples"
    calib_probs: np.ndarray  # [n_calib, 3]; out-of-fold on the path samples when fitted on them
    dev_probs: np.ndarray
    verdict: RouterVerdict  # on the signals alone; ``rejudge`` adds what its path spares under a profile
    predict: Callable[[np.ndarray, np.ndarray], np.ndarray]  # (pooled features, token counts) -> probs
    evidence: tuple = ()  # judge_router's arguments, for rejudge

    def rejudge(self, path_gain: float | None, keep_anyway: bool = False) -> RouterVerdict:
        return judge_router(*self.evidence, keep_anyway=keep_anyway, path_gain=path_gain)

    def summary(self) -> dict:
        return {
            **self.report.to_dict(),
            "variant": self.variant.to_dict(),
            "groups_from": self.variant.groups,
            "grouping": self.variant.grouping if self.variant.groups != "outcome" else None,
            "fitted_on": self.fitted_on,
            "group_shares": self.group_shares,
            "verdict": self.verdict.to_dict(),
        }


def _extra(cfg: RouterConfig, labels: np.ndarray | None, tokens: np.ndarray | None) -> dict:
    """The free features' inputs, only for a router that reads them."""
    if not getattr(cfg, "free_features", False):
        return {}
    return {"labels": labels, "n_tokens": tokens}


def _probs(router: Router, cfg: RouterConfig, features: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    if getattr(cfg, "free_features", False):
        return router_probs(router, features, n_tokens=tokens)
    return router_probs(router, features)


def _shares(groups: np.ndarray) -> dict[str, float]:
    counts = np.bincount(groups, minlength=3) / max(len(groups), 1)
    return dict(zip(("easy", "medium", "hard"), map(float, counts), strict=True))


def fit_variant(data, variant: RouterVariant, path_idx: np.ndarray, keep_anyway: bool = False) -> FittedRouter:
    """Fit ``variant`` on a run's ``cartosplit.export.calibrate.CalibrationData``; judge it on the path samples."""
    cfg, depth = variant.router, variant.router.depth
    feats = {name: data.forward[name][1][depth] for name in ("train", "calib", "dev")}
    toks = data.tokens
    calib = data.sets["calib"]
    calib_preds = np.stack([p.argmax(axis=1) for p in data.forward["calib"][0]])  # [3, N]
    path_idx = np.asarray(path_idx)

    if variant.groups == "train":
        groups = data.groups if variant.grouping == "fixed" else group_samples(data.train_carto, "adaptive")
        train = data.sets["train"]
        router, report = fit_router(feats["train"], groups, cfg, **_extra(cfg, train.labels, toks["train"]))
        calib_probs = _probs(router, cfg, feats["calib"], toks["calib"])
        accuracy, majority = report.holdout_accuracy, report.majority_accuracy
        fitted_on = f"{len(groups)} trained samples (in-sample cartography)"
    else:
        if variant.groups == "heldout":
            if data.heldout_dynamics is None:
                raise ValueError(
                    f"{data.run} has no held-out dynamics (trained before they were recorded): "
                    "retrain it, or use --router-groups train|outcome"
                )
            carto = heldout_cartography(*data.heldout_dynamics)
            groups = group_samples(carto, variant.grouping, data.train_config.grouping)
        else:
            groups = outcome_groups(calib_preds, calib.labels)
        x, g, y, t = feats["calib"][path_idx], groups[path_idx], calib.labels[path_idx], toks["calib"][path_idx]

        def fit_predict(fit: np.ndarray, held: np.ndarray) -> np.ndarray:
            r, _ = fit_router(x[fit], g[fit], cfg, **_extra(cfg, y[fit], t[fit]))
            return _probs(r, cfg, x[held], t[held])

        oof = out_of_fold(fit_predict, len(path_idx), variant.folds, cfg.seed)
        router, report = fit_router(x, g, cfg, **_extra(cfg, y, t))
        calib_probs = _probs(router, cfg, feats["calib"], toks["calib"])
        calib_probs[path_idx] = oof
        accuracy = float((oof.argmax(axis=1) == g).mean())
        majority = float(np.bincount(g, minlength=3).max() / len(g))
        fitted_on = f"{len(path_idx)} calibration path samples ({variant.folds}-fold out-of-fold on them)"

    device_conf = data.forward["calib"][0][0].max(axis=1)
    no_early_right = (calib_preds[0] != calib.labels) & (calib_preds[1] != calib.labels)
    evidence = (calib_probs[path_idx, HARD], device_conf[path_idx], no_early_right[path_idx], accuracy, majority)
    verdict = judge_router(*evidence, keep_anyway=keep_anyway)
    return FittedRouter(
        variant=variant,
        router=router,
        report=report,
        group_shares=_shares(groups if variant.groups == "train" else groups[path_idx]),
        fitted_on=fitted_on,
        calib_probs=calib_probs,
        dev_probs=_probs(router, cfg, feats["dev"], toks["dev"]),
        verdict=verdict,
        predict=lambda features, tokens: _probs(router, cfg, features, tokens),
        evidence=evidence,
    )


__all__ = ["FittedRouter", "RouterVariant", "fit_variant"]
