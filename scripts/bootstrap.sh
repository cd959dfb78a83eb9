#!/usr/bin/env bash
# Creates .venv and installs everything the project needs, from pinned versions only.
# Idempotent: a second run with an unchanged lock file does almost nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
    echo "bootstrap: need Python 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.lock.sha256
want=$(cat requirements/lock.txt requirements/build.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "${PIP[@]}" install -q -r requirements/build.txt
    # torch (and the numpy it is built with) before compressai, as compressai expects.
    "${PIP[@]}" install -q $(grep -E '^(torch|torchvision|numpy)==' requirements/lock.txt)
    "${PIP[@]}" install -q -r requirements/lock.txt
    echo "$want" > "$stamp"
fi
# The project itself, editable, with its C extension (the rANS coder) compiled here, and its
# development tooling (dev/: local stack, demo, benchmark helpers), a distribution of its own.
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"${PIP[@]}" install -q --no-deps --no-build-isolation -e dev
.venv/bin/python -c 'import nec_serve._rans, nec_models, nec_export, nec_dev.stack' \
    || { echo "bootstrap: import check failed" >&2; exit 1; }
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
