#!/usr/bin/env bash
# Creates .venv and installs nanoseek with its dev extras. Idempotent: a second run with an
# unchanged pyproject.toml returns in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

stamp=.venv/.nanoseek-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# torch first, pinned: 2.13.0 is the CPU build on local disk; letting another package pull
# torch in would download a multi-GB CUDA build.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
echo "$want" > "$stamp"
