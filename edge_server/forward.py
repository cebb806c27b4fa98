"""The edge's link to the cloud: an unsure sample's hidden state goes on within what is left of its deadline.

Part of the client's remaining time is kept back, so that the edge exit can still answer (degraded) when the
cloud is too slow.
"""

from __future__ import annotations

import grpc
import numpy as np

from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.codec import ENCODINGS, encode_tensor
from cartosplit.protos.security import ClientSecurity
from cartosplit.serving.config import grpc_options

DEFAULT_FORWARD_TIMEOUT_S = 10.0  # when the client set no deadline
# Keep part of the client's remaining time for answering from the edge exit if the cloud is too slow.
_RESERVE_FRACTION, _RESERVE_MAX_S = 0.2, 0.05


class ForwardFailed(Exception):
    """The cloud gave no reply in time; the message says why (for the logs: the client gets the edge's answer)."""


class CloudLink:
    """A channel to the cloud tier, with TLS / mutual TLS / token as ``security`` says (None = plaintext)."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        encoding: str = "fp16",
        timeout_s: float = DEFAULT_FORWARD_TIMEOUT_S,
        security: ClientSecurity | None = None,
    ) -> None:
        if encoding not in ENCODINGS:
            raise ValueError(f"forward encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
        self.address, self.encoding, self.timeout_s = address, ENCODINGS[encoding], timeout_s
        # a short reconnect back-off so the edge notices a restarted cloud within seconds
        options = [*grpc_options(max_message_bytes), ("grpc.max_reconnect_backoff_ms", 5000)]
        self.security = security or ClientSecurity()
        # a ValueError here: an unreadable file, or a token that would go out in plaintext
        self._channel = self.security.channel(address, options=options)
        self._stub = pb_grpc.CloudTierStub(self._channel)

    def timeout(self, remaining: float | None) -> float:
        """Seconds the cloud gets, given the client's ``remaining`` seconds (None: no deadline)."""
        if remaining is None:
            return self.timeout_s
        return min(self.timeout_s, remaining - min(_RESERVE_MAX_S, _RESERVE_FRACTION * remaining))

    def forward(
        self,
        request: pb.InferRequest,
        hidden_out: np.ndarray,
        depth: int,
        timing: pb.TierTiming,
        remaining: float | None,
    ) -> pb.InferReply:
        """The cloud's reply to ``hidden_out`` entering at ``depth``; :class:`ForwardFailed` when none comes."""
        timeout = self.timeout(remaining)
        if timeout <= 0:
            raise ForwardFailed("no time left for the cloud")
        onward = pb.InferRequest(
            request_id=request.request_id,
            bundle_id=request.bundle_id,
            protocol_version=request.protocol_version,
            depth=depth,
            hidden=encode_tensor(hidden_out, self.encoding),
            timings=[*request.timings, timing],
            audit=request.audit,  # so the cloud counts it apart from user traffic too
        )
        try:
            return self._stub.Infer(onward, timeout=timeout)
        except grpc.RpcError as exc:
            raise ForwardFailed(f"{exc.code().name}: {exc.details()}") from None

    def close(self) -> None:
        self._channel.close()
