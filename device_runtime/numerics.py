"""Small numeric helpers every tier shares (numpy only)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax over ``axis`` (the class axis), shifted by the max for stability; float32 out.

    Computed in float64 so that int8 graphs' large logits and fp16 inputs lose nothing before the
    thresholds compare probabilities.
    """
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=axis, keepdims=True))
    return (z / z.sum(axis=axis, keepdims=True)).astype(np.float32)
