#!/usr/bin/env bash
# A tuning round, a second short device call after check.sh: the express settings of
# recipe_sweep.py's round PLAN (default muon: the MUON_ROUND table; tuning: TUNING) on held-out train images (2 seeds, 6 epochs), then the best of
# them (chosen on the held-out images) on the test set: 6-epoch budget x 3 seeds (the winner's
# own --epochs where its cell names one: PLAN=resize), then one 24-epoch run (seed 3) if it
# fits. Results go to benchmarks/results/gpu/DATE/$PLAN-* and to $OUT. A sweep that writes no
# table ends the call (exit 1): its winner would otherwise default to express unnoticed.
# Rehearse here with DRY_RUN=1 (./datasets, small subsets, the CPU).
set -uo pipefail
source benchmarks/gpu/budget.sh
if [ "${DRY_RUN:-0}" = 1 ]; then
  python=.venv/bin/python; data=datasets
  small=(--train-subset 2560 --test-subset 512)
  # The plan's first two cells (one plan's names are not another's).
  mapfile -t first_cells < <($python -c "
import sys; sys.path.insert(0, 'benchmarks')
from recipe_sweep import round_variants
print('\n'.join(list(round_variants(sys.argv[1]))[:2]))" "${PLAN:-muon}")
  sweep_small=(--train-subset 3072 --holdout 512 --seeds 0 --only "${first_cells[@]}")
  epochs_short=2; epochs_long=3; runs=1; eval_every=2
  OUT=${OUT:-/tmp/tune-out}; mkdir -p "$OUT"
  results=/tmp/tune-results
else
  set_up_device
  small=(); sweep_small=(--holdout 5000 --seeds 0 1)
  epochs_short=6; epochs_long=24; runs=3; eval_every=20
fi
export PYTHONUNBUFFERED=1
mkdir -p "$results"

plan=${PLAN:-muon}
phase "$plan sweep (held-out images)"
rm -f "$results/$plan-${epochs_short}ep.json"  # an earlier call's winner is not this one's
$python benchmarks/recipe_sweep.py --plan $plan --data $data --epochs $epochs_short \
  "${sweep_small[@]}" --seconds $(( $(left) - 130 )) \
  --json "$results/$plan-${epochs_short}ep.json" 2>&1 | tee "$results/$plan-${epochs_short}ep.log" \
  | grep -v "^\s*$" | tail -16
# The winner's recipe (the round's base: express for muon/tuning, express-muon for resize,
# express-progressive for long) and its train options.
read -r recipe chosen_text < <($python -c "
import json, sys
report = json.load(open(sys.argv[1]))
print(report['cells'][report['best']]['recipe'], ' '.join(report['best_train_options'] or []))" \
  "$results/$plan-${epochs_short}ep.json")
read -r -a chosen <<< "${chosen_text:-}"
if [ -z "${recipe:-}" ]; then
  echo "the $plan sweep wrote no table: see $results/$plan-${epochs_short}ep.log"; pack; exit 1
fi
run_epochs=$epochs_short  # a cell that names its own budget (PLAN=resize) keeps it
for i in "${!chosen[@]}"; do
  [ "${chosen[$i]}" = --epochs ] && run_epochs=${chosen[$((i + 1))]}
done
echo "chosen on held-out images: $recipe ${chosen[*]} ($run_epochs epochs)"
pack

phase "time to accuracy: $recipe ${chosen[*]}, ${run_epochs}-epoch budget"
short_started=$(date +%s)
fits 50 tta-short && timeout $(( $(left) - 5 )) $python -m fastcifar benchmark time-to-accuracy \
  --recipe "$recipe" "${chosen[@]}" --epochs $run_epochs --runs $runs --target 0.90 \
  --target 0.93 --eval-every-steps $eval_every --eval-steps-epochs 2 --data $data "${small[@]}" \
  --out /tmp/tta-runs --json "$results/$plan-time-to-accuracy-${epochs_short}ep.json" 2>&1 \
  | grep -v "^\s*$" | tail -4
per_epoch=$(( ($(date +%s) - short_started) / (run_epochs * runs) + 1 ))
pack

phase "time to accuracy: $recipe ${chosen[*]}, ${epochs_long} epochs"
[ "$(left)" -gt $(( epochs_long * per_epoch + 10 )) ] && timeout $(( $(left) - 5 )) \
  $python -m fastcifar benchmark time-to-accuracy --recipe "$recipe" "${chosen[@]}" \
  --epochs $epochs_long --runs 1 --seed 3 --target 0.90 --target 0.925 --target 0.93 \
  --data $data "${small[@]}" --out /tmp/tta-runs \
  --json "$results/$plan-time-to-accuracy-${epochs_long}ep.json" 2>&1 | grep -v "^\s*$" | tail -3
pack
ls -la "$OUT"
echo "done in $(elapsed) s"
