"""Which graphs each tier opens and what their samples are: the tier servicers and the Ray replicas agree on it.

A graph's kind is ``"tokens"`` (ids and type ids in) or ``"hidden"`` (an [S, H] hidden state in). Which graphs
a tier has is the bundle contract's (``manifest.graphs_of_tier``: also what a tier bundle holds).
"""

from __future__ import annotations

from cartosplit.device_runtime import manifest
from cartosplit.device_runtime.bundle import Bundle, BundleError

EDGE_GRAPHS = {graph: "hidden" for graph in manifest.EDGE_GRAPHS}


def cloud_graphs(bundle: Bundle) -> dict[int, str]:
    """Depth -> graph: {e, r if r > 0} take hidden states, 0 takes tokens."""
    graphs = manifest.cloud_graphs_by_depth(bundle.split_points)
    missing = [g for g in graphs.values() if g not in bundle.manifest.graphs]
    if missing:
        raise BundleError(f"{bundle.folder}: the cloud needs graphs {missing}, which the bundle lacks")
    return graphs


def tier_graphs(bundle: Bundle, tier: str) -> dict[str, str]:
    """``{graph: kind}`` of a tier, as its servicer opens them."""
    if tier == manifest.CLOUD_TIER:
        return {g: "tokens" if depth == 0 else "hidden" for depth, g in cloud_graphs(bundle).items()}
    if tier == manifest.EDGE_TIER:
        return dict(EDGE_GRAPHS)
    raise ValueError(f"tier must be 'cloud' or 'edge', got {tier!r}")
