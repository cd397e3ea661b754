#!/usr/bin/env bash
# The side-by-side benchmark (see scripts/bench.py and docs/PERFORMANCE.md): sets up the machine
# (libfuse3, libfuse2, fusermount, .venv) through setup.sh, then runs bench.py with the given arguments;
# `bench.sh --audit N` runs the audit review benchmark (bench_audit.py) instead.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" >&2  # its progress is not part of the table
if [[ "${1:-}" == --audit* ]]; then  # audit review at scale (issue 17): scripts/bench_audit.py
  exec .venv/bin/python scripts/bench_audit.py "$@"
fi
exec .venv/bin/python scripts/bench.py "$@"
