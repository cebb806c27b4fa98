"""The router: predicts a sample's group (easy / medium / hard) from an early pooled representation.

Four kinds, all a few matrix products so they cost next to nothing on the device and export as a
tiny graph:

- ``logreg`` (softmax regression) and ``mlp`` (one hidden layer);
- ``centroid``: nearest group centroid in standardised feature space, softmax over negative squared
  distances with a fitted temperature (one prototype per group);
- ``knn``: the "clustering" reading of DIMEC-DC done properly. It keeps up to ``max_references`` fit
  samples' standardised features (optionally PCA-reduced, unit length) with their groups; a query's
  group probabilities are the (Laplace-smoothed) shares of the groups among its ``k`` nearest
  references by cosine similarity. No gradient step: fitting is storing. In the graph it is a MatMul,
  a TopK, a Gather and a sum.

``free_features`` (logreg / mlp) appends what costs nothing more at depth r to the standardised pooled
features: the max probability and the entropy of a tiny linear label head at depth r (fitted to the
task labels on the fit samples), and log(1 + token count). The token count reaches the router in the
exported graph as the attention mask's sum (``cartosplit.export.slices.DeviceHead``); offline callers pass
``n_tokens`` (the number of ids of each encoded sample, special tokens included).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cartosplit.device_runtime.policy import GROUP_NAMES

ROUTER_KINDS = ("logreg", "mlp", "centroid", "knn")
FREE_FEATURE_KINDS = ("logreg", "mlp")
REF_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FREE_FEATURE_NAMES = ("label_head_max_prob", "label_head_entropy", "log1p_tokens")
_ZERO_SHARE = 1e-6  # knn with smoothing 0: log(count + this), so an absent group gets a finite logit
_PROBS_CHUNK = 2048  # router_probs rows per forward: knn similarities are [rows, references]


@dataclass(frozen=True)
class RouterConfig:
    kind: str = "logreg"
    depth: int = 0  # pooled representation after this many layers (0 = embedding output: router.md)
    hidden_units: int = 64
    steps: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-3
    holdout: float = 0.2  # share of the training subset kept out of router fitting, for its report
    seed: int = 0
    # knn
    k: int = 25  # neighbours voting (at most the number of references)
    pca_dims: int | None = 64  # None, or >= the feature size: no projection
    max_references: int = 4096  # more fit samples: a seeded subset, stratified by group (shares kept)
    ref_dtype: str = "float32"  # float16 halves the stored references (cast back to float32 in forward)
    smoothing: float = 1.0  # Laplace: probabilities (count + smoothing) / (k + 3 smoothing); 0 = raw shares
    # logreg / mlp
    free_features: bool = False  # + label-head max prob and entropy at depth r, + log(1 + tokens)

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {self.kind!r}")
        if self.depth < 0:
            raise ValueError(f"router depth must be >= 0, got {self.depth}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"router holdout must lie in (0, 1), got {self.holdout}")
        if self.k < 1:
            raise ValueError(f"router k must be >= 1, got {self.k}")
        if self.pca_dims is not None and self.pca_dims < 1:
            raise ValueError(f"router pca_dims must be >= 1 or None, got {self.pca_dims}")
        if self.max_references < 1:
            raise ValueError(f"router max_references must be >= 1, got {self.max_references}")
        if self.ref_dtype not in REF_DTYPES:
            raise ValueError(f"router ref_dtype must be one of {tuple(REF_DTYPES)}, got {self.ref_dtype!r}")
        if self.smoothing < 0:
            raise ValueError(f"router smoothing must be >= 0, got {self.smoothing}")
        if self.free_features and self.kind not in FREE_FEATURE_KINDS:
            raise ValueError(f"router free_features applies to {FREE_FEATURE_KINDS}, not {self.kind!r}")


class _CastLike(torch.autograd.Function):
    """``x.to(like.dtype)``, exported to ONNX as ``CastLike(x, like)`` (opset >= 15).

    A plain Cast of a buffer is folded by the exporter, which would store float16 references back as
    float32 and undo the halving; CastLike's second input is not a constant, so the file keeps float16
    and onnxruntime folds the cast once when it loads the graph (no per-call cost)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return x.to(like.dtype)

    @staticmethod
    def symbolic(g, x, like):
        return g.op("CastLike", x, like)


