#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install ConvLoRASegLib into it.
#   bash tools/setup_env.sh            # runtime only
#   bash tools/setup_env.sh test       # + test dependencies (loralib, deep-pipe, surface-distance, slicer-core, peft)
# torch is installed first at a known version: pip then keeps it (the package asks for torch>=2.1), and on
# machines with a local wheel of that version (CI here) nothing is downloaded. Users get their platform's build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==${TORCH_VERSION}"
fi
extra=""
if [ "${1:-}" = "test" ]; then extra="[test]"; fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extra}"
