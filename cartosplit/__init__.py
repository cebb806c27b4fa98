"""cartosplit: a BERT classifier split over device, edge and cloud (DIMEC-DC).

The kit lives under one namespace: ``cartosplit.export`` (workstation), ``cartosplit.device_runtime``
(torch-free device tier), ``cartosplit.serving`` (the gRPC serving core), ``cartosplit.edge_server`` and
``cartosplit.cloud_server`` (the tiers), ``cartosplit.protos`` (the wire contract) and
``cartosplit.benchmarks``. This root holds only the version and the command line.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cartosplit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
