#!/usr/bin/env bash
# Create .venv (if absent) and install mindsft with its test references and the board's
# dependencies; chromium and its driver (the board's browser test) come from apt when missing.
# fschat is installed without its dependencies: the tests only use fastchat.conversation,
# which needs nothing else, and its full dependency list would pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test,serve,board]"
python -m pip install -q --no-deps "fschat==0.2.36"
# The board's browser test drives Debian's chromium with its own chromedriver (nothing downloaded
# at test time); without root or apt the test skips and says why.
if ! command -v chromium >/dev/null || [ ! -x /usr/bin/chromedriver ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null; then
    { $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; }; } \
      || echo "setup_env.sh: could not install chromium and chromium-driver; the board's browser test will skip" >&2
  fi
fi
