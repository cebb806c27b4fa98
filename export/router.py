"""The router: predicts a sample's group (easy / medium / hard) from an early pooled representation.

Three kinds, all a few matrix products so they cost next to nothing on the device and export as a
tiny graph: ``logreg`` (softmax regression), ``mlp`` (one hidden layer) and ``centroid`` (nearest group
centroid in standardised feature space, softmax over negative squared distances with a fitted
temperature — the "clustering" reading of DIMEC-DC).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from device_runtime.policy import GROUP_NAMES

ROUTER_KINDS = ("logreg", "mlp", "centroid")


@dataclass(frozen=True)
class RouterConfig:
    kind: str = "logreg"
    depth: int = 1  # pooled representation after this many layers (0 = embedding output)
    hidden_units: int = 64
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    holdout: float = 0.2  # share of the training subset kept out of router fitting, for its report
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {self.kind!r}")
        if self.depth < 0:
            raise ValueError(f"router depth must be >= 0, got {self.depth}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"router holdout must lie in (0, 1), got {self.holdout}")


class Router(nn.Module):
    def __init__(self, in_dim: int, kind: str, hidden_units: int = 64) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        if kind == "logreg":
            self.net = nn.Linear(in_dim, 3)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 3))
        elif kind == "centroid":
            self.register_buffer("centroids", torch.zeros(3, in_dim))
            self.register_buffer("absent", torch.zeros(3))  # -1e4 for a group with no training sample
            self.log_temperature = nn.Parameter(torch.zeros(()))
        else:
            raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """Group logits [B, 3] from pooled features [B, H]."""
        z = (pooled - self.mean) / self.scale
        if self.kind != "centroid":
            return self.net(z)
        dist = torch.cdist(z, self.centroids).pow(2) / z.shape[-1]
        return -dist * self.log_temperature.exp() + self.absent


@dataclass
class RouterReport:
    kind: str
    depth: int
    fit_samples: int
    holdout_samples: int
    holdout_accuracy: float
    majority_accuracy: float  # always predicting the most frequent group: the bar to clear
    confusion: list[list[int]]  # rows: true group, columns: predicted, in GROUP_NAMES order
    groups: tuple[str, ...] = GROUP_NAMES

    def to_dict(self) -> dict:
        return asdict(self)


def confusion_matrix(true: np.ndarray, pred: np.ndarray, k: int = 3) -> np.ndarray:
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def fit_router(features: np.ndarray, groups: np.ndarray, cfg: RouterConfig) -> tuple[Router, RouterReport]:
    """Fit on a random (1 - holdout) part of the samples; report accuracy on the rest."""
    features = np.asarray(features, dtype=np.float32)
    groups = np.asarray(groups, dtype=np.int64)
    if len(features) != len(groups) or len(features) < 2:
        raise ValueError(f"router needs matching features and groups, got {len(features)} and {len(groups)}")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(groups))
    n_hold = max(1, round(cfg.holdout * len(groups)))
    hold, fit = order[:n_hold], order[n_hold:]
    x, y = torch.from_numpy(features[fit]), torch.from_numpy(groups[fit])

    torch.manual_seed(cfg.seed)
    router = Router(features.shape[1], cfg.kind, cfg.hidden_units)
    router.mean.copy_(x.mean(0))
    router.scale.copy_(x.std(0).clamp(min=1e-6))
    if cfg.kind == "centroid":
        z = (x - router.mean) / router.scale
        for g in range(3):
            members = z[y == g]
            if len(members):
                router.centroids[g] = members.mean(0)
            else:
                router.absent[g] = -1e4
    optimizer = torch.optim.AdamW(router.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    router.train()
    for _ in range(cfg.steps):  # full batch: a few thousand samples of a few hundred features
        loss = nn.functional.cross_entropy(router(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    router.eval()

    with torch.no_grad():
        pred = router(torch.from_numpy(features[hold])).argmax(-1).numpy()
    truth = groups[hold]
    majority = np.bincount(groups[fit], minlength=3).argmax()
    report = RouterReport(
        kind=cfg.kind,
        depth=cfg.depth,
        fit_samples=len(fit),
        holdout_samples=len(hold),
        holdout_accuracy=float((pred == truth).mean()),
        majority_accuracy=float((truth == majority).mean()),
        confusion=confusion_matrix(truth, pred).tolist(),
    )
    return router, report


def router_probs(router: Router, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(router(torch.from_numpy(np.asarray(features, dtype=np.float32))), -1).numpy()


def save_router(router: Router, cfg: RouterConfig, folder: str | Path) -> None:
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(router, str(folder / "router.safetensors"))
    (folder / "router.json").write_text(
        json.dumps({"config": asdict(cfg), "in_dim": int(router.mean.shape[0])}, indent=2) + "\n"
    )


def load_router(folder: str | Path) -> tuple[Router, RouterConfig]:
    from safetensors.torch import load_model

    folder = Path(folder)
    meta = json.loads((folder / "router.json").read_text())
    cfg = RouterConfig(**meta["config"])
    router = Router(meta["in_dim"], cfg.kind, cfg.hidden_units)
    load_model(router, str(folder / "router.safetensors"))
    return router.eval(), cfg
