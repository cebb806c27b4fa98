"""How an exported graph is judged: the tier chain on held-out samples, its outputs against the torch model's.

The samples are the run's calibration split (never trained on), sorted by length in batches of 32; the torch
reference is computed once and every format is compared to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cartosplit.device_runtime.manifest import DEVICE_HEAD, DEVICE_TAIL, EDGE, FULL, FormatVerdict, cloud_graph
from cartosplit.device_runtime.numerics import softmax
from cartosplit.device_runtime.policy import HARD, MEDIUM, Policy
from cartosplit.device_runtime.text import pad_batch

SOURCE = "calibration split (held out from training)"
BATCH = 32

RunGraph = Callable[[str, list[np.ndarray]], list[np.ndarray]]  # (graph name, inputs) -> outputs
Slices = dict  # graph name -> (torch module, input names, output names), as from export.slices.build_slices


def chain(run_graph: RunGraph, batch: dict[str, np.ndarray], graphs, r: int, e: int) -> dict[str, np.ndarray]:
    """Run the tier chain with ``run_graph``: what the tiers compute in order (only the device's without ``edge``)."""
    tokens = [batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]]
    mask = batch["attention_mask"]
    out: dict[str, np.ndarray] = {}
    out["router_logits"], hidden_r = run_graph(DEVICE_HEAD, tokens)
    hidden_d, out["device_logits"] = run_graph(DEVICE_TAIL, [hidden_r, mask])
    if EDGE in graphs:
        hidden_e, out["edge_logits"] = run_graph(EDGE, [hidden_d, mask])
        (out["final_logits"],) = run_graph(cloud_graph(e), [hidden_e, mask])
        if r > 0:
            (out["final_from_router_logits"],) = run_graph(cloud_graph(r), [hidden_r, mask])
        (out["full_logits"],) = run_graph(FULL, tokens)
    return out


def torch_runner(slices: Slices) -> RunGraph:
    def run(name, inputs):
        module = slices[name][0]
        with torch.no_grad():
            result = module(*[torch.from_numpy(np.asarray(x)) for x in inputs])
        result = result if isinstance(result, tuple) else (result,)
        return [t.numpy() for t in result]

    return run


def _router_decisions(router_logits: np.ndarray, policy: Policy) -> np.ndarray:
    p = softmax(router_logits)  # as the device runtime computes it before the same comparisons
    direct = p[:, HARD] >= policy.hard_margin
    skip = ~direct & (p[:, MEDIUM] >= policy.medium_margin)
    return direct * 2 + skip


def compare(reference: list[dict], produced: list[dict], policy: Policy) -> dict:
    """Max abs diff of every logits output; agreement of labels at each exit and of router decisions."""
    diffs, agree = {}, {}
    for key in produced[0]:
        ref = np.concatenate([r[key] for r in reference])
        got = np.concatenate([p[key] for p in produced])
        diffs[key] = float(np.abs(ref - got).max())
        if key == "router_logits":
            agree["router_argmax"] = float((ref.argmax(1) == got.argmax(1)).mean())
            agree["router_decisions"] = float((_router_decisions(ref, policy) == _router_decisions(got, policy)).mean())
        else:
            agree[key.replace("_logits", "")] = float((ref.argmax(1) == got.argmax(1)).mean())
    samples = sum(len(p[next(iter(p))]) for p in produced)
    return {"max_abs_diff": diffs, "agreement": agree, "samples": samples}


def mean_label_agreement(report: dict) -> float:
    """The labels' agreement over every exit (router agreement aside): what ranks int8 candidates."""
    return float(np.mean([v for k, v in report["agreement"].items() if not k.startswith("router")]))


def judge(report: dict, atol: float | None, min_agreement: float) -> FormatVerdict:
    """Every output within ``atol`` (None: not checked, for quantized formats) and every agreement but the
    router's argmax at least ``min_agreement`` (the router's decisions under the policy are what matter)."""
    failures = []
    if atol is not None:
        failures += [f"{k} max abs diff {v:.2e} > {atol:.0e}" for k, v in report["max_abs_diff"].items() if v > atol]
    failures += [
        f"{k} agreement {v:.4f} < {min_agreement}"
        for k, v in report["agreement"].items()
        if k != "router_argmax" and v < min_agreement
    ]
    return FormatVerdict(
        max_abs_diff=report["max_abs_diff"],
        agreement=report["agreement"],
        passed=not failures,
        failures=failures,
        samples=report.get("samples"),
    )


TOLERANCE, AGREEMENT = "tolerance", "agreement"  # the two bars judge() holds a format to


def failed_bar(failure: str) -> str | None:
    """Which bar a failure line of ``judge`` missed: TOLERANCE (a max abs diff) or AGREEMENT; None for any other
    line (an export that raised), which no threshold decides."""
    if " max abs diff " in failure:
        return TOLERANCE
    if " agreement " in failure:
        return AGREEMENT
    return None


@dataclass
class HeldOut:
    """The validation samples and the torch reference on them."""

    slices: Slices
    encoded: list[tuple[list[int], list[int]]]  # (ids, type ids) per sample, shortest first
    policy: Policy
    r: int  # router depth
    e: int  # edge split
    batches: list[dict[str, np.ndarray]]
    reference: list[dict[str, np.ndarray]]  # chain outputs of the torch slices, per batch

    @classmethod
    def build(cls, slices: Slices, encoded: list, policy: Policy, r: int, e: int) -> HeldOut:
        encoded = sorted(encoded, key=lambda x: len(x[0]))
        batches = [pad_batch(encoded[i : i + BATCH]) for i in range(0, len(encoded), BATCH)]
        reference = [chain(torch_runner(slices), b, set(slices), r, e) for b in batches]
        return cls(slices, encoded, policy, r, e, batches, reference)

    def measure(self, run_graph: RunGraph) -> dict:
        """Max abs diff and agreement of the whole chain run with ``run_graph`` against torch."""
        produced = [chain(run_graph, b, set(self.slices), self.r, self.e) for b in self.batches]
        return compare(self.reference, produced, self.policy)
