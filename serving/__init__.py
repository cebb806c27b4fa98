"""The gRPC serving core both tiers import.

The cloud server is the plain tier (check, batch, run, answer); the edge server is the same tier plus an
exit decision and a link to the cloud. Torch-free (numpy, onnxruntime, grpc); it imports only
``cartosplit.device_runtime`` and ``cartosplit.protos``, so a tier's image needs no other tier, no export
code and no benchmarks.
"""
