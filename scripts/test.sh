#!/usr/bin/env bash
# The test command (README, .ci/run): installs what it needs, lints, runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export HF_HUB_OFFLINE=1  # tests never reach a model hub
ruff check .
ruff format --check .
status=0
run_pytest() {
  set +e
  python -m pytest -q "$@"
  local code=$?
  set -e
  if [ "$code" -eq 5 ]; then
    echo "pytest collected no tests: failing on purpose" >&2
    code=1
  fi
  if [ "$code" -ne 0 ]; then
    status=$code
  fi
}
if [ "$#" -eq 0 ]; then
  run_pytest            # the suite; pyproject's addopts leave out the tests marked ray
  run_pytest -m ray     # those start a local Ray (~1 GB): in a process of their own, after the rest
else
  run_pytest "$@"       # e.g. a file, or -m ray
fi
exit "$status"
