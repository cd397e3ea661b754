#!/usr/bin/env bash
# Sets up everything (see setup.sh) and runs the whole test suite: lint, unit, API and
# integration tests (real keyservice processes on 127.0.0.1, real FUSE mounts).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
say "ruff"
ruff check .
say "pytest"
start=$(date +%s)
pytest -q "$@"
say "suite took $(( $(date +%s) - start )) s"
