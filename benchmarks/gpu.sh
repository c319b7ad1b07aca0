#!/usr/bin/env bash
# The GPU benchmark in one call (benchmarks/gpu.py), on a CUDA machine that has PyTorch (2.11 or
# later, with timm, numpy, pillow, scipy and safetensors, as CUDA images do) and none of the
# project's other dependencies, and possibly no network:
#
#   bash benchmarks/gpu.sh --fetch-wheels      # where pip reaches a registry: wheels -> runs/gpu-wheels
#   bash benchmarks/gpu.sh --out DIR [gpu.py options]   # on the CUDA machine, with runs/gpu-wheels copied along
#
# Packages the machine lacks (FrEIA, structlog, pyzmq, redis) are installed from the wheel folder
# into runs/gpu-site (never into the machine's Python); the project runs from this checkout.
# PYTHON picks the interpreter (default python3), INSPECTOR_GPU_WHEELS the wheel folder, and
# INSPECTOR_GPU_PYTHON_VERSION the Python version the wheels are fetched for (default 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${INSPECTOR_GPU_WHEELS:-runs/gpu-wheels}
SITE=runs/gpu-site

if [ "${1:-}" = "--fetch-wheels" ]; then
    version=${INSPECTOR_GPU_PYTHON_VERSION:-3.12}
    mkdir -p "$WHEELS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" structlog pyzmq redis
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" FrEIA  # pure Python, published as a source archive only
    ls -1 "$WHEELS"
    exit 0
fi

missing=$("$PY" - <<'EOF'
import importlib.util
needed = {"FrEIA": "FrEIA", "structlog": "structlog", "zmq": "pyzmq", "redis": "redis", "timm": "timm",
          "safetensors": "safetensors", "PIL": "pillow", "scipy": "scipy", "tqdm": "tqdm", "numpy": "numpy",
          "prometheus_client": "prometheus-client"}
print(" ".join(pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "[gpu.sh] this Python lacks: $missing" >&2
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$PWD/$SITE${PYTHONPATH:+:$PYTHONPATH}"
        missing=$(PYTHONPATH="$PYTHONPATH" "$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("FrEIA", "structlog", "zmq", "redis") if importlib.util.find_spec(m) is None))
EOF
)
        echo "[gpu.sh] installed $WHEELS into $SITE; still missing: ${missing:-nothing}" >&2
    else
        echo "[gpu.sh] no wheels in $WHEELS (bash benchmarks/gpu.sh --fetch-wheels where a registry is reachable)" >&2
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu.py --missing "$missing" "$@"
