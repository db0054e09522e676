#!/usr/bin/env bash
# The CPU figures quoted in the README, on the real data (CIFAR-10 JPEG-75 copy), in order:
# a 2-epoch run on the first 10,000 train images (default settings: bf16 autocast), then the
# fast recipe's 4-epoch time-to-accuracy on the full data in fp32, the faster precision on
# this CPU (benchmarks/results/cpu/step-throughput.json). Run from the repository root after
# `fastcifar convert --source ../shared/datasets/cifar10-jpeg.tar.gz`.
set -euo pipefail
out=benchmarks/results/cpu
mkdir -p "$out"
export PYTHONUNBUFFERED=1 COLUMNS=100
if [ "${1:-}" != "--skip-subset" ]; then
  .venv/bin/fastcifar train --epochs 2 --train-subset 10000 --out runs/cpu 2>&1 \
    | grep --line-buffered -v '^ *$' | tee "$out/train-2ep-subset10k.log"
  run=$(ls -td runs/cpu/*/ | head -1)
  cp "$run/metrics.json" "$out/train-2ep-subset10k-metrics.json"
  cp "$run/training_curves.png" "$out/training_curves-2ep-subset10k.png"
fi
.venv/bin/fastcifar benchmark time-to-accuracy --recipe fast --epochs 4 --precision fp32 \
  --target 0.85 --target 0.90 --out runs/cpu --json "$out/time-to-accuracy-fast-4ep-cpu.json" \
  2>&1 | grep --line-buffered -v '^ *$' | tee "$out/time-to-accuracy-fast-4ep-cpu.log"
