"""Which graphs each tier opens and what their samples are: the tier servicers and the Ray replicas agree on it.

A graph's kind is ``"tokens"`` (ids and type ids in) or ``"hidden"`` (an [S, H] hidden state in).
"""

from __future__ import annotations

from cartosplit.device_runtime.bundle import Bundle, BundleError
from cartosplit.device_runtime.manifest import cloud_graph

EDGE_GRAPHS = {"edge": "hidden"}


def cloud_graphs(bundle: Bundle) -> dict[int, str]:
    """Depth -> graph: {e, r if r > 0} take hidden states, 0 takes tokens."""
    split = bundle.split_points
    graphs = {0: "full"}
    for depth in (split.edge, split.router_depth):
        if depth > 0:
            graphs[depth] = cloud_graph(depth)
    missing = [g for g in graphs.values() if g not in bundle.manifest.graphs]
    if missing:
        raise BundleError(f"{bundle.folder}: the cloud needs graphs {missing}, which the bundle lacks")
    return graphs


def tier_graphs(bundle: Bundle, tier: str) -> dict[str, str]:
    """``{graph: kind}`` of a tier, as its servicer opens them."""
    if tier == "cloud":
        return {g: "tokens" if depth == 0 else "hidden" for depth, g in cloud_graphs(bundle).items()}
    if tier == "edge":
        return dict(EDGE_GRAPHS)
    raise ValueError(f"tier must be 'cloud' or 'edge', got {tier!r}")
