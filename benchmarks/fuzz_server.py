"""Fuzz the cloud and edge tier servers with malformed requests, over unary and streaming RPCs.

    cartosplit bench fuzz --bundle bundles/sst2-4k --messages 10000 \
        --out benchmarks/results/fuzz-server

Starts a cloud and an edge server as subprocesses (the real CLI, as deployed), then sends at least
``--messages`` malformed InferRequests (and valid ones among them): random bytes as tensor data, wrong and unknown
encodings (values outside the enum included), hostile shapes (huge, negative, zero, high rank),
NaN/Inf payloads, INT8 with absurd scales, depths a tier does not serve, wrong bundle id or protocol
version, messages just under and over the size limit, token ids out of range, token_type_ids of the
wrong length, empty requests, unparseable wire bytes, tiny deadlines, and a slice of valid requests.
Generation is seeded (one numpy generator per message), so a failing message can be replayed from
its index.

Bounds (exit status 1 if one fails): no UNKNOWN and no INTERNAL raised by the servicer; no error
event in the servers' logs; every request gets a status code its kind allows (a malformed request is
never answered OK, a valid one always is) and every OK reply is a sane probability vector; both servers
alive at the end and answering a good request; RSS growth after warm-up below ``--rss-bound-mib``.

grpcio itself answers a message that does not parse with INTERNAL ("Exception deserializing request!")
before any servicer code runs; those are counted apart and reported, not counted against the servicer.
"""

from __future__ import annotations

import base64
import concurrent.futures
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from cartosplit.benchmarks.report import bench_command, bench_parser, bounds_table, check, histogram_table, publish
from cartosplit.device_runtime.bundle import Bundle, load_bundle
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos.codec import PROTOCOL_VERSION, encode_tensor
from cartosplit.serving.process import RssMonitor, ServerProcess, memory_summary, start_servers, stop_servers

SERVICES = {
    "cloud": pb.DESCRIPTOR.services_by_name["CloudTier"].full_name,
    "edge": pb.DESCRIPTOR.services_by_name["EdgeTier"].full_name,
}
# What grpcio answers, before the servicer runs, for bytes that do not parse as an InferRequest.
GRPC_DESERIALIZE_DETAILS = "Exception deserializing request!"
RPCS = ("unary", "stream")
DEFAULT_TIMEOUT_S = 10.0
SNAPSHOT_EVERY = 1000  # messages between RSS snapshots
MIB = 1024 * 1024

OK, INVALID, PRECONDITION, EXHAUSTED, DEADLINE, INTERNAL = (
    "OK",
    "INVALID_ARGUMENT",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "DEADLINE_EXCEEDED",
    "INTERNAL",
)
REFUSED = frozenset({INVALID})
# Kinds whose request is valid as it stands (odd but legal fields, a short deadline): not counted as malformed.
WELL_FORMED = frozenset({"valid", "odd_fields", "short_deadline"})


def server_args(max_message_mb: float) -> list[str]:
    """The servers' options: the message limit the fuzzer probes around, and info logs (errors are watched)."""
    return ["--max-message-mb", str(max_message_mb), "--log-level", "info"]


# ------------------------------------------------------------------------------------------------- the target


@dataclass(frozen=True)
class Target:
    """What the generator must know about the bundle the servers serve."""

    bundle_id: str
    hidden_size: int
    max_length: int
    vocab_size: int
    num_labels: int
    cloud_depths: tuple[int, ...]  # hidden-state depths the cloud takes (0, tokens, is apart)
    edge_depth: int
    total: int
    max_message_bytes: int

    @classmethod
    def from_bundle(cls, bundle: Bundle, max_message_bytes: int) -> Target:
        model, split = bundle.manifest.model, bundle.split_points
        hidden_depths = sorted({split.edge, *([split.router_depth] if split.router_depth > 0 else [])})
        return cls(
            bundle_id=bundle.bundle_id,
            hidden_size=model.hidden_size,
            max_length=model.max_length,
            vocab_size=vocab_size(bundle),
            num_labels=len(model.labels),
            cloud_depths=tuple(hidden_depths),
            edge_depth=split.device,
            total=split.total,
            max_message_bytes=max_message_bytes,
        )

    def served(self, tier: str) -> set[int]:
        return {0, *self.cloud_depths} if tier == "cloud" else {self.edge_depth}


def vocab_size(bundle: Bundle) -> int:
    """From the manifest; bundles exported before it recorded one: from the tokenizer."""
    size = bundle.manifest.model.vocab_size
    if size is not None:
        return size
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(bundle.path(bundle.manifest.tokenizer))).get_vocab_size()


# ---------------------------------------------------------------------------------------------- valid requests


def _envelope(t: Target, rid: str) -> pb.InferRequest:
    return pb.InferRequest(request_id=rid, bundle_id=t.bundle_id, protocol_version=PROTOCOL_VERSION)


def _length(rng: np.random.Generator, t: Target) -> int:
    return int(rng.integers(1, t.max_length + 1))


