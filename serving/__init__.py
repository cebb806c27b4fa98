"""The gRPC serving core both tiers import."""
