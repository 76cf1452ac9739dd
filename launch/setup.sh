#!/usr/bin/env bash
# Set up .venv for unetdist: torch first (kept if the base Python already has one, e.g. a
# cluster's CUDA build), then the project with its test extra. Safe to run again: it only
# installs what is missing.
#   PYTHON=python3.11   the interpreter to build the venv from
#   TORCH_SPEC=...      the torch to install when none is importable (default torch==2.13.0,
#                       the CPU build on this project's machines; an open spec pulls a CUDA build)
#   VENV=.venv          where the environment lives
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: $PYTHON already has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'); the venv will use it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('unetdist', 'deepspeed', 'webdataset', 'tifffile', 'pytest')))" \
   || [ pyproject.toml -nt "$VENV/.unetdist-installed" ]; then
  echo "setup: installing unetdist and its dependencies"
  "${PIP[@]}" install -e ".[test]"
  touch "$VENV/.unetdist-installed"
fi
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
