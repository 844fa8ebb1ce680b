#!/usr/bin/env bash
# Set up a virtual environment in .venv with gemma4 installed (editable).
#   bash tools/setup.sh         # runtime only
#   bash tools/setup.sh test    # plus the reference implementation (transformers) and pytest
# torch is installed only where it is missing, pinned to 2.13.0: a bare `pip install torch` would pull a
# multi-GB CUDA build onto CPU-only machines.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null
$py -c "import torch" 2>/dev/null || $py -m pip install -q torch==2.13.0
if [ "${1:-}" = "test" ]; then
  $py -m pip install -q -e ".[test]"
else
  $py -m pip install -q -e .
fi
echo "gemma4 is set up in $(pwd)/.venv"
