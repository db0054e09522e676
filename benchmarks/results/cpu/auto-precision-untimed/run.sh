#!/usr/bin/env bash
# One after the other, nothing else running: the same 1-epoch auto run at 1ae4a72 (times fp32
# against bf16 on the first batch) and at 446416e (skips the timing on a CPU without native bf16).
set -u
args=(train --epochs 1 --train-subset 8192 --test-subset 512 --no-tta --seed 0 --data /work/main/datasets --no-tensorboard)
for tree in /work/runtree /work/main; do
  rev=$(git -C $tree rev-parse --short HEAD)
  start=$(date +%s.%N)
  (cd /tmp && PYTHONPATH=$tree /work/main/.venv/bin/python -m fastcifar.cli "${args[@]}" --out /work/long-runs/s12/auto/runs-$rev --weights /work/long-runs/s12/auto/weights-$rev) > log-$rev.txt 2>&1
  echo "$rev rc=$? wall=$(echo "$(date +%s.%N) - $start" | bc) s"
done
