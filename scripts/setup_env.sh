#!/usr/bin/env bash
# Create .venv (if absent) and install mindsft with its test references.
# fschat is installed without its dependencies: the tests only use fastchat.conversation,
# which needs nothing else, and its full dependency list would pull a CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test,serve]"
python -m pip install -q --no-deps "fschat==0.2.36"
