#!/usr/bin/env bash
# The demo command: installs into .venv if needed, then runs `inspector demo` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/env.sh
source scripts/env.sh "dev,onnx"
exec "$VENV/bin/inspector" demo "$@"
