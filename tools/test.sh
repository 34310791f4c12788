#!/usr/bin/env bash
# The test command (README and CI): set up .venv with the test dependencies, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
exec .venv/bin/python -m pytest -q "$@"
