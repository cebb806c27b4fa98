"""The audit monitor's live bound in the Prometheus text format, for ``serve-device``'s ``GET /metrics``.

The bound is computed where early answers meet the cloud's (the device), so it is exported there; the
edge and the cloud export how many audits they served, apart from user traffic (``serving.metrics``).
Written by hand (text exposition format 0.0.4, a handful of gauges) because serve-device is standard-library
only and a device install carries no prometheus-client.
"""

from __future__ import annotations

import math

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _number(value: float | int | bool | None) -> str:
    if value is None:
        return "NaN"
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], object]]) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{label_text}}} {_number(value)}" if label_text else f"{name} {_number(value)}")
    return lines


def prometheus_text(summary: dict | None) -> str:
    """The exposition of ``DeviceRuntime.audit_summary()``; with audits off, one gauge saying so."""
    lines = _family("cartosplit_audit_enabled", "gauge", "1 when audits run", [({}, summary is not None)])
    if summary is None:
        return "\n".join(lines) + "\n"
    sequences = summary["sequences"]
    counters = summary["counters"]
    per_sequence = [
        (
            "cartosplit_audit_upper_bound",
            "upper_bound",
            "Anytime-valid upper bound on the disagreement rate with the full model",
        ),
        ("cartosplit_audit_audits", "audits", "Audits counted in the sequence (under the policy in force)"),
        ("cartosplit_audit_disagreements", "disagreements", "Audited answers that differed from the full model's"),
        ("cartosplit_audit_holds", "holds", "1 when the upper bound is at or below epsilon"),
    ]
    for name, key, help_text in per_sequence:
        lines += _family(name, "gauge", help_text, [({"sequence": s}, v[key]) for s, v in sequences.items()])
    detector = summary["detector"]
    lines += _family(
        "cartosplit_audit_alarm",
        "gauge",
        "1 when the detector rejected disagreement <= epsilon",
        [({}, detector["alarm"])],
    )
    lines += _family(
        "cartosplit_audit_epsilon",
        "gauge",
        "The promise: disagreement <= epsilon (a fraction)",
        [({}, summary["epsilon"])],
    )
    lines += _family(
        "cartosplit_audit_rate", "gauge", "Probability of auditing the next answer", [({}, summary["audit_rate"])]
    )
    lines += _family(
        "cartosplit_audit_path_index",
        "gauge",
        "Where the thresholds are on the tightening path (0: no early exit; path_length - 1: the shipped policy)",
        [({}, summary["path_index"])],
    )
    lines += _family(
        "cartosplit_audit_path_length", "gauge", "Policies on the tightening path", [({}, summary["path_length"])]
    )
    kinds = [({"kind": k}, counters[k]) for k in ("sampled", "recorded", "sent", "free")]
    kinds += [({"kind": f"dropped_{reason}"}, n) for reason, n in sorted(counters["dropped"].items())]
    lines += _family(
        "cartosplit_audit_answers_total", "counter", "Answers seen by the monitor", [({}, counters["answers"])]
    )
    lines += _family("cartosplit_audit_events_total", "counter", "Audits by outcome", kinds)
    lines += _family(
        "cartosplit_audit_cost_total", "counter", "Audits' cost in the bundle's cost units", [({}, counters["cost"])]
    )
    lines += _family(
        "cartosplit_audit_sent_bytes_total", "counter", "Bytes the device sent for audits", [({}, counters["bytes"])]
    )
    return "\n".join(lines) + "\n"
