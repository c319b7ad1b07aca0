#!/usr/bin/env bash
# The test command: builds its own virtual environment (once per pyproject.toml version),
# starts a throwaway Redis on a free port unless INSPECTOR_TEST_REDIS_URL is set, runs pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k model -x
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/env.sh
source scripts/env.sh "dev,onnx"

redis_dir=""
cleanup() {
    if [ -n "$redis_dir" ] && [ -f "$redis_dir/redis.pid" ]; then
        kill "$(cat "$redis_dir/redis.pid")" 2>/dev/null || true
    fi
    [ -n "$redis_dir" ] && rm -rf "$redis_dir"
}
trap cleanup EXIT

if [ -z "${INSPECTOR_TEST_REDIS_URL:-}" ]; then
    if command -v redis-server >/dev/null 2>&1; then
        redis_dir=$(mktemp -d)
        port=$("$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --daemonize yes \
            --dir "$redis_dir" --pidfile "$redis_dir/redis.pid" --logfile "$redis_dir/redis.log"
        export INSPECTOR_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
        echo "[test] throwaway redis at $INSPECTOR_TEST_REDIS_URL"
    else
        echo "[test] no redis-server on PATH and INSPECTOR_TEST_REDIS_URL unset: tests that need Redis will fail" >&2
    fi
fi

# The live page's test drives a real headless Chromium (tests/test_live.py); without one it skips
# and says so. Get it with `apt-get install chromium` (about 20 s); done here when run as root.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[test] installing chromium for the live page's browser test"
    timeout 300 apt-get install -y -q chromium >/dev/null 2>&1 \
        || echo "[test] could not install chromium: the browser test will skip" >&2
fi

"$VENV/bin/python" -m pytest "$@"
