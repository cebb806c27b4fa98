"""The edge tier: a gRPC server running the edge slice and its exit, forwarding the unsure to the cloud."""