class Router(nn.Module):
    """Group logits from pooled features; ``softmax`` of them are the group probabilities.

    The keyword arguments fix the shapes that fitting decides: ``label_classes`` (free features),
    ``references`` / ``projected_dims`` / ``k`` (knn; ``projected_dims`` None = no PCA)."""

    def __init__(
        self,
        in_dim: int,
        kind: str,
        hidden_units: int = 64,
        *,
        free_features: bool = False,
        label_classes: int = 2,
        references: int = 1,
        projected_dims: int | None = None,
        k: int = 25,
        smoothing: float = 1.0,
        ref_dtype: str = "float32",
    ) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"router kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if free_features and kind not in FREE_FEATURE_KINDS:
            raise ValueError(f"router free_features applies to {FREE_FEATURE_KINDS}, not {kind!r}")
        self.kind = kind
        self.free_features = free_features
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        net_in = in_dim
        if free_features:
            self.label_head = nn.Linear(in_dim, label_classes)
            self.register_buffer("extra_mean", torch.zeros(len(FREE_FEATURE_NAMES)))
            self.register_buffer("extra_scale", torch.ones(len(FREE_FEATURE_NAMES)))
            net_in += len(FREE_FEATURE_NAMES)
        if kind == "logreg":
            self.net = nn.Linear(net_in, 3)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(net_in, hidden_units), nn.ReLU(), nn.Linear(hidden_units, 3))
        elif kind == "centroid":
            self.register_buffer("centroids", torch.zeros(3, in_dim))
            self.register_buffer("absent", torch.zeros(3))  # -1e4 for a group with no training sample
            self.log_temperature = nn.Parameter(torch.zeros(()))
        else:  # knn
            if not 1 <= k <= references:
                raise ValueError(f"knn router needs 1 <= k <= references, got k={k} with {references} references")
            dims = in_dim
            if projected_dims is not None:
                self.register_buffer("projection", torch.zeros(in_dim, projected_dims))
                dims = projected_dims
            # stored transposed ([dims, references], unit columns): the graph's MatMul takes it as it is
            self.register_buffer("references", torch.zeros(dims, references, dtype=REF_DTYPES[ref_dtype]))
            self.register_buffer("votes", torch.zeros(references, 3))  # one-hot group of each reference
            self.k = k
            self.offset = smoothing if smoothing > 0 else _ZERO_SHARE

    def forward(self, pooled: torch.Tensor, n_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Group logits [B, 3] from pooled features [B, H] (and token counts [B] for free features)."""
        z = (pooled - self.mean) / self.scale
        if self.free_features:
            if n_tokens is None:
                raise ValueError(
                    "this router uses free features: pass n_tokens, each sample's token count "
                    "(the attention mask's sum, special tokens included)"
                )
            z = torch.cat([z, self._free_features(z, n_tokens)], dim=-1)
        if self.kind in FREE_FEATURE_KINDS:
            return self.net(z)
        if self.kind == "centroid":
            dist = torch.cdist(z, self.centroids).pow(2) / z.shape[-1]
            return -dist * self.log_temperature.exp() + self.absent
        return self._knn(z)

    def _free_features(self, z: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(self.label_head(z), dim=-1)
        p = logp.exp()
        tokens = n_tokens.reshape(-1).to(z.dtype)
        extra = torch.stack([p.max(dim=-1).values, -(p * logp).sum(dim=-1), torch.log1p(tokens)], dim=-1)
        return (extra - self.extra_mean) / self.extra_scale

    def _knn(self, z: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "projection"):
            z = z @ self.projection
        refs = self.references
        if refs.dtype != z.dtype:
            refs = _CastLike.apply(refs, z)
        # the query's own norm changes no ranking: cosine order = order of z . unit reference
        _, nearest = (z @ refs).topk(self.k, dim=-1)  # [B, k]
        counts = self.votes[nearest].sum(dim=1)  # [B, 3]
        return torch.log(counts + self.offset)  # softmax: (count + s) / (k + 3 s)

    def trainable(self) -> list[nn.Parameter]:
        """Parameters fitted by the router's gradient steps (none for knn; the label head is fitted apart)."""
        frozen = {id(p) for p in self.label_head.parameters()} if self.free_features else set()
        return [p for p in self.parameters() if id(p) not in frozen]

    def shape_meta(self) -> dict:
        """What ``load_router`` needs beyond the config to build buffers of the saved shapes."""
        meta = {}
        if self.free_features:
            meta["label_classes"] = int(self.label_head.out_features)
        if self.kind == "knn":
            meta["knn"] = {
                "references": int(self.references.shape[1]),
                "projected_dims": int(self.projection.shape[1]) if hasattr(self, "projection") else None,
                "k": int(self.k),
            }
        return meta


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


def reference_subset(groups: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` samples, each group keeping its share (largest remainder).

    Stratified, not balanced: the neighbour shares then estimate P(group | features) under the fit
    samples' group frequencies, which is what the other kinds' probabilities (plain cross-entropy)
    estimate too; balancing would inflate the rare groups' probabilities for every query."""
    if len(groups) <= limit:
        return np.arange(len(groups))
    counts = np.bincount(groups, minlength=3)
    exact = counts * limit / len(groups)
    quota = np.floor(exact).astype(int)
    for g in np.argsort(-(exact - quota), kind="stable")[: limit - quota.sum()]:
        quota[g] += 1
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(groups == g))[: quota[g]] for g in range(len(counts))]
    return np.sort(np.concatenate(picks))


def _fit_label_head(router: Router, z: torch.Tensor, labels: torch.Tensor, cfg: RouterConfig) -> None:
    head = router.label_head
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(cfg.steps):
        loss = nn.functional.cross_entropy(head(z), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.requires_grad_(False)


def _build_knn(features: np.ndarray, groups: np.ndarray, cfg: RouterConfig) -> Router:
    mean = features.mean(0)
    scale = np.maximum(features.std(0, ddof=1), 1e-6)  # as torch's std (unbiased), like the other kinds
    z = (features - mean) / scale
    projection = None
    if cfg.pca_dims is not None and cfg.pca_dims < min(z.shape):
        # principal axes of the standardised fit samples (already centred by their own mean)
        _, _, vt = np.linalg.svd(z.astype(np.float64), full_matrices=False)
        projection = vt[: cfg.pca_dims].T.astype(np.float32)
        z = z @ projection
    pick = reference_subset(groups, cfg.max_references, cfg.seed)
    refs = z[pick] / np.maximum(np.linalg.norm(z[pick], axis=1, keepdims=True), 1e-12)
    router = Router(
        features.shape[1],
        "knn",
        references=len(pick),
        projected_dims=None if projection is None else projection.shape[1],
        k=min(cfg.k, len(pick)),
        smoothing=cfg.smoothing,
        ref_dtype=cfg.ref_dtype,
    )
    router.mean.copy_(torch.from_numpy(mean))
    router.scale.copy_(torch.from_numpy(scale))
    if projection is not None:
        router.projection.copy_(torch.from_numpy(projection))
    router.references.copy_(torch.from_numpy(np.ascontiguousarray(refs.T)))  # rounded here for float16
    router.votes.copy_(torch.from_numpy(np.eye(3, dtype=np.float32)[groups[pick]]))
    return router


def fit_router(
    features: np.ndarray,
    groups: np.ndarray,
    cfg: RouterConfig,
    labels: np.ndarray | None = None,
    n_tokens: np.ndarray | None = None,
) -> tuple[Router, RouterReport]:
    """Fit on a random (1 - holdout) part of the samples; report accuracy on the rest.

    ``labels`` (the task labels) and ``n_tokens`` (token count per sample, special tokens included) are
    needed with ``cfg.free_features`` only."""
    features = np.asarray(features, dtype=np.float32)
    groups = np.asarray(groups, dtype=np.int64)
    if len(features) != len(groups) or len(features) < 2:
        raise ValueError(f"router needs matching features and groups, got {len(features)} and {len(groups)}")
    if cfg.free_features:
        if labels is None:
            raise ValueError("router free_features needs the task labels of the fit samples: pass labels=")
        if n_tokens is None:
            raise ValueError("router free_features needs each sample's token count: pass n_tokens=")
        labels = np.asarray(labels, dtype=np.int64)
        n_tokens = np.asarray(n_tokens, dtype=np.float32)
        if len(labels) != len(features) or len(n_tokens) != len(features):
            raise ValueError(
                f"router free_features needs one label and one token count per sample: got {len(labels)} "
                f"labels and {len(n_tokens)} token counts for {len(features)} samples"
            )
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(groups))
    n_hold = max(1, round(cfg.holdout * len(groups)))
    hold, fit = order[:n_hold], order[n_hold:]
    x, y = torch.from_numpy(features[fit]), torch.from_numpy(groups[fit])

    torch.manual_seed(cfg.seed)
    if cfg.kind == "knn":
        router = _build_knn(features[fit], groups[fit], cfg)
    else:
        shape = {"free_features": True, "label_classes": max(2, int(labels.max()) + 1)} if cfg.free_features else {}
        router = Router(features.shape[1], cfg.kind, cfg.hidden_units, **shape)
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
    if cfg.free_features:
        z = (x - router.mean) / router.scale
        _fit_label_head(router, z, torch.from_numpy(labels[fit]), cfg)
        with torch.no_grad():  # the extras' raw values: extra_mean / extra_scale are still 0 / 1 here
            extra = router._free_features(z, torch.from_numpy(n_tokens[fit]))
            router.extra_mean.copy_(extra.mean(0))
            router.extra_scale.copy_(extra.std(0).clamp(min=1e-6))
    tokens_fit = None if n_tokens is None else torch.from_numpy(n_tokens[fit])
    params = router.trainable()
    if params:  # knn has nothing to train: fitting it was storing the references
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        router.train()
        for _ in range(cfg.steps):  # full batch: a few thousand samples of a few hundred features
            loss = nn.functional.cross_entropy(router(x, tokens_fit), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    router.eval()

    pred = router_probs(router, features[hold], None if n_tokens is None else n_tokens[hold]).argmax(-1)
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


def router_probs(router: Router, features: np.ndarray, n_tokens: np.ndarray | None = None) -> np.ndarray:
    """Group probabilities [N, 3]; ``n_tokens`` [N] (token counts) is required by free-feature routers."""
    features = np.asarray(features, dtype=np.float32)
    if router.free_features and n_tokens is None:
        raise ValueError(
            "this router uses free features: pass n_tokens, each sample's token count "
            "(the attention mask's sum, special tokens included)"
        )
    tokens = None if n_tokens is None else np.asarray(n_tokens, dtype=np.float32)
    if tokens is not None and len(tokens) != len(features):
        raise ValueError(f"n_tokens has {len(tokens)} entries for {len(features)} samples")
    out = []
    with torch.no_grad():
        for i in range(0, max(len(features), 1), _PROBS_CHUNK):
            part = None if tokens is None else torch.from_numpy(tokens[i : i + _PROBS_CHUNK])
            logits = router(torch.from_numpy(features[i : i + _PROBS_CHUNK]), part)
            out.append(torch.softmax(logits, -1).numpy())
    return np.concatenate(out)


def save_router(router: Router, cfg: RouterConfig, folder: str | Path) -> None:
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(router, str(folder / "router.safetensors"))
    meta = {"config": asdict(cfg), "in_dim": int(router.mean.shape[0]), **router.shape_meta()}
    (folder / "router.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_router(folder: str | Path) -> tuple[Router, RouterConfig]:
    from safetensors.torch import load_model

    folder = Path(folder)
    meta = json.loads((folder / "router.json").read_text())
    cfg = RouterConfig(**meta["config"])
    shape: dict = {}
    if cfg.free_features:
        shape.update(free_features=True, label_classes=meta["label_classes"])
    if cfg.kind == "knn":
        knn = meta["knn"]
        shape.update(
            references=knn["references"],
            projected_dims=knn["projected_dims"],
            k=knn["k"],
            smoothing=cfg.smoothing,
            ref_dtype=cfg.ref_dtype,
        )
    router = Router(meta["in_dim"], cfg.kind, cfg.hidden_units, **shape)
    load_model(router, str(folder / "router.safetensors"))
    return router.eval(), cfg
