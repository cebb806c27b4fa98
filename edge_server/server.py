"""The edge tier: runs layers d+1..e, answers from the edge exit when confident, else forwards to the cloud.

If the cloud cannot answer (unreachable, an error, no time left) the edge exit answers anyway, marked
``degraded``: a slightly less accurate answer beats none.

An audit (a sample already answered early, re-sent for comparison) always goes on to the cloud, whatever
``alpha_edge`` says. Whenever the cloud answers, its reply also carries the edge exit's probabilities
(``edge_probabilities``), so the device can compare the two exits.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import grpc
import numpy as np

from cartosplit.device_runtime.bundle import Bundle, BundleError, load_bundle
from cartosplit.device_runtime.numerics import softmax
from cartosplit.edge_server.forward import DEFAULT_FORWARD_TIMEOUT_S, CloudLink, ForwardFailed
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.protos.codec import ENCODINGS
from cartosplit.protos.security import ClientSecurity
from cartosplit.serving.checks import RequestError, check_envelope, decode_hidden, time_left
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.flags import add_common_arguments, config_from_args, parse_alpha
from cartosplit.serving.graphs import tier_graphs
from cartosplit.serving.lifecycle import TierServer, run_until_signal
from cartosplit.serving.logs import configure_logging, log_event, short_id
from cartosplit.serving.metrics import TierMetrics
from cartosplit.serving.servicer import TierServicer, reply_from_logits

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EdgeTier"].full_name
DEFAULT_PORT = 50051


class EdgeServicer(TierServicer, pb_grpc.EdgeTierServicer):
    tier = pb.EDGE
    tier_name = "edge"

    def __init__(
        self,
        bundle: Bundle,
        config: ServerConfig,
        cloud_address: str,
        alpha_edge: float | None = None,
        forward_encoding: str = "fp16",
        forward_timeout_s: float = DEFAULT_FORWARD_TIMEOUT_S,
        cloud_security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(bundle, config, TierMetrics(self.tier_name, forwarding=True))
        policy_alpha = bundle.manifest.policy.alpha_edge
        self.alpha_edge = policy_alpha if alpha_edge is None else alpha_edge
        try:
            self.cloud = CloudLink(
                cloud_address, config.max_message_bytes, forward_encoding, forward_timeout_s, cloud_security
            )
        except ValueError:  # an unknown encoding, an unreadable file, or a token that would go out in plaintext
            super().close()
            raise
        try:
            self.add_graphs(tier_graphs(bundle, self.tier_name))
        except Exception:
            self.close()
            raise

    def infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:
        check_envelope(request, self.bundle.bundle_id, {self.split.device}, self.tier_name)
        if not request.HasField("hidden") or request.HasField("input_ids"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the edge takes hidden (and no input_ids)")
        hidden = decode_hidden(request.hidden, self.hidden_size, self.max_length)
        result = self.run_graph("edge", (hidden,), context)
        hidden_out, logits = result.outputs
        timing = self.timing(result)
        edge_probs = softmax(logits)
        # the device's threshold can only make the edge stricter (NaN compares false: the edge's own)
        alpha = max(self.alpha_edge, request.alpha_edge) if request.alpha_edge > 0 else self.alpha_edge
        if not request.audit and float(edge_probs.max()) >= alpha:
            return reply_from_logits(request, logits, pb.EDGE, self.split.edge, timing)
        reply = self._forward(request, hidden_out, timing, context)
        if reply is None:  # an audit too: its tier is then not CLOUD, and the device drops it
            return reply_from_logits(request, logits, pb.EDGE, self.split.edge, timing, degraded=True)
        reply.edge_probabilities.extend(edge_probs.tolist())
        return reply

    def _forward(
        self,
        request: pb.InferRequest,
        hidden_out: np.ndarray,
        timing: pb.TierTiming,
        context: grpc.ServicerContext,
    ) -> pb.InferReply | None:
        """The cloud's reply, or None (logged and counted) when it cannot give one in time.

        Audits are counted in their own forwarded/degraded counters, so the user traffic's stay user traffic.
        """
        m = self.metrics
        forwarded, degraded = (m.audit_forwarded, m.audit_degraded) if request.audit else (m.forwarded, m.degraded)
        forwarded.labels(self.tier_name).inc()
        try:
            return self.cloud.forward(request, hidden_out, self.split.edge, timing, time_left(context))
        except ForwardFailed as failure:
            degraded.labels(self.tier_name).inc()
            log_event(
                logging.WARNING,
                "forward_failed",
                tier=self.tier_name,
                request_id=short_id(request.request_id),
                cloud=self.cloud.address,
                audit=request.audit,
                reason=str(failure)[:300],
            )
            return None

    def close(self) -> None:
        super().close()
        self.cloud.close()


def build_edge_server(
    config: ServerConfig,
    cloud_address: str,
    alpha_edge: float | None = None,
    forward_encoding: str = "fp16",
    forward_timeout_s: float = DEFAULT_FORWARD_TIMEOUT_S,
    bundle: Bundle | None = None,
    cloud_security: ClientSecurity | None = None,
) -> TierServer:
    """Load the bundle (verified) and the edge graph, bind the port; call ``.start()`` to serve.

    ``alpha_edge`` overrides the bundle policy's threshold (0 = always answer here, inf = always forward).
    ``cloud_security``: TLS, client certificate and token for the link to the cloud (None = plaintext).
    """
    bundle = bundle or load_bundle(config.bundle)
    servicer = EdgeServicer(
        bundle, config, cloud_address, alpha_edge, forward_encoding, forward_timeout_s, cloud_security
    )
    return TierServer(config, servicer, pb_grpc.add_EdgeTierServicer_to_server, SERVICE_NAME)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit serve-edge``."""
    add_common_arguments(parser, DEFAULT_PORT)
    parser.add_argument("--cloud", required=True, metavar="HOST:PORT", help="address of the cloud tier")
    parser.add_argument(
        "--alpha-edge",
        type=parse_alpha,
        default=None,
        help="answer at the edge when its max-softmax >= this (default: the bundle's calibrated policy; "
        "0 = always, inf = never)",
    )
    parser.add_argument(
        "--forward-encoding",
        choices=sorted(ENCODINGS),
        default="fp16",
        help="how the hidden state travels to the cloud (default fp16: half the bytes, ~1e-3 relative error)",
    )
    parser.add_argument(
        "--forward-timeout-s",
        type=float,
        default=DEFAULT_FORWARD_TIMEOUT_S,
        help="cloud timeout when the client set no deadline (default 10 s)",
    )
    parser.add_argument("--cloud-ca", metavar="PEM", help="reach the cloud over TLS, trusting this CA")
    parser.add_argument("--cloud-cert", metavar="PEM", help="mutual TLS: this edge's client certificate")
    parser.add_argument("--cloud-key", metavar="PEM", help="the private key of --cloud-cert")
    parser.add_argument(
        "--cloud-token-file", metavar="FILE", help="send the token this file holds to the cloud (needs --cloud-ca)"
    )
    parser.add_argument(
        "--cloud-server-name", metavar="NAME", help="the name the cloud's certificate carries, if not the host dialled"
    )