def _set_hidden(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> None:
    """Replace the payload with a valid hidden state at a depth ``tier`` serves; the envelope stays."""
    msg.ClearField("input_ids")
    msg.ClearField("token_type_ids")
    msg.depth = int(rng.choice(t.cloud_depths)) if tier == "cloud" else t.edge_depth
    values = rng.standard_normal((_length(rng, t), t.hidden_size)).astype(np.float32)
    msg.hidden.CopyFrom(encode_tensor(values, int(rng.choice([pb.FP32, pb.FP16, pb.INT8]))))


def _set_tokens(rng: np.random.Generator, t: Target, msg: pb.InferRequest) -> None:
    """Replace the payload with valid tokens at depth 0 (the cloud's full model)."""
    msg.ClearField("hidden")
    msg.depth = 0
    length = _length(rng, t)
    encoding = int(rng.choice([pb.INT64, pb.INT32]))
    msg.input_ids.CopyFrom(encode_tensor(rng.integers(0, t.vocab_size, length), encoding))
    if rng.random() < 0.5:
        msg.token_type_ids.CopyFrom(encode_tensor(rng.integers(0, 2, length), encoding))
    else:
        msg.ClearField("token_type_ids")


def valid_request(rng: np.random.Generator, t: Target, tier: str, rid: str) -> pb.InferRequest:
    msg = _envelope(t, rid)
    if tier == "cloud" and rng.random() < 0.3:
        _set_tokens(rng, t, msg)
    else:
        _set_hidden(rng, t, tier, msg)
    return msg


def _hidden(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> pb.Tensor:
    """A fresh valid hidden state to mutate (rebuilt even if present: an earlier mutation may have broken it)."""
    _set_hidden(rng, t, tier, msg)
    return msg.hidden


def _present(msg: pb.InferRequest) -> list[tuple[str, pb.Tensor]]:
    return [(name, getattr(msg, name)) for name in ("hidden", "input_ids", "token_type_ids") if msg.HasField(name)]


def _pick_tensor(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> tuple[str, pb.Tensor]:
    tensors = _present(msg)
    if not tensors:  # an earlier mutation (in a combo) removed the payload
        _set_hidden(rng, t, tier, msg)
        tensors = _present(msg)
    return tensors[int(rng.integers(len(tensors)))]


# ------------------------------------------------------------------------------------------------- mutations
# Each mutation edits a valid request in place and says what it did and which status codes are allowed.

Expect = tuple[str, frozenset[str]]
Mutation = Callable[[np.random.Generator, Target, str, pb.InferRequest], Expect]

_UNKNOWN_ENCODINGS = (6, 7, 42, 255, 2**31 - 1, -1, -(2**31))


def random_bytes(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """Random bytes as tensor data: of the right length (may decode, e.g. INT8) or of a random one."""
    name, tensor = _pick_tensor(rng, t, tier, msg)
    before = len(tensor.data)
    size = before if rng.random() < 0.4 else int(rng.integers(0, 2 * before + 17))
    tensor.data = rng.bytes(size)
    variant = f"random_bytes:{name}:{pb.Encoding.Name(tensor.encoding)}:{size}B/{before}B"
    return variant, frozenset({OK, INVALID}) if size == before else REFUSED


def bad_encoding(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """Unspecified, the other family (ints for floats and back) or a value outside the enum."""
    name, tensor = _pick_tensor(rng, t, tier, msg)
    other = [pb.INT64, pb.INT32] if name == "hidden" else [pb.FP32, pb.FP16, pb.INT8]
    tensor.encoding = int(rng.choice([pb.ENCODING_UNSPECIFIED, *other, *_UNKNOWN_ENCODINGS]))
    return f"bad_encoding:{name}:{tensor.encoding}", REFUSED


def _hostile_shape(rng: np.random.Generator, t: Target, shape: list[int], is_hidden: bool) -> tuple[str, list[int]]:
    shape = shape or [1]
    kind = str(
        rng.choice(["huge", "overflow", "negative", "zero", "empty", "rank+", "high_rank", "transposed", "count"])
    )
    if kind == "huge":
        return kind, [2**62, *shape[1:]] if rng.random() < 0.5 else [2**63 - 1] * len(shape)
    if kind == "overflow":  # the product wraps around as int64: 2**96 elements
        return kind, [2**32] * 3
    if kind == "negative":
        bad = list(shape)
        bad[int(rng.integers(len(bad)))] = -int(rng.integers(1, 2**63))
        return kind, bad
    if kind == "zero":
        bad = list(shape)
        bad[int(rng.integers(len(bad)))] = 0
        return kind, bad
    if kind == "empty":
        return kind, []
    if kind == "rank+":
        return kind, [*shape, *[1] * int(rng.integers(1, 7))]
    if kind == "high_rank":  # a few hundred kB of shape: must be refused without being echoed
        return kind, [1] * int(rng.integers(1000, 200_000))
    if kind == "transposed" and is_hidden and len(shape) == 2 and shape[0] != shape[1]:
        return kind, [shape[1], shape[0]]
    return "count", [shape[0] + 1, *shape[1:]]


def bad_shape(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    name, tensor = _pick_tensor(rng, t, tier, msg)
    kind, shape = _hostile_shape(rng, t, list(tensor.shape), name == "hidden")
    del tensor.shape[:]
    tensor.shape.extend(shape)
    shown = shape if len(shape) <= 4 else f"rank {len(shape)}"
    return f"bad_shape:{name}:{kind}:{shown}", REFUSED


def nan_inf(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """NaN (quiet, signalling), +Inf or -Inf somewhere in an FP32/FP16 hidden state."""
    tensor = _hidden(rng, t, tier, msg)
    values = rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
    encoding = int(rng.choice([pb.FP32, pb.FP16]))
    tensor.CopyFrom(encode_tensor(values, encoding))
    raw = np.frombuffer(tensor.data, dtype=np.float32 if encoding == pb.FP32 else np.float16).copy()
    bad = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    kind = str(rng.choice([*bad, "snan", "all-nan"]))
    if kind == "all-nan":
        raw[:] = np.nan
    elif kind == "snan":  # a signalling NaN bit pattern: must be caught like a quiet one
        view = raw.view(np.uint32 if encoding == pb.FP32 else np.uint16)
        view[int(rng.integers(len(view)))] = 0x7F800001 if encoding == pb.FP32 else 0x7C01
    else:
        raw[rng.integers(0, len(raw), int(rng.integers(1, 4)))] = bad[kind]
    tensor.data = raw.tobytes()
    return f"nan_inf:{pb.Encoding.Name(encoding)}:{kind}", REFUSED


def extreme_finite(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """Finite but absurd activations (float32 max, fp16 max): refused or answered, never a NaN answer."""
    tensor = _hidden(rng, t, tier, msg)
    encoding = int(rng.choice([pb.FP32, pb.FP16]))
    top = 3.4e38 if encoding == pb.FP32 else 65504.0
    magnitude = float(rng.choice([top, top / 2, 1e30 if encoding == pb.FP32 else 1e4]))
    values = rng.choice([-magnitude, magnitude], size=tuple(tensor.shape)).astype(np.float32)
    if rng.random() < 0.5:  # a single extreme value among normal ones
        values = rng.standard_normal(tuple(tensor.shape)).astype(np.float32)
        values.flat[int(rng.integers(values.size))] = magnitude
    tensor.CopyFrom(encode_tensor(values, encoding))
    return f"extreme_finite:{pb.Encoding.Name(encoding)}:{magnitude:g}", frozenset({OK, INVALID})


_SCALES = (0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 3.4e38, 1e38, 1e30, 1e20, 1.4e-45, 1e-38)
_ZERO_POINTS = (0, 127, -128, 2**31 - 1, -(2**31))


def int8_scale(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    tensor = _hidden(rng, t, tier, msg)
    q = rng.integers(-128, 128, tuple(tensor.shape)).astype(np.int8)
    scale = float(rng.choice(_SCALES))
    zero_point = int(rng.choice(_ZERO_POINTS)) if rng.random() < 0.7 else int(rng.integers(-(2**31), 2**31))
    tensor.CopyFrom(pb.Tensor(data=q.tobytes(), encoding=pb.INT8, shape=q.shape, scale=scale, zero_point=zero_point))
    refused = not math.isfinite(scale) or scale <= 0
    return f"int8_scale:{scale:g}:{zero_point}", REFUSED if refused else frozenset({OK, INVALID})


def wrong_depth(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """A depth the tier does not serve, or a payload that does not fit the depth (tokens vs hidden)."""
    kind = str(rng.choice(["unserved", "tokens_at_hidden_depth", "hidden_at_0", "both", "neither"]))
    if kind == "unserved":
        served = t.served(tier)
        candidates = [d for d in (t.total, t.total + 1, 2**32 - 1, int(rng.integers(0, 2**32))) if d not in served]
        candidates += [d for d in range(t.total + 1) if d not in served]
        msg.depth = int(rng.choice(candidates))
    elif kind == "tokens_at_hidden_depth":
        _set_tokens(rng, t, msg)
        msg.depth = int(rng.choice(t.cloud_depths)) if tier == "cloud" else t.edge_depth
    elif kind == "hidden_at_0":
        _set_hidden(rng, t, tier, msg)
        msg.depth = 0
    elif kind == "both":
        hidden = rng.standard_normal((3, t.hidden_size)).astype(np.float32)
        msg.hidden.CopyFrom(encode_tensor(hidden))
        msg.input_ids.CopyFrom(encode_tensor(np.array([1, 2, 3]), pb.INT64))
    else:
        for name in ("hidden", "input_ids", "token_type_ids"):
            msg.ClearField(name)
    return f"wrong_depth:{kind}:{msg.depth}", REFUSED


def wrong_envelope(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    kind = str(rng.choice(["empty_id", "other_id", "one_char_off", "upper", "long_id", "unicode_id", "version"]))
    if kind == "version":
        msg.protocol_version = int(rng.choice([0, PROTOCOL_VERSION + 1, 2**32 - 1]))
        return f"wrong_envelope:version:{msg.protocol_version}", frozenset({PRECONDITION})
    ids = {
        "empty_id": "",
        "other_id": rng.bytes(32).hex(),
        "one_char_off": t.bundle_id[:-1] + ("0" if t.bundle_id[-1] != "0" else "1"),
        "upper": t.bundle_id.upper(),
        "long_id": "a" * int(rng.integers(1000, 200_000)),
        "unicode_id": "\u00e9\u4e2d\U0001f600\u202e" * 8,
    }
    msg.bundle_id = ids[kind]
    return f"wrong_envelope:{kind}", frozenset({PRECONDITION})


def oversize(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """A message just under the server's limit (refused by the codec) or just over it (refused by grpc)."""
    tensor = _hidden(rng, t, tier, msg)
    over = rng.random() < 0.5
    goal = (
        t.max_message_bytes + int(rng.integers(1, 65536)) if over else t.max_message_bytes - int(rng.integers(1, 4096))
    )
    tensor.data = b""
    size = max(0, goal - msg.ByteSize() - 5)  # 5: the longest length prefix a bytes field needs below 2**35
    tensor.data = rng.bytes(size)
    tensor.data = tensor.data[: max(0, size - (msg.ByteSize() - goal))]  # trim the prefix estimate
    kind = "over" if msg.ByteSize() > t.max_message_bytes else "under"
    return f"oversize:{kind}:{msg.ByteSize()}B", frozenset({EXHAUSTED}) if kind == "over" else REFUSED


def token_ids(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    _set_tokens(rng, t, msg)  # fresh: an earlier mutation may have broken the tokens
    length = int(msg.input_ids.shape[0])
    kind = str(rng.choice(["negative", "vocab", "int64_max", "int32_edge", "too_long", "empty"]))
    encoding = msg.input_ids.encoding
    if kind == "too_long":
        ids = rng.integers(0, t.vocab_size, t.max_length + int(rng.integers(1, 1000)))
    elif kind == "empty":
        msg.input_ids.CopyFrom(pb.Tensor(data=b"", encoding=encoding, shape=[0]))
        msg.ClearField("token_type_ids")
        return "token_ids:empty", REFUSED
    else:
        ids = rng.integers(0, t.vocab_size, length)
        bad = {
            "negative": -int(rng.integers(1, 2**31)),
            "vocab": t.vocab_size + int(rng.integers(0, 1000)),
            "int64_max": 2**63 - 1,
            "int32_edge": int(rng.choice([2**31 - 1, -(2**31)])),
        }[kind]
        if kind == "int64_max":
            encoding = pb.INT64
        ids[int(rng.integers(length))] = bad
    msg.input_ids.CopyFrom(encode_tensor(ids, encoding))
    msg.ClearField("token_type_ids")
    return f"token_ids:{kind}:{pb.Encoding.Name(encoding)}", REFUSED


def token_types(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    _set_tokens(rng, t, msg)
    length = int(msg.input_ids.shape[0])
    kind = str(rng.choice(["shorter", "longer", "value", "float", "rank2"]))
    if kind in ("shorter", "longer"):
        other = length - 1 if kind == "shorter" and length > 1 else length + int(rng.integers(1, 50))
        msg.token_type_ids.CopyFrom(encode_tensor(rng.integers(0, 2, other), pb.INT64))
    elif kind == "value":
        types = rng.integers(0, 2, length)
        types[int(rng.integers(length))] = int(rng.choice([2, -1, 2**40]))
        msg.token_type_ids.CopyFrom(encode_tensor(types, pb.INT64))
    elif kind == "float":
        msg.token_type_ids.CopyFrom(encode_tensor(np.zeros(length), pb.FP32))
    else:
        msg.token_type_ids.CopyFrom(encode_tensor(np.zeros((length, 1), np.int64), pb.INT64))
    return f"token_types:{kind}", REFUSED


def empty(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """Nothing at all (refused on its protocol version 0), or a right envelope with no payload."""
    if rng.random() < 0.5:
        msg.Clear()
        return "empty:nothing", frozenset({PRECONDITION})
    for name in ("hidden", "input_ids", "token_type_ids"):
        msg.ClearField(name)
    return "empty:envelope_only", REFUSED


def odd_fields(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """A valid payload with odd free fields: a 1 MB or unicode request id, thousands of garbage timings.

    Legal in the proto, so answered; a server may also refuse a huge id or timings list it would echo and cache.
    """
    kind = str(rng.choice(["long_request_id", "unicode_request_id", "garbage_timings"]))
    if kind == "unicode_request_id":
        msg.request_id = "\x00\n\u202e\U0001f4a5\"'{}" * 4
        return f"odd_fields:{kind}", frozenset({OK})
    if kind == "long_request_id":
        msg.request_id = "r" * int(rng.integers(100_000, 1_000_000))
    else:
        count = int(rng.integers(1000, 5000))
        odd = [math.nan, math.inf, -math.inf, -1.0, 1e308]
        msg.timings.extend(
            pb.TierTiming(tier=int(rng.choice([0, 1, 2, 3, 99, -7])), compute_ms=float(rng.choice(odd)), queue_ms=1e300)
            for _ in range(count)
        )
    return f"odd_fields:{kind}", frozenset({OK, INVALID})


# Mutations that always make a request invalid on their own: what "combo" chains.
ALWAYS_REFUSED: dict[str, Mutation] = {
    "bad_encoding": bad_encoding,
    "bad_shape": bad_shape,
    "nan_inf": nan_inf,
    "wrong_depth": wrong_depth,
    "wrong_envelope": wrong_envelope,
    "token_ids": token_ids,
    "token_types": token_types,
}


def combo(rng: np.random.Generator, t: Target, tier: str, msg: pb.InferRequest) -> Expect:
    """Two or three refusals at once: whichever check runs first answers, with one of their codes."""
    names = rng.choice(sorted(ALWAYS_REFUSED), size=int(rng.integers(2, 4)), replace=False)
    variants, allowed = [], set()
    for name in names:
        variant, codes = ALWAYS_REFUSED[str(name)](rng, t, tier, msg)
        variants.append(variant)
        allowed |= codes
    return "combo:" + "+".join(variants), frozenset(allowed)


@dataclass
class Case:
    """One fuzz message: serialized bytes (not always a parseable request), what it is, what may come back."""

    category: str
    variant: str
    data: bytes
    expected: frozenset[str]
    timeout_s: float = DEFAULT_TIMEOUT_S


MUTATIONS: dict[str, Mutation] = {
    **ALWAYS_REFUSED,
    "random_bytes": random_bytes,
    "extreme_finite": extreme_finite,
    "int8_scale": int8_scale,
    "oversize": oversize,
    "empty": empty,
    "odd_fields": odd_fields,
    "combo": combo,
}
# Share of each kind of message (relative weights). Oversize ones are few: each is ~16 MiB on the wire.
WEIGHTS: dict[str, float] = {
    "valid": 8,
    "random_bytes": 8,
    "bad_encoding": 7,
    "bad_shape": 10,
    "nan_inf": 7,
    "extreme_finite": 4,
    "int8_scale": 7,
    "wrong_depth": 7,
    "wrong_envelope": 6,
    "oversize": 1,
    "token_ids": 6,
    "token_types": 5,
    "empty": 3,
    "odd_fields": 3,
    "short_deadline": 2,
    "garbage_message": 4,
    "combo": 6,
}


def garbage_message(rng: np.random.Generator, valid: bytes) -> tuple[str, bytes]:
    """Wire bytes that may not parse: pure noise, or a valid request truncated, bit-flipped or extended."""
    kind = str(rng.choice(["noise", "truncated", "flipped", "suffix"]))
    if kind == "noise":
        return kind, rng.bytes(int(rng.integers(0, 4096)))
    if kind == "truncated":
        return kind, valid[: int(rng.integers(0, max(1, len(valid))))]
    if kind == "flipped":
        data = bytearray(valid)
        for position in rng.integers(0, len(data), int(rng.integers(1, 8))):
            data[position] ^= 1 << int(rng.integers(8))
        return kind, bytes(data)
    return kind, valid + rng.bytes(int(rng.integers(1, 64)))


def make_case(
    rng: np.random.Generator, t: Target, tier: str, rid: str, categories: Sequence[str] | None = None
) -> Case:
    names = list(categories or WEIGHTS)
    weights = np.array([WEIGHTS[n] for n in names], dtype=np.float64)
    category = str(rng.choice(names, p=weights / weights.sum()))
    msg = valid_request(rng, t, tier, rid)
    if category == "valid":
        return Case(category, "valid", msg.SerializeToString(), frozenset({OK}))
    if category == "short_deadline":  # exercises the cancellation of queued work inside the batcher
        timeout = float(rng.uniform(1e-4, 5e-3))
        return Case(
            category, f"short_deadline:{timeout:.4f}s", msg.SerializeToString(), frozenset({OK, DEADLINE}), timeout
        )
    if category == "garbage_message":
        kind, data = garbage_message(rng, msg.SerializeToString())
        # whatever happens to parse goes through the servicer's checks; the rest grpcio answers INTERNAL
        allowed = frozenset({OK, INVALID, PRECONDITION, INTERNAL})
        return Case(category, f"garbage_message:{kind}:{len(data)}B", data, allowed)
    variant, expected = MUTATIONS[category](rng, t, tier, msg)
    return Case(category, variant, msg.SerializeToString(), expected)


# ------------------------------------------------------------------------------------------------- sending


@dataclass
class Task:
    index: int
    server: str
    rpc: str
    prefix: list[bytes]  # valid requests sent before the case on a stream
    case: Case

    @property
    def messages(self) -> int:
        return len(self.prefix) + 1


@dataclass
class Outcome:
    index: int
    server: str
    rpc: str
    category: str
    variant: str
    code: str
    details: str
    messages: int
    problems: list[str] = field(default_factory=list)
    data: bytes = b""


def make_task(seed: int, index: int, t: Target, tiers: Sequence[str], categories: Sequence[str] | None = None) -> Task:
    """Task ``index`` of a run seeded ``seed``: the same on every run, whatever the thread schedule."""
    rng = np.random.default_rng([seed, index])
    server = str(rng.choice(list(tiers)))
    rpc = str(rng.choice(RPCS))
    prefix = []
    if rpc == "stream":
        count = int(rng.integers(0, 4))
        prefix = [valid_request(rng, t, server, f"{index}-p{i}").SerializeToString() for i in range(count)]
    return Task(index, server, rpc, prefix, make_case(rng, t, server, f"fuzz-{index}", categories))


def _identity(data: bytes) -> bytes:
    return data


class Client:
    """Raw-bytes stubs for both RPCs of each server, so that unparseable messages can be sent too."""

    def __init__(self, addresses: dict[str, str], max_message_bytes: int) -> None:
        # the client may send past the server's limit: that is one of the things being tested
        limit = 4 * max_message_bytes + MIB
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        self.channels = {name: grpc.insecure_channel(address, options=options) for name, address in addresses.items()}
        self.unary = {
            name: ch.unary_unary(
                f"/{SERVICES[name]}/Infer", request_serializer=_identity, response_deserializer=pb.InferReply.FromString
            )
            for name, ch in self.channels.items()
        }
        self.stream = {
            name: ch.stream_stream(
                f"/{SERVICES[name]}/InferStream",
                request_serializer=_identity,
                response_deserializer=pb.InferReply.FromString,
            )
            for name, ch in self.channels.items()
        }

    def send(self, task: Task) -> tuple[str, str, list[pb.InferReply]]:
        """Status code name, details and the replies received."""
        replies: list[pb.InferReply] = []
        try:
            if task.rpc == "unary":
                replies.append(self.unary[task.server](task.case.data, timeout=task.case.timeout_s))
            else:
                call = self.stream[task.server](iter([*task.prefix, task.case.data]), timeout=task.case.timeout_s)
                replies.extend(call)
        except grpc.RpcError as exc:
            return exc.code().name, exc.details() or "", replies
        return OK, "", replies

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


def reply_problem(reply: pb.InferReply, num_labels: int) -> str | None:
    """Why an OK reply is not a usable answer ("kind: detail"), or None."""
    probs = np.asarray(reply.probabilities, dtype=np.float64)
    if len(probs) != num_labels:
        return f"wrong number of probabilities: {len(probs)} for {num_labels} labels"
    if not np.isfinite(probs).all():
        where = f"{pb.Tier.Name(reply.tier)} exit{', degraded' if reply.degraded else ''}"
        return f"non-finite probabilities: {probs.tolist()} from the {where}"
    if abs(probs.sum() - 1.0) > 1e-3 or not 0 <= reply.label < num_labels:
        return f"not a distribution: label {reply.label}, probabilities {probs.tolist()} summing to {probs.sum():.4f}"
    return None


def judge(task: Task, code: str, details: str, replies: list[pb.InferReply], num_labels: int) -> Outcome:
    """The outcome of one task, with its problems as "kind: detail" strings (the kind is what gets counted)."""
    case = task.case
    problems = []
    if code not in case.expected:
        problems.append(f"unexpected status: {code}, allowed {sorted(case.expected)}; {details[:300]}")
    if code == INTERNAL and details != GRPC_DESERIALIZE_DETAILS:
        problems.append(f"INTERNAL from the servicer: {details[:300]}")
    if code == INTERNAL and case.category != "garbage_message":
        problems.append("grpcio refused a valid serialization: INTERNAL for bytes made by SerializeToString")
    # the server answers the prefix before refusing the case (grpc-level refusals may cut the stream)
    if code in (OK, INVALID, PRECONDITION) and len(replies) < len(task.prefix):
        problems.append(f"stream replies lost: {len(replies)} for {len(task.prefix)} valid requests before the case")
    problems += [p for p in (reply_problem(r, num_labels) for r in replies) if p]
    return Outcome(
        task.index,
        task.server,
        task.rpc,
        case.category,
        case.variant,
        code,
        details[:300],
        task.messages,
        problems,
        case.data if problems and len(case.data) <= 4096 else b"",
    )


def run_task(client: Client, task: Task, num_labels: int) -> Outcome:
    code, details, replies = client.send(task)
    return judge(task, code, details, replies, num_labels)


def probe(client: Client, server: str, t: Target) -> dict:
    """A good request through both RPCs of one server: does it still answer properly?"""
    rng = np.random.default_rng(12345)
    results = {}
    for rpc in RPCS:
        msg = valid_request(rng, t, server, f"probe-{rpc}").SerializeToString()
        task = Task(-1, server, rpc, [], Case("valid", "probe", msg, frozenset({OK})))
        outcome = run_task(client, task, t.num_labels)
        results[rpc] = {"code": outcome.code, "problems": outcome.problems}
    results["ok"] = all(r["code"] == OK and not r["problems"] for r in results.values() if isinstance(r, dict))
    return results


# ------------------------------------------------------------------------------------------------------ run


def _histogram(outcomes: list[Outcome], key: Callable[[Outcome], str]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter] = {}
    for o in outcomes:
        table.setdefault(key(o), Counter())[o.code] += 1
    return {k: dict(sorted(v.items())) for k, v in sorted(table.items())}


def run_fuzz(
    bundle: str | Path,
    messages: int = 10_000,
    tiers: Sequence[str] = ("cloud", "edge"),
    fmt: str = "onnx-fp32",
    seed: int = 0,
    workers: int = 4,
    max_message_mb: float = 16.0,
    rss_bound_mib: float = 50.0,
    warmup_messages: int | None = None,
    categories: Sequence[str] | None = None,
    server_env: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Start the servers, send at least ``messages`` malformed messages (and valid ones among them), stop them;
    the report, with ``passed``."""
    load_before = os.getloadavg()  # other jobs on the machine show here: the figures are shared-CPU ones
    loaded = load_bundle(bundle)
    max_bytes = int(max_message_mb * MIB)
    target = Target.from_bundle(loaded, max_bytes)
    warmup = max(1, messages // 10) if warmup_messages is None else warmup_messages
    log(f"starting {', '.join(tiers)} server(s) for {bundle} ({fmt})")
    servers = start_servers(bundle, fmt, tiers, server_args(max_message_mb), env=server_env)
    try:
        plan = Plan(messages, tuple(tiers), seed, workers, warmup, rss_bound_mib, tuple(categories or WEIGHTS))
        return _fuzz(servers, target, plan, log) | {
            "bundle": str(bundle),
            "bundle_id": loaded.bundle_id[:12],
            "model": loaded.manifest.model.id,
            "server_format": fmt,
            "max_message_bytes": max_bytes,
            "server_env": server_env or {},
            "load_average": {"before": load_before, "end": os.getloadavg()},
        }
    finally:
        stop_servers(servers)


@dataclass(frozen=True)
class Plan:
    """What to send: how many messages, to which servers, in which mix, how fast, and the memory bound."""

    messages: int
    tiers: tuple[str, ...]
    seed: int
    workers: int
    warmup: int  # messages before the RSS baseline is taken
    rss_bound_mib: float
    categories: tuple[str, ...]

    @property
    def snapshot_every(self) -> int:
        return min(SNAPSHOT_EVERY, max(1, self.messages // 10))

    @property
    def counts_malformed(self) -> bool:
        """``messages`` counts malformed messages; a run of well-formed kinds only counts every message."""
        return any(c not in WELL_FORMED for c in self.categories)

    def progress(self, task: Task) -> int:
        return int(task.case.category not in WELL_FORMED) if self.counts_malformed else task.messages


def _fuzz(servers: dict[str, ServerProcess], t: Target, plan: Plan, log: Callable[[str], None]) -> dict:
    client = Client({name: s.address for name, s in servers.items()}, t.max_message_bytes)
    outcomes: list[Outcome] = []
    monitor = RssMonitor({name: s.pid for name, s in servers.items()}, interval_s=0.25)
    snapshots = [{"progress": 0, "messages": 0, "t_s": 0.0, **monitor.read()}]
    done, sent, index = 0, 0, 0
    started = time.perf_counter()
    with monitor, concurrent.futures.ThreadPoolExecutor(plan.workers, thread_name_prefix="fuzz") as pool:
        while done < plan.messages:
            # one chunk of ~snapshot_every (malformed) messages at a time, then an RSS snapshot between chunks
            chunk, chunk_done = [], 0
            while chunk_done < min(plan.snapshot_every, plan.messages - done):
                task = make_task(plan.seed, index, t, plan.tiers, plan.categories)
                index += 1
                chunk.append(pool.submit(run_task, client, task, t.num_labels))
                chunk_done += plan.progress(task)
                sent += task.messages
            outcomes.extend(f.result() for f in chunk)
            done += chunk_done
            elapsed = time.perf_counter() - started
            snapshots.append({"progress": done, "messages": sent, "t_s": round(elapsed, 2), **monitor.read()})
            rss = ", ".join(_rss_text(snapshots[-1], plan.tiers))
            counted = f"{done} malformed ({sent} messages)" if plan.counts_malformed else f"{sent} messages"
            log(f"  {counted}, {elapsed:.1f} s, RSS {rss}")
        elapsed = time.perf_counter() - started
    final = {name: {"alive": servers[name].alive(), **probe(client, name, t)} for name in servers}
    client.close()
    time.sleep(0.5)  # let the servers' last log lines reach the stderr readers
    return _report(servers, outcomes, snapshots, monitor.peak, final, elapsed, plan)


def _rss_text(snapshot: dict, tiers: Sequence[str]) -> list[str]:
    return [f"{name} {snapshot[name]:.0f} MiB" for name in tiers if snapshot.get(name) is not None]


def _after_warmup(snapshots: list[dict], name: str, warmup: int) -> float | None:
    return next((s[name] for s in snapshots if s["progress"] >= warmup and s.get(name) is not None), None)


def _report(
    servers: dict[str, ServerProcess],
    outcomes: list[Outcome],
    snapshots: list[dict],
    peak: dict[str, float],
    final: dict[str, dict],
    elapsed: float,
    plan: Plan,
) -> dict:
    sent, warmup, rss_bound_mib = sum(o.messages for o in outcomes), plan.warmup, plan.rss_bound_mib
    malformed = sum(o.category not in WELL_FORMED for o in outcomes)
    servicer_internal = [
        o for o in outcomes if o.code == "UNKNOWN" or (o.code == INTERNAL and o.details != GRPC_DESERIALIZE_DETAILS)
    ]
    grpcio_internal = sum(o.code == INTERNAL and o.details == GRPC_DESERIALIZE_DETAILS for o in outcomes)
    problems = [o for o in outcomes if o.problems]
    memory = {
        name: memory_summary(
            snapshots[0][name], _after_warmup(snapshots, name, warmup), snapshots[-1][name], peak.get(name)
        )
        for name in servers
    }
    checks = [
        check("no UNKNOWN or servicer INTERNAL", len(servicer_internal), "== 0", not servicer_internal),
        check(
            "no error events in the server logs",
            {n: s.error_count for n, s in servers.items()},
            "== 0 each",
            all(s.error_count == 0 for s in servers.values()),
        ),
        check("every status code allowed for its message, every OK reply sane", len(problems), "== 0", not problems),
    ]
    for name in servers:
        checks.append(
            check(
                f"{name} alive and answering a good request at the end",
                final[name],
                "alive, OK",
                final[name]["alive"] and final[name]["ok"],
            )
        )
        growth = memory[name]["growth_after_warmup_mib"]
        checks.append(
            check(
                f"{name} RSS growth after warm-up ({warmup} {'malformed ' if plan.counts_malformed else ''}"
                "messages), MiB",
                growth,
                f"< {rss_bound_mib:g}",
                growth is not None and growth < rss_bound_mib,
            )
        )
    return {
        "messages": sent,
        "malformed_messages": malformed,
        "valid_messages": sent - malformed,
        "rpcs": len(outcomes),
        "seconds": round(elapsed, 1),
        "messages_per_s": round(sent / elapsed, 1) if elapsed else None,
        "seed": plan.seed,
        "workers": plan.workers,
        "categories": list(plan.categories),
        "status_by_server": _histogram(outcomes, lambda o: o.server),
        "status_by_server_and_rpc": _histogram(outcomes, lambda o: f"{o.server} {o.rpc}"),
        "status_by_category": _histogram(outcomes, lambda o: o.category),
        "unknown_or_internal_from_servicer": len(servicer_internal),
        "internal_from_grpcio_unparseable_message": grpcio_internal,
        "problems": [_problem_record(o) for o in problems[:50]],
        "problem_count": len(problems),
        "problem_summary": _problem_summary(problems),
        "server_error_events": {n: s.error_lines for n, s in servers.items()},
        "server_other_stderr": {n: s.other_lines for n, s in servers.items()},
        "memory": memory,
        "memory_warmup_messages": warmup,
        "rss_bound_mib": rss_bound_mib,
        "rss_snapshots": snapshots,
        "final": final,
        "checks": checks,
        "passed": all(c["held"] for c in checks),
    }


def _show_liveness(value: object) -> object:
    if isinstance(value, dict) and "alive" in value:
        return f"alive={value['alive']}, unary {value['unary']['code']}, stream {value['stream']['code']}"
    return value


def _problem_summary(problems: list[Outcome]) -> dict[str, dict[str, int]]:
    """Problems by kind of message and kind of problem (the text before its first colon), all of them counted."""
    table: dict[str, Counter] = {}
    for o in problems:
        for text in o.problems:
            table.setdefault(o.category, Counter())[text.split(":", 1)[0]] += 1
    return {k: dict(v) for k, v in sorted(table.items())}


def _problem_record(o: Outcome) -> dict:
    record = {
        k: getattr(o, k) for k in ("index", "server", "rpc", "category", "variant", "code", "details", "problems")
    }
    if o.data:
        record["message_base64"] = base64.b64encode(o.data).decode()
    return record


# ---------------------------------------------------------------------------------------------------- report


def markdown(r: dict) -> list[str]:
    lines = [
        "# Fuzzing the tier servers",
        "",
        f"Command: `{r['command']}`  ",
        f"Machine: {r['machine']}  ",
        f"Load average (1 min) before the run {r['load_average']['before'][0]:.2f}, at its end "
        f"{r['load_average']['end'][0]:.2f} (this run's own processes included).  ",
        f"Bundle: {r['bundle']} (id {r['bundle_id']}, {r['model']}), servers in {r['server_format']}, "
        f"message limit {r['max_message_bytes']:,} B, seed {r['seed']}, {r['workers']} client threads.",
        *([f"Kinds sent: only {', '.join(r['categories'])}."] if set(r["categories"]) != set(WEIGHTS) else []),
        *([f"Server environment: {r['server_env']}."] if r["server_env"] else []),
        "",
        f"**{r['malformed_messages']:,} malformed messages** and {r['valid_messages']:,} valid ones (valid kinds, "
        f"and the valid requests that open streams) in {r['rpcs']:,} RPCs (one fuzzed message each) over "
        f"{r['seconds']} s: **{r['messages_per_s']} messages/s**. Result: **{'PASSED' if r['passed'] else 'FAILED'}**.",
        "",
        *bounds_table(r["checks"], _show_liveness),
    ]
    lines += [
        "",
        f"INTERNAL from grpcio for unparseable bytes (before the servicer runs): "
        f"{r['internal_from_grpcio_unparseable_message']}.",
        "",
        "## Server memory (RSS, MiB)",
        "",
        "| server | start | after warm-up | end | peak | growth after warm-up |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in r["memory"].items():
        lines.append(
            f"| {name} | {m['start_mib']} | {m['after_warmup_mib']} | {m['end_mib']} | {m['peak_mib']} "
            f"| {m['growth_after_warmup_mib']} |"
        )
    lines += ["", "## Status codes per server and RPC (one per RPC)", ""]
    lines += histogram_table(r["status_by_server_and_rpc"], "server, RPC")
    lines += ["", "## Status codes per kind of message", ""]
    lines += histogram_table(r["status_by_category"], "kind")
    if r["problems"]:
        lines += ["", f"## Problems ({r['problem_count']}; first {len(r['problems'])} listed)", ""]
        lines += [f"- {kind}: {counts}" for kind, counts in r["problem_summary"].items()]
        lines.append("")
        lines += [
            f"- #{p['index']} {p['server']} {p['rpc']} `{p['variant']}`: {'; '.join(p['problems'])}"
            for p in r["problems"]
        ]
    errors = {n: lines_ for n, lines_ in r["server_error_events"].items() if lines_}
    if errors:
        lines += ["", "## Server error events", ""]
        for name, events in errors.items():
            lines += [f"- {name}: `{e[:500]}`" for e in events[:5]]
    return lines


def replay(
    bundle: str | Path,
    indexes: Sequence[int],
    tiers: Sequence[str] = ("cloud", "edge"),
    fmt: str = "onnx-fp32",
    seed: int = 0,
    max_message_mb: float = 16.0,
    categories: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[Outcome]:
    """Send again the messages of a run (same seed, tiers and kinds) by index, to fresh servers: a reproducer."""
    target = Target.from_bundle(load_bundle(bundle), int(max_message_mb * MIB))
    servers = start_servers(bundle, fmt, tiers, server_args(max_message_mb))
    outcomes = []
    try:
        client = Client({name: s.address for name, s in servers.items()}, target.max_message_bytes)
        for index in indexes:
            task = make_task(seed, index, target, tiers, categories)
            outcomes.append(run_task(client, task, target.num_labels))
            o = outcomes[-1]
            log(f"#{index} {o.server} {o.rpc} {o.variant}: {o.code} {o.details!r} problems={o.problems}")
        client.close()
        time.sleep(0.3)
        for name, server in servers.items():
            log(f"{name}: alive={server.alive()}, error events={server.error_lines}")
    finally:
        stop_servers(servers)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("fuzz", __doc__)
    parser.add_argument("--bundle", required=True)
    parser.add_argument(
        "--messages", type=int, default=10_000, help="at least this many malformed messages (default 10000)"
    )
    parser.add_argument("--out", help="path prefix for .json and .md (required unless --replay)")
    parser.add_argument("--format", dest="fmt", default="onnx-fp32", choices=("onnx-fp32", "onnx-int8"))
    parser.add_argument("--tiers", nargs="+", default=["cloud", "edge"], choices=("cloud", "edge"))
    parser.add_argument(
        "--replay",
        nargs="+",
        type=int,
        metavar="INDEX",
        help="resend these messages of a run (same --seed, --tiers, --only) to fresh servers and print what comes back",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="concurrent client threads (default 4)")
    parser.add_argument("--max-message-mb", type=float, default=16.0, help="the servers' message limit")
    parser.add_argument("--rss-bound-mib", type=float, default=50.0, help="allowed RSS growth after warm-up")
    parser.add_argument(
        "--warmup-messages",
        type=int,
        default=None,
        help="malformed messages before the RSS baseline (default: a tenth)",
    )
    parser.add_argument("--only", nargs="+", choices=sorted(WEIGHTS), help="send only these kinds (to narrow a bug)")
    parser.add_argument(
        "--server-env",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="environment for the servers only, e.g. MALLOC_MMAP_THRESHOLD_=1048576 (tells allocator retention "
        "from a leak)",
    )
    args = parser.parse_args(argv)
    if args.replay:
        replay(args.bundle, args.replay, args.tiers, args.fmt, args.seed, args.max_message_mb, args.only)
        return 0
    if not args.out:
        parser.error("--out is required (unless --replay)")
    report = run_fuzz(
        args.bundle,
        args.messages,
        args.tiers,
        args.fmt,
        args.seed,
        args.workers,
        args.max_message_mb,
        args.rss_bound_mib,
        args.warmup_messages,
        args.only,
        dict(item.split("=", 1) for item in args.server_env),
    )
    publish(report, args.out, bench_command("fuzz", argv), markdown)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
