"""The cloud tier: a gRPC server running the rest of the model from any entry depth (and the shared tier machinery)."""
