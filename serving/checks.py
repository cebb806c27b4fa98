"""What a request must satisfy before a model sees it, and the grpc status code it gets when it does not.

The codec (``cartosplit.protos.codec``) checks rank, encoding, byte counts and finiteness; these checks add
what only the bundle knows: its id, the depths this tier serves, the sizes of its model.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import grpc
import numpy as np

from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos.codec import PROTOCOL_VERSION, TensorError, decode_tensor

# replies echo the id and the timings, and recent replies are cached: bound what a client can make us keep
MAX_REQUEST_ID = 128
MAX_TIMINGS = 8
# a layer's output is LayerNorm-scaled (|x| in the tens at most); far larger values only overflow later
MAX_ACTIVATION = 1e4
# Below this much time left there is no point starting work: the reply could not arrive in time.
MIN_TIME_LEFT_S = 0.001
# grpc reports "no deadline" as a huge number of seconds rather than None.
_NO_DEADLINE_S = 1e9
_FLOAT_ENCODINGS = (pb.FP32, pb.FP16, pb.INT8)
_INT_ENCODINGS = (pb.INT64, pb.INT32)


class RequestError(Exception):
    """A request this tier refuses (or could not serve), with the grpc status code the client gets."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def check_envelope(request: pb.InferRequest, bundle_id: str, depths: Collection[int], tier: str) -> None:
    """Protocol version, bundle and depth: cheap checks before any tensor is decoded."""
    if request.protocol_version != PROTOCOL_VERSION:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"protocol version {request.protocol_version} is not spoken here (this server speaks {PROTOCOL_VERSION})",
        )
    if request.bundle_id != bundle_id:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"bundle mismatch: the request was made for bundle {request.bundle_id[:12]!r}, "
            f"this server serves {bundle_id[:12]!r}: the two bundles come from different exports (a tier "
            "bundle carries the id of the full bundle it was cut from; give every tier that bundle or one cut from it)",
        )
    if request.depth not in depths:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"depth {request.depth} is not served by the {tier} tier; it serves depths {sorted(depths)}",
        )
    if len(request.request_id) > MAX_REQUEST_ID:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request_id is over {MAX_REQUEST_ID} characters")
    if len(request.timings) > MAX_TIMINGS:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{len(request.timings)} timings: at most {MAX_TIMINGS} tiers"
        )


def _check_dims(values: np.ndarray, name: str, limits: Sequence[tuple[int, int]]) -> None:
    """Each dimension within its bounds (the codec has checked rank, encoding, bytes and finiteness)."""
    for axis, (size, (low, high)) in enumerate(zip(values.shape, limits, strict=True)):
        if not low <= size <= high:
            bound = f"{low}" if low == high else f"in [{low}, {high}]"
            raise TensorError(f"{name}: dimension {axis} is {size}, must be {bound} (shape {list(values.shape)})")


def decode_hidden(tensor: pb.Tensor, hidden_size: int, max_length: int) -> np.ndarray:
    """An [S, H] hidden state as float32, 1 <= S <= max_length; FP32, FP16 or INT8 on the wire."""
    values = decode_tensor(tensor, "hidden", 2, _FLOAT_ENCODINGS, max_length * hidden_size)
    _check_dims(values, "hidden", [(1, max_length), (hidden_size, hidden_size)])
    if np.abs(values).max() > MAX_ACTIVATION:
        raise TensorError(f"hidden: values beyond +-{MAX_ACTIVATION:g} are not activations of this model")
    return values


def decode_tokens(request: pb.InferRequest, vocab_size: int, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids [S] in [0, vocab_size) and token_type_ids [S] in {0, 1} (zeros when absent), as int64."""
    ids = decode_tensor(request.input_ids, "input_ids", 1, _INT_ENCODINGS, max_length)
    outside = int(((ids < 0) | (ids >= vocab_size)).sum())
    if outside:  # the count, not the ids: error messages end up in logs, and ids are the user's text
        raise TensorError(f"input_ids: {outside} ids outside [0, {vocab_size})")
    if not request.HasField("token_type_ids"):
        return ids, np.zeros_like(ids)
    types = decode_tensor(request.token_type_ids, "token_type_ids", 1, _INT_ENCODINGS, max_length)
    _check_dims(types, "token_type_ids", [(len(ids), len(ids))])
    if not np.isin(types, (0, 1)).all():
        raise TensorError("token_type_ids: values must be 0 or 1")
    return ids, types


def time_left(context: grpc.ServicerContext) -> float | None:
    """Seconds until the client's deadline, or None when it set none."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > _NO_DEADLINE_S else max(remaining, 0.0)


def check_time(remaining: float | None) -> None:
    """Refuse with DEADLINE_EXCEEDED when too little time is left for any reply to arrive."""
    if remaining is not None and remaining < MIN_TIME_LEFT_S:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline too short or already passed")
