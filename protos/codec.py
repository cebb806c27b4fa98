"""numpy <-> ``Tensor`` messages, and the checks every receiver applies before a model sees the data.

numpy only (no grpc import), so the device, both servers and tests share one implementation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cartosplit.protos import tiers_pb2 as pb

PROTOCOL_VERSION = 1

_NUMPY = {
    pb.FP32: np.dtype("<f4"),
    pb.FP16: np.dtype("<f2"),
    pb.INT8: np.dtype("i1"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
}
ENCODINGS = {"fp32": pb.FP32, "fp16": pb.FP16, "int8": pb.INT8}


class TensorError(ValueError):
    """A tensor that cannot be decoded or does not fit what the receiver expects."""


def encoding_name(value: int) -> str:
    """The enum's name, or the number for a value this version does not know (sent by a newer peer)."""
    try:
        return pb.Encoding.Name(value)
    except ValueError:
        return f"unknown encoding {value}"


def encode_tensor(array: np.ndarray, encoding: int = pb.FP32) -> pb.Tensor:
    """Raw bytes + encoding + shape. Floats may go as FP16 or INT8 (per-tensor affine) to save bytes."""
    array = np.asarray(array)
    if encoding == pb.INT8:
        values = array.astype(np.float32)
        low, high = float(values.min(initial=0.0)), float(values.max(initial=0.0))
        scale = (high - low) / 255.0 or 1.0
        zero_point = round(-128 - low / scale)
        q = np.clip(np.round(values / scale) + zero_point, -128, 127).astype(np.int8)
        return pb.Tensor(data=q.tobytes(), encoding=pb.INT8, shape=q.shape, scale=scale, zero_point=zero_point)
    if encoding not in _NUMPY:
        raise TensorError(f"unknown encoding {encoding}")
    data = np.ascontiguousarray(array, dtype=_NUMPY[encoding])
    return pb.Tensor(data=data.tobytes(), encoding=encoding, shape=data.shape)


def decode_tensor(
    tensor: pb.Tensor,
    name: str,
    rank: int,
    allowed: Sequence[int],
    max_elements: int,
) -> np.ndarray:
    """Checked decoding: encoding allowed, rank, no negative or huge shape, byte count, finite values.

    Floats come back as float32 and integers as int64, whatever travelled.
    """
    if tensor.encoding not in allowed:
        names = [encoding_name(e) for e in allowed]
        raise TensorError(f"{name}: encoding {encoding_name(tensor.encoding)} not accepted here (use {names})")
    shape = tuple(int(s) for s in tensor.shape)
    if len(shape) != rank:
        # a hostile shape can hold millions of dims: never echo it whole into status details and logs
        shown = list(shape) if len(shape) <= 8 else f"of rank {len(shape)}"
        raise TensorError(f"{name}: expected rank {rank}, got shape {shown}")
    if any(s < 1 for s in shape):
        raise TensorError(f"{name}: every dimension must be >= 1, got shape {list(shape)}")
    count = math.prod(shape)  # Python ints: a crafted shape cannot wrap around as int64 would
    if count > max_elements:
        raise TensorError(f"{name}: {count} elements is over this server's limit of {max_elements}")
    dtype = _NUMPY[tensor.encoding]
    if len(tensor.data) != count * dtype.itemsize:
        raise TensorError(
            f"{name}: {len(tensor.data)} bytes do not fit shape {list(shape)} as {encoding_name(tensor.encoding)} "
            f"({count * dtype.itemsize} expected)"
        )
    values = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    if tensor.encoding == pb.INT8:
        if not np.isfinite(tensor.scale) or tensor.scale <= 0:
            raise TensorError(f"{name}: INT8 needs a positive finite scale, got {tensor.scale}")
        with np.errstate(over="ignore"):  # a huge scale overflows to inf, refused just below
            values = ((values.astype(np.float32) - tensor.zero_point) * np.float32(tensor.scale)).astype(np.float32)
        if not np.isfinite(values).all():
            raise TensorError(f"{name}: INT8 scale {tensor.scale} takes values past the float32 range")
        return values
    if dtype.kind == "f":
        values = values.astype(np.float32)
        if not np.isfinite(values).all():
            raise TensorError(f"{name}: contains NaN or infinity")
        return values
    return values.astype(np.int64)
