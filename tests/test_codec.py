import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos.codec import TensorError, decode_tensor, encode_tensor

FLOATS = (pb.FP32, pb.FP16, pb.INT8)


@pytest.mark.parametrize(
    ("encoding", "tolerance", "ratio"), [(pb.FP32, 0, 1.0), (pb.FP16, 2e-3, 0.5), (pb.INT8, 0.02, 0.25)]
)
def test_hidden_states_round_trip_within_each_encodings_precision(encoding, tolerance, ratio):
    x = np.random.default_rng(0).normal(size=(13, 384)).astype(np.float32)
    tensor = encode_tensor(x, encoding)
    assert len(tensor.data) == int(x.nbytes * ratio)
    y = decode_tensor(tensor, "hidden", 2, FLOATS, 10**6)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert np.abs(x - y).max() <= tolerance * max(1.0, np.abs(x).max())


def test_token_ids_round_trip_as_int64():
    ids = np.array([101, 7592, 102])
    out = decode_tensor(encode_tensor(ids, pb.INT32), "input_ids", 1, (pb.INT32, pb.INT64), 512)
    assert out.dtype == np.int64 and out.tolist() == [101, 7592, 102]


@pytest.mark.parametrize(
    ("tensor", "match"),
    [
        (pb.Tensor(data=b"\0" * 8, encoding=pb.FP32, shape=[2, 2]), "bytes do not fit"),
        (pb.Tensor(data=b"\0" * 16, encoding=pb.FP32, shape=[4]), "expected rank 2"),
        (pb.Tensor(data=b"", encoding=pb.FP32, shape=[0, 4]), ">= 1"),
        (pb.Tensor(data=b"\0" * 16, encoding=pb.INT64, shape=[2, 1]), "not accepted"),
        (pb.Tensor(data=b"\0" * 16, encoding=pb.ENCODING_UNSPECIFIED, shape=[2, 2]), "not accepted"),
        (pb.Tensor(data=np.full(4, np.nan, np.float32).tobytes(), encoding=pb.FP32, shape=[2, 2]), "NaN"),
        (pb.Tensor(data=b"\0" * 4, encoding=pb.INT8, shape=[2, 2], scale=0.0), "positive finite scale"),
        (pb.Tensor(data=b"\x7f" * 4, encoding=pb.INT8, shape=[2, 2], scale=3e38, zero_point=-128), "float32 range"),
        (pb.Tensor(data=b"", encoding=pb.FP32, shape=[10**6, 10**6]), "over this server's limit"),
        (pb.Tensor(data=b"", encoding=pb.FP32, shape=[2**62, 2**62]), "over this server's limit"),  # wraps in int64
    ],
)
def test_malformed_tensors_are_refused_with_a_clear_message(tensor, match):
    with pytest.raises(TensorError, match=match):
        decode_tensor(tensor, "hidden", 2, FLOATS, 10**6)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=64),
    encoding=st.integers(0, 9),
    shape=st.lists(st.integers(-3, 2**40), max_size=4),
    scale=st.floats(allow_nan=True, allow_infinity=True, width=32),
)
def test_arbitrary_tensors_decode_or_raise_tensor_error(data, encoding, shape, scale):
    tensor = pb.Tensor(data=data, encoding=encoding, shape=shape, scale=scale)
    try:
        out = decode_tensor(tensor, "hidden", 2, FLOATS, 4096)
    except TensorError:
        return
    assert out.dtype == np.float32 and np.isfinite(out).all() and out.ndim == 2
