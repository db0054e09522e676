#!/usr/bin/env bash
# The CPU figures quoted in the README, on the real data (CIFAR-10 JPEG-75 copy). Run from the
# repository root after `fastcifar convert --source ../shared/datasets/cifar10-jpeg.tar.gz`:
#
#   bash benchmarks/cpu_results.sh [STEP ...]      (default: the first four steps, in order)
#
#   subset    fastcifar train --epochs 2 --train-subset 10000 (defaults: fast recipe, bf16)
#   fast-4    fast recipe, 4-epoch time-to-accuracy, full data        (~35 min on 2 cores)
#   fast-13   fast recipe, 13-epoch time-to-accuracy, full data       (~2 h on 2 cores)
#   seed-24   seed recipe, 24-epoch time-to-accuracy, full data       (~3.5 h on 2 cores)
#   fast-24   fast recipe, 24-epoch time-to-accuracy, full data       (~3.5 h on 2 cores)
#
# Time-to-accuracy runs use fp32, the faster precision on this CPU
# (benchmarks/results/cpu/step-throughput.json). A long step can be stopped with Ctrl-C, or
# SIGTERM sent to its fastcifar process (`pkill -TERM -f 'fastcifar benchmark'`): it saves a
# checkpoint. `RESUME=runs/cpu/<run>/last.pt bash benchmarks/cpu_results.sh STEP` (one step)
# continues it; its log is appended to, and the per-epoch seconds of both parts are kept.
set -euo pipefail
out=benchmarks/results/cpu
mkdir -p "$out"
export PYTHONUNBUFFERED=1 COLUMNS=100

logged() {  # logged NAME COMMAND...: run, drop blank progress lines, append to $out/NAME.log
  local log="$out/$1.log"
  shift
  [ -n "${RESUME:-}" ] || : > "$log"
  # The filter ignores Ctrl-C so that fastcifar's "checkpoint saved" line still reaches the log.
  "$@" ${RESUME:+--resume "$RESUME"} 2>&1 \
    | { trap '' INT; grep --line-buffered -v '^ *$' | tee -a "$log"; }
}

time_to_accuracy() {  # time_to_accuracy RECIPE EPOCHS TARGET...
  local recipe=$1 epochs=$2 name="time-to-accuracy-$1-$2ep-cpu"
  shift 2
  logged "$name" .venv/bin/fastcifar benchmark time-to-accuracy --recipe "$recipe" \
    --epochs "$epochs" --precision fp32 "${@/#/--target=}" --out runs/cpu \
    --json "$out/$name.json"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(subset fast-4 fast-13 seed-24)
if [ -n "${RESUME:-}" ] && [ ${#steps[@]} -ne 1 ]; then
  echo "RESUME continues one step: name it (e.g. seed-24)" >&2
  exit 2
fi
for step in "${steps[@]}"; do
  case "$step" in
    subset)
      logged train-2ep-subset10k .venv/bin/fastcifar train --epochs 2 --train-subset 10000 \
        --out runs/cpu/subset
      run=$(ls -td runs/cpu/subset/*/ | head -1)
      cp "$run/metrics.json" "$out/train-2ep-subset10k-metrics.json"
      cp "$run/training_curves.png" "$out/training_curves-2ep-subset10k.png" ;;
    fast-4) time_to_accuracy fast 4 0.85 0.90 ;;
    fast-13) time_to_accuracy fast 13 0.90 0.94 ;;
    seed-24) time_to_accuracy seed 24 0.90 0.94 ;;
    fast-24) time_to_accuracy fast 24 0.90 0.935 0.94 ;;
    *) echo "unknown step: $step (subset, fast-4, fast-13, seed-24, fast-24)" >&2; exit 2 ;;
  esac
done
