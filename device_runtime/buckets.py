"""Sequence-length buckets and padding (numpy only): fixed-shape TFLite slices and Ray replicas share them.

A TFLite slice exists per bucket (litert-torch cannot lower a dynamic length); a Ray replica merges
micro-batches only when they share a length. Either way a sample is padded up to the smallest bucket that
holds it, and a zero attention mask keeps the padding out of the answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BUCKET_STEP = 16


def seq_buckets(max_length: int, buckets: Sequence[int] | None = None) -> list[int]:
    """Sorted sequence-length buckets ending at ``max_length`` (lengths above max_length never pass the front).

    Default: every BUCKET_STEP tokens. Padding costs compute (a 65-token input in a 128 bucket nearly doubles
    the model's work), so steps stay fine; fewer, coarser buckets only help replicas merge more micro-batches.
    """
    if buckets is None:
        chosen = list(range(BUCKET_STEP, max_length, BUCKET_STEP))
    else:
        chosen = [b for b in buckets if b < max_length]
    return [*sorted(set(chosen)), max_length]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens."""
    if not buckets:
        raise ValueError("no sequence-length buckets given")
    if length < 0:
        raise ValueError(f"sequence length must be >= 0, got {length}")
    for bucket in sorted(buckets):
        if bucket >= length:
            return int(bucket)
    raise ValueError(
        f"a sequence of {length} tokens does not fit the largest bucket ({max(buckets)}): "
        "truncate to it when tokenizing, or export a larger bucket"
    )


def pad_to(array: np.ndarray, length: int, axis: int = 1, value: float = 0) -> np.ndarray:
    """Pad ``array`` (e.g. [B, S] ids or mask, [B, S, H] hidden) with ``value`` up to ``length`` along ``axis``."""
    array = np.asarray(array)
    if array.ndim == 0:
        raise ValueError("cannot pad a scalar")
    size = array.shape[axis]
    if size > length:
        raise ValueError(f"cannot pad axis {axis} of size {size} down to {length}")
    if size == length:
        return array
    widths = [(0, 0)] * array.ndim
    widths[axis] = (0, length - size)
    return np.pad(array, widths, mode="constant", constant_values=value)
