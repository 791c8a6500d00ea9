#!/usr/bin/env bash
# Set up the environment if needed, then run the whole test suite (the slow msrun runs included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
export GLOG_v=3
exec python -m pytest tests "$@"
