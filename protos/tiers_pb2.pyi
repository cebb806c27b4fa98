from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    FP32: _ClassVar[Encoding]
    FP16: _ClassVar[Encoding]
    INT8: _ClassVar[Encoding]
    INT64: _ClassVar[Encoding]
    INT32: _ClassVar[Encoding]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    DEVICE: _ClassVar[Tier]
    EDGE: _ClassVar[Tier]
    CLOUD: _ClassVar[Tier]
ENCODING_UNSPECIFIED: Encoding
FP32: Encoding
FP16: Encoding
INT8: Encoding
INT64: Encoding
INT32: Encoding
TIER_UNSPECIFIED: Tier
DEVICE: Tier
EDGE: Tier
CLOUD: Tier

class Tensor(_message.Message):
    __slots__ = ("data", "encoding", "shape", "scale", "zero_point")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_POINT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    encoding: Encoding
    shape: _containers.RepeatedScalarFieldContainer[int]
    scale: float
    zero_point: int
    def __init__(self, data: _Optional[bytes] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., shape: _Optional[_Iterable[int]] = ..., scale: _Optional[float] = ..., zero_point: _Optional[int] = ...) -> None: ...

class TierTiming(_message.Message):
    __slots__ = ("tier", "compute_ms", "queue_ms")
    TIER_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    compute_ms: float
    queue_ms: float
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., compute_ms: _Optional[float] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("request_id", "bundle_id", "protocol_version", "depth", "hidden", "input_ids", "token_type_ids", "timings", "audit", "alpha_edge")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_IDS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    ALPHA_EDGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    bundle_id: str
    protocol_version: int
    depth: int
    hidden: Tensor
    input_ids: Tensor
    token_type_ids: Tensor
    timings: _containers.RepeatedCompositeFieldContainer[TierTiming]
    audit: bool
    alpha_edge: float
    def __init__(self, request_id: _Optional[str] = ..., bundle_id: _Optional[str] = ..., protocol_version: _Optional[int] = ..., depth: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., input_ids: _Optional[_Union[Tensor, _Mapping]] = ..., token_type_ids: _Optional[_Union[Tensor, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[TierTiming, _Mapping]]] = ..., audit: _Optional[bool] = ..., alpha_edge: _Optional[float] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("request_id", "label", "probabilities", "tier", "exit_depth", "timings", "degraded", "edge_probabilities")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    EXIT_DEPTH_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_FIELD_NUMBER: _ClassVar[int]
    EDGE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    label: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    tier: Tier
    exit_depth: int
    timings: _containers.RepeatedCompositeFieldContainer[TierTiming]
    degraded: bool
    edge_probabilities: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., label: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., tier: _Optional[_Union[Tier, str]] = ..., exit_depth: _Optional[int] = ..., timings: _Optional[_Iterable[_Union[TierTiming, _Mapping]]] = ..., degraded: _Optional[bool] = ..., edge_probabilities: _Optional[_Iterable[float]] = ...) -> None: ...
