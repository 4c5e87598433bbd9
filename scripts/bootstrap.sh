#!/usr/bin/env bash
# Install modelfleet into .venv, build llama-server into the cache (once per machine,
# 15-20 minutes on 2 cores) and fetch the dev model. Safe to rerun: it reuses both.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# The Ray extra too: CI runs the tests of `placement: ray` on a local Ray cluster.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
.venv/bin/modelfleet setup
