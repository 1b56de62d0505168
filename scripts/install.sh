#!/usr/bin/env bash
# Installs safe-dit (editable) and, with --test, what the test suite and the docs build need
# (the test and docs extras). One line per phase goes to stdout.
# torch: an already installed torch (CPU or CUDA) is kept; otherwise the pinned
# 2.13.0 is installed, which on the project's CPU machines is the local CPU wheel.
# --test also installs Chromium and its chromedriver from the system packages for the study page's browser
# test (apt-get, when run as root or with password-less sudo); where that cannot be done the test is skipped
# and says why.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "install.sh: $*"; }
if "$PY" -c "import torch" >/dev/null 2>&1; then
  say "keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "no torch found: installing torch 2.13.0 (a minute or two)..."
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
extra=""
if [ "${1:-}" = "--test" ]; then
  extra="[test,docs]"
  say "installing safe-dit (editable) with the test and docs extras..."
else
  say "installing safe-dit (editable) and its dependencies..."
fi
"$PY" -m pip install --quiet -e ".${extra}"

install_chromium() {
  if { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1 \
      && { command -v chromedriver || [ -x /usr/lib/chromium/chromedriver ]; } >/dev/null 2>&1; then
    say "chromium and chromedriver found (the study page's browser test runs)"
    return 0
  fi
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; else
      echo "install.sh: not root: Chromium not installed, the study browser test will be skipped" \
           "(as root: apt-get install chromium chromium-driver)" >&2
      return 0
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: no apt-get: install Chromium and chromedriver yourself, or the study browser test is skipped" >&2
    return 0
  fi
  say "installing chromium and chromium-driver with apt-get (the study page's browser test)..."
  if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
         chromium chromium-driver; } >/tmp/safe-dit-chromium-install.log 2>&1; then
    echo "install.sh: apt-get could not install chromium chromium-driver (log: /tmp/safe-dit-chromium-install.log);" \
         "the study browser test will be skipped" >&2
  fi
}
[ "${1:-}" = "--test" ] && install_chromium
say "done: $("$PY" -c 'import safe_dit; print("safe-dit", safe_dit.__version__)')"
exit 0
