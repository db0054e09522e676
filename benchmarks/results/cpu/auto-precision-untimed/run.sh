#!/usr/bin/env bash
# One after the other, nothing else running: the same 1-epoch auto run at 1ae4a72 (times fp32
# against bf16 on the first batch) and at 446416e (skips the timing on a CPU without native bf16).
# BEFORE: a worktree of 1ae4a72 (git worktree add --detach BEFORE 1ae4a72); AFTER: a checkout of
# 446416e or later; both run with this checkout's .venv (PYTHON) on DATA's converted betons.
set -u
BEFORE=${BEFORE:-/work/runtree} AFTER=${AFTER:-/work/main} DATA=${DATA:-/work/main/datasets}
PYTHON=${PYTHON:-/work/main/.venv/bin/python} OUT=${OUT:-$PWD}
args=(train --epochs 1 --train-subset 8192 --test-subset 512 --no-tta --seed 0 --data "$DATA"
      --no-tensorboard)
for tree in "$BEFORE" "$AFTER"; do
  rev=$(git -C "$tree" rev-parse --short HEAD)
  start=$(date +%s.%N)
  (cd /tmp && PYTHONPATH=$tree $PYTHON -m fastcifar.cli "${args[@]}" --out "$OUT/runs-$rev" \
    --weights "$OUT/weights-$rev") > "$OUT/log-$rev.txt" 2>&1
  echo "$rev rc=$? wall=$(echo "$(date +%s.%N) - $start" | bc) s"
done
