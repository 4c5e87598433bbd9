#!/usr/bin/env bash
# Set everything up, start the dev stack, send one real chat completion through it
# and print the answer. The stack keeps running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/modelfleet start --dev
echo
echo "Asking the frontdoor role: 'Name three primary colors.'"
.venv/bin/modelfleet chat --dev --role frontdoor "Name three primary colors."
echo
echo "The dev stack is still running. See it with: .venv/bin/modelfleet status --dev"
echo "Stop it with:                             .venv/bin/modelfleet stop --all --dev"
