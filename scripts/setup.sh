#!/usr/bin/env bash
# Create (or reuse) the project venv and install the workstation stack into it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run on its own.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${CARTOSPLIT_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.cartosplit-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  echo "installing into $VENV (first time about a minute) ..." >&2
  # torch first and pinned: an unpinned torch (or one pulled in by a dependency) is a multi-GB CUDA build
  python -m pip install -q --disable-pip-version-check torch==2.13.0
  python -m pip install -q --disable-pip-version-check -e ".[export,tflite,default-model,device,server,dev,ray]"
  touch "$stamp"
fi
