#!/usr/bin/env bash
# The side-by-side benchmark (see scripts/bench.py and docs/PERFORMANCE.md): sets up the machine
# (libfuse3, libfuse2, fusermount, .venv) through setup.sh, then runs bench.py with the given arguments.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh" >&2  # its progress is not part of the table
exec .venv/bin/python scripts/bench.py "$@"