def cloud_security_from_args(args: argparse.Namespace) -> ClientSecurity | None:
    """--cloud-ca/--cloud-cert/--cloud-key/--cloud-token-file/--cloud-server-name; None when none is given."""
    return ClientSecurity.from_options(
        args.cloud_ca, args.cloud_cert, args.cloud_key, args.cloud_token_file, args.cloud_server_name
    )


def serve(args: argparse.Namespace) -> int:
    """``cartosplit serve-edge``: serve until SIGTERM/SIGINT; prints one ready line to stdout."""
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
        server = build_edge_server(
            config,
            args.cloud,
            args.alpha_edge,
            args.forward_encoding,
            args.forward_timeout_s,
            cloud_security=cloud_security_from_args(args),
        )
    except (BundleError, OSError, ValueError) as exc:
        print(f"cartosplit serve-edge: {exc}", file=sys.stderr)
        return 2
    alpha = server.servicer.alpha_edge
    log_event(
        logging.INFO,
        "edge_config",
        cloud=args.cloud,
        alpha_edge="inf" if math.isinf(alpha) else alpha,
        alpha_source="policy" if args.alpha_edge is None else "--alpha-edge",
        forward_encoding=args.forward_encoding,
        cloud_security=server.servicer.cloud.security.mode,
    )
    return run_until_signal(server, f"edge serving {config.bundle} on {server.address}")
