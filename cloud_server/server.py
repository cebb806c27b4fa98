"""The cloud tier: finishes what the device or the edge started and answers from the final exit.

Depths served: the edge split e and the router depth r (when r > 0) take a hidden state and run
``cloud_from_<depth>``; depth 0 takes raw tokens and runs ``full`` (the all-cloud path).
"""

from __future__ import annotations

import argparse
import sys

import grpc

from cartosplit.device_runtime.bundle import Bundle, BundleError, load_bundle
from cartosplit.protos import tiers_pb2 as pb
from cartosplit.protos import tiers_pb2_grpc as pb_grpc
from cartosplit.serving.checks import RequestError, check_envelope, decode_hidden, decode_tokens
from cartosplit.serving.config import ServerConfig
from cartosplit.serving.flags import add_common_arguments, config_from_args
from cartosplit.serving.graphs import cloud_graphs, tier_graphs
from cartosplit.serving.lifecycle import TierServer, run_until_signal
from cartosplit.serving.logs import configure_logging
from cartosplit.serving.metrics import TierMetrics
from cartosplit.serving.servicer import TierServicer, reply_from_logits

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CloudTier"].full_name
DEFAULT_PORT = 50052


class CloudServicer(TierServicer, pb_grpc.CloudTierServicer):
    tier = pb.CLOUD
    tier_name = "cloud"

    def __init__(self, bundle: Bundle, config: ServerConfig, metrics: TierMetrics | None = None) -> None:
        super().__init__(bundle, config, metrics or TierMetrics(self.tier_name))
        self.graph_for_depth = cloud_graphs(bundle)
        try:
            self.add_graphs(tier_graphs(bundle, self.tier_name))
        except Exception:
            self.close()  # no batcher threads left behind by a half-built servicer
            raise

    def infer(self, request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferReply:
        check_envelope(request, self.bundle.bundle_id, self.graph_for_depth, self.tier_name)
        if request.depth == 0:
            if not request.HasField("input_ids") or request.HasField("hidden"):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "depth 0 takes input_ids (and no hidden)")
            arrays = decode_tokens(request, self.vocab_size, self.max_length)
        else:
            if not request.HasField("hidden") or request.HasField("input_ids"):
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"depth {request.depth} takes hidden (and no input_ids)"
                )
            arrays = (decode_hidden(request.hidden, self.hidden_size, self.max_length),)
        result = self.run_graph(self.graph_for_depth[request.depth], arrays, context)
        (logits,) = result.outputs
        return reply_from_logits(request, logits, pb.CLOUD, self.split.total, self.timing(result))


def build_cloud_server(config: ServerConfig, bundle: Bundle | None = None) -> TierServer:
    """Load the bundle (verified) and the cloud graphs, bind the port; call ``.start()`` to serve."""
    bundle = bundle or load_bundle(config.bundle)
    servicer = CloudServicer(bundle, config)
    return TierServer(config, servicer, pb_grpc.add_CloudTierServicer_to_server, SERVICE_NAME)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cartosplit serve-cloud``."""
    add_common_arguments(parser, DEFAULT_PORT)


def serve(args: argparse.Namespace) -> int:
    """``cartosplit serve-cloud``: serve until SIGTERM/SIGINT; prints one ready line to stdout."""
    configure_logging(args.log_level)
    try:
        config = config_from_args(args)
        server = build_cloud_server(config)
    except (BundleError, OSError, ValueError) as exc:
        print(f"cartosplit serve-cloud: {exc}", file=sys.stderr)
        return 2
    return run_until_signal(server, f"cloud serving {config.bundle} on {server.address}")
