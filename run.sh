#!/usr/bin/env bash
# FitVideo on Linux/macOS.
#   ./run.sh [flags]        set up .venv on first use, then launch the UI (flags pass through: --port 7861, --int8, ...)
#   ./run.sh test [args]    set up .venv, then run the whole test suite (args go to pytest)
#   ./run.sh generate ...   headless generation (python app.py generate ...)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
VENV=.venv
STAMP="$VENV/.installed"

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[fitvideo] creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  local want
  want="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)"
  if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    echo "[fitvideo] installing requirements (first run takes a minute or two)"
    # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements-dev.txt
    echo "$want" > "$STAMP"
  fi
}

setup
case "${1:-}" in
  test)
    shift
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *)
    exec "$VENV/bin/python" app.py "$@"
    ;;
esac
