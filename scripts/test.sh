#!/usr/bin/env bash
# The test command (README, .ci/run): installs what it needs, lints, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1  # tests never reach a model hub
ruff check .
ruff format --check .
set +e
python -m pytest -q "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
