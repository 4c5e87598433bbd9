#!/usr/bin/env bash
# Install modelfleet into .venv, build llama-server into the cache (once per machine,
# 15-20 minutes on 2 cores) and fetch the dev model. Safe to rerun: it reuses both.
# The browser tests (tests/test_ui.py) need Debian's chromium: installed here when
# missing and apt-get is at hand; playwright drives it and never downloads a browser.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
# The Ray extra too: CI runs the tests of `placement: ray` on a local Ray cluster.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev,ray]'
.venv/bin/modelfleet setup
