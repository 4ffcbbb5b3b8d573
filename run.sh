#!/usr/bin/env bash
# FitVideo on Linux/macOS.
#   ./run.sh [flags]        set up .venv on first use, then launch the UI (flags pass through: --port 7861, --int8, ...)
#   ./run.sh test [args]    set up .venv and a Chromium for the browser test, then run the whole test suite
#                           (args go to pytest)
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
    # Upscalers (postprocess/): spandrel without its torchvision dependency (see constraints.txt).
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps "spandrel==0.4.2"
    echo "$want" > "$STAMP"
  fi
}

# tests/test_browser.py drives a real Chromium and fails (never skips) without one. It looks for
# FITVIDEO_CHROMIUM, then `chromium` on PATH, then Playwright's own build. Debian's package needs root
# and apt-get; elsewhere Playwright downloads its own into ~/.cache/ms-playwright (a no-op once there).
browser() {
  if [ -n "${FITVIDEO_CHROMIUM:-}" ] || command -v chromium >/dev/null 2>&1; then
    return 0
  fi
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[fitvideo] installing Debian's chromium for the browser test (once)"
    if apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; then
      return 0
    fi
  else
    echo "[fitvideo] installing Playwright's chromium for the browser test (once)"
    if "$VENV/bin/python" -m playwright install chromium; then
      return 0
    fi
  fi
  # The rest of the suite is still worth running; the browser test then fails and says how to install one.
  echo "[fitvideo] could not install a Chromium: tests/test_browser.py will fail (set FITVIDEO_CHROMIUM to a browser)" >&2
}

# tests/test_http_api.py calls the HTTP job API with curl, as the README shows it.
curl_tool() {
  if ! command -v curl >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[fitvideo] installing curl for the HTTP API test (once)"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y curl || true
  fi
}

setup
case "${1:-}" in
  test)
    shift
    browser
    curl_tool
    # Two workers, a test file each at a time (module-scoped servers stay in one process); tests/conftest.py gives
    # each its own home, ports and one torch thread. FITVIDEO_TEST_WORKERS=0 runs in one process.
    exec "$VENV/bin/python" -m pytest -n "${FITVIDEO_TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  *)
    exec "$VENV/bin/python" app.py "$@"
    ;;
esac
