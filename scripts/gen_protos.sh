#!/usr/bin/env bash
# Regenerate protos/tiers_pb2*.py from protos/tiers.proto (the generated code is committed so that
# installing cartosplit never needs grpcio-tools). Needs: pip install grpcio-tools
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/tiers.proto
# The folder installs as cartosplit.protos (pyproject's package-dir): protoc names it by its path, so the
# generated imports and module name are moved into the namespace here.
sed -i 's/^from protos import /from cartosplit.protos import /' protos/tiers_pb2_grpc.py
sed -i "s/'protos\.tiers_pb2'/'cartosplit.protos.tiers_pb2'/" protos/tiers_pb2.py
echo "generated: $(ls protos/tiers_pb2*)"
