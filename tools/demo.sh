#!/usr/bin/env bash
# The main job (README): set up .venv, then adapt + segment on the bundled default model and demo data.
#   bash tools/demo.sh [OUTPUT_DIR]        (default ./convlora-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
exec .venv/bin/convlora-seg demo -o "${1:-convlora-demo}"
