# Sourced by scripts/test.sh and scripts/demo.sh: makes sure $VENV holds this checkout installed
# with the given extras, (re)installing only when pyproject.toml changed.
# Usage: source scripts/env.sh "dev,onnx"
PYTHON=${PYTHON:-python3}
VENV=${INSPECTOR_VENV:-.venv}
extras=${1:-dev,onnx}
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
    echo "[env] installing inspector[$extras] into $VENV (the first run downloads torch: a few minutes)"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e ".[$extras]"
    touch "$stamp"
fi
