#!/usr/bin/env bash
# Regenerate protos/tiers_pb2*.py from protos/tiers.proto (the generated code is committed so that
# installing cartosplit never needs grpcio-tools). Needs: pip install grpcio-tools
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/tiers.proto
echo "generated: $(ls protos/tiers_pb2*)"
