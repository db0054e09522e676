#!/usr/bin/env bash
# The long-budget round in one device call (after check.sh, or on its own): recipe_sweep.py's
# long plan (LONG_ROUND: the default recipe, + pad 4, + cutout 8/12, both, + lookahead) at 24
# epochs on 5,000 held-out train images (2 seeds), then its choice on the test set at 24 epochs
# x 3 seeds, then the default recipe as it is at a 6-epoch budget x 3 seeds (the short budget
# keeps its settings), then fp16 weights of the best 24-epoch run. Each phase is skipped when too
# little of BUDGET_SECONDS (default 570) is left. Results go to benchmarks/results/gpu/DATE/long-*
# and, packed, to $OUT.
# Rehearse here with DRY_RUN=1 (./datasets, small subsets, 2 and 3 epochs, the CPU):
#   DRY_RUN=1 bash benchmarks/gpu/long.sh
set -uo pipefail
source benchmarks/gpu/budget.sh
if [ "${DRY_RUN:-0}" = 1 ]; then
  python=.venv/bin/python; data=datasets
  small=(--train-subset 2560 --test-subset 512)
  sweep_small=(--train-subset 3072 --holdout 512 --seeds 0 --only express-progressive "+ pad 4")
  epochs_short=2; epochs_long=3; runs=1
  score_weights=()  # scoring 10,000 test images in 6 passes takes minutes on 2 cores
  OUT=${OUT:-/tmp/long-out}; mkdir -p "$OUT"
  results=/tmp/long-results
else
  phase "set-up"
  source benchmarks/gpu/device_setup.sh || exit 1
  set +e
  python=python3; data=/tmp/datasets
  small=(); sweep_small=(--holdout 5000 --seeds 0 1)
  epochs_short=6; epochs_long=24; runs=3
  score_weights=(--data $data)
  results=benchmarks/results/gpu/$(date -u +%Y-%m-%d)
fi
export PYTHONUNBUFFERED=1
mkdir -p "$results"
recipe=$($python -c "from fastcifar.config import DEFAULT_RECIPE; print(DEFAULT_RECIPE)")
tta() { timeout $(( $(left) - 5 )) $python -m fastcifar benchmark time-to-accuracy "$@" \
  --data $data "${small[@]}" --out /tmp/tta-runs 2>&1 | grep -v "^\s*$" | tail -4; }

phase "long sweep, $epochs_long epochs (held-out images)"
# Leave ~200 s for the test-set runs and the weights.
fits 260 long-sweep && $python benchmarks/recipe_sweep.py --plan long --data $data \
  --epochs $epochs_long "${sweep_small[@]}" --seconds $(( $(left) - 200 )) \
  --json "$results/long-${epochs_long}ep.json" 2>&1 | tee "$results/long-${epochs_long}ep.log" \
  | grep -v "^\s*$" | tail -12
read -r -a chosen < <($python -c "import json,sys; print(' '.join(json.load(open(sys.argv[1]))['best_train_options'] or []))" \
  "$results/long-${epochs_long}ep.json" 2>/dev/null)
echo "chosen on held-out images: $recipe ${chosen[*]}"
pack

phase "time to accuracy: $recipe ${chosen[*]}, $epochs_long epochs x $runs"
long_started=$(date +%s)
fits 60 tta-long && tta --recipe "$recipe" "${chosen[@]}" --epochs $epochs_long --runs $runs \
  --eval-from-epoch $epochs_long --target 0.925 --target 0.93 \
  --json "$results/long-time-to-accuracy-${epochs_long}ep.json"
echo "$(( $(date +%s) - long_started )) s for $runs run(s) of $epochs_long epochs"
pack

phase "time to accuracy: $recipe, $epochs_short-epoch budget x $runs"
fits 40 tta-short && tta --recipe "$recipe" --epochs $epochs_short --runs $runs --target 0.90 \
  --json "$results/long-time-to-accuracy-${epochs_short}ep.json"
pack

phase "fp16 weights of the best $epochs_long-epoch run"
best_run=$($python -c "
import json, sys
runs = json.load(open(sys.argv[1]))['runs']
print(max(runs, key=lambda run: run['final_accuracy'])['run_dir'])" \
  "$results/long-time-to-accuracy-${epochs_long}ep.json" 2>/dev/null)
[ -n "$best_run" ] && fits 20 weights && timeout $(( $(left) - 3 )) $python \
  benchmarks/ship_weights.py "/tmp/tta-runs/weights/$(basename "$best_run")-final.safetensors" \
  "$OUT/custresnet-cifar10.safetensors" "${score_weights[@]}"
pack
ls -la "$OUT"
echo "done in $(elapsed) s"
