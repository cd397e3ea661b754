#!/bin/sh
# Long kmsfs runs that do not belong in the 10-minute suite: the seeded model test with many
# seeds and steps, and repeated kill -9 crash rounds. Usage: scripts/kmsfs-soak.sh [ROUNDS] [STEPS]
set -eu
cd "$(dirname "$0")/.."
rounds=${1:-20}
steps=${2:-50000}
i=0
while [ "$i" -lt "$rounds" ]; do
    seed=$(( $(date +%s) + i ))
    echo "== round $i: model seed $seed, $steps steps; crash test"
    KMSFS_MODEL_SEED=$seed KMSFS_MODEL_STEPS=$steps .venv/bin/pytest -q -x \
        tests/integration/test_kmsfs_lifecycle.py -k "model or kill_9"
    i=$((i + 1))
done
