#!/usr/bin/env bash
# Every GPU check in one call, on a fresh GPU machine without internet, from the repo root with
# .device carried (bash benchmarks/gpu/prepare_device.sh makes it here):
#   set-up -> pytest -m gpu + repeatability -> throughput decomposition (FFCV loader, then
#   --data-on-device) -> run cost (FLOPs and step rates per train side, progressive resizing) -> loader: FFCV path vs device-resident data -> ablation sweep on
#   held-out images -> time-to-accuracy (the default recipe: 6-epoch budget and 24 epochs,
#   3 seeds; seed recipe, 1 run) -> fp16 weights of a 24-epoch run (benchmarks/ship_weights.py).
# Results go to benchmarks/results/gpu/DATE/ and, packed, to $OUT. Each phase is skipped when
# too little of BUDGET_SECONDS (default 570) is left for it, so the call ends inside its limit.
# Rehearse here with DRY_RUN=1 (the converted ./datasets, small subsets, the CPU):
#   DRY_RUN=1 bash benchmarks/gpu/check.sh
set -uo pipefail
source benchmarks/gpu/budget.sh
if [ "${DRY_RUN:-0}" = 1 ]; then
  python=.venv/bin/python
  data=datasets
  small=(--train-subset 2560 --test-subset 512)
  decomposition_subset=(--train-subset 2560)
  loader_small=(--max-batches 4)
  run_cost_small=(--rounds 1 --steps 1)
  sweep_small=(--train-subset 3072 --holdout 512 --seeds 0 --only fast "+ knobs = express" "express + muon")
  epochs_short=2; epochs_long=3; runs=1; decomposition_epochs=1; eval_every=2
  OUT=${OUT:-/tmp/check-out}
  mkdir -p "$OUT"
else
  set_up_device
  small=()
  decomposition_subset=()
  loader_small=()
  run_cost_small=(--rounds 3 --steps 10)
  sweep_small=(--holdout 5000 --seeds 0 1)
  epochs_short=6; epochs_long=24; runs=3; decomposition_epochs=2; eval_every=20
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
fi
export PYTHONUNBUFFERED=1
results=benchmarks/results/gpu/$(date -u +%Y-%m-%d)
[ "${DRY_RUN:-0}" = 1 ] && results=/tmp/check-results
mkdir -p "$results"
fastcifar() { $python -m fastcifar "$@"; }

phase "gpu tests"
$python -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$results/pytest-gpu.log" | tail -5

phase "repeatability"
fits 330 repeatability && $python benchmarks/gpu/eval_repeatability.py --data $data --epochs 1 \
  "${small[@]}" 2>&1 | tee "$results/eval-repeatability.log" | tail -4

phase "throughput decomposition"
fits 310 decomposition && $python benchmarks/throughput_decomposition.py --data $data \
  --epochs $decomposition_epochs "${decomposition_subset[@]}" \
  --json "$results/throughput-decomposition.json" 2>&1 | tail -5

phase "throughput decomposition, device-resident data"
fits 300 decomposition-on-device && $python benchmarks/throughput_decomposition.py --data $data \
  --epochs $decomposition_epochs "${decomposition_subset[@]}" --data-on-device \
  --json "$results/throughput-decomposition-on-device.json" 2>&1 | tail -5

phase "run cost: express-muon (6 epochs, a pass each) vs express-progressive (5, one pass)"
fits 295 run-cost && $python benchmarks/run_cost.py "${run_cost_small[@]}" \
  --json "$results/run-cost.json" 2>&1 | grep -E "Before|^\| express" | tail -8

phase "loader: FFCV path vs device-resident data"
fits 290 loader-on-device && fastcifar benchmark loader --compare-on-device --data $data \
  --passes 2 "${loader_small[@]}" --json "$results/loader-on-device.json" 2>&1 | tail -3

phase "ablation sweep (held-out images)"
# Leave ~230 s for the time-to-accuracy runs and the export.
sweep_seconds=$(( $(left) - 230 ))
fits 280 sweep && $python benchmarks/recipe_sweep.py --data $data --epochs $epochs_short \
  "${sweep_small[@]}" --seconds $sweep_seconds --json "$results/sweep-${epochs_short}ep.json" \
  2>&1 | tee "$results/sweep-${epochs_short}ep.log" | grep -v "^\s*$" | tail -30
# The test-set runs are the default recipe's, as `fastcifar train` runs it (the sweep is the
# ablation's record; tune.sh and long.sh choose recipe changes on held-out images).
recipe=$($python -c "from fastcifar.config import DEFAULT_RECIPE; print(DEFAULT_RECIPE)")

pack

phase "time to accuracy: $recipe, ${epochs_short}-epoch budget"
short_started=$(date +%s)
fits 60 tta-short && timeout $(( $(left) - 10 )) $python -m fastcifar benchmark time-to-accuracy \
  --recipe "$recipe" --epochs $epochs_short --runs $runs --target 0.90 --target 0.93 \
  --eval-every-steps $eval_every --eval-steps-epochs 2 --data $data "${small[@]}" \
  --out /tmp/tta-runs --json "$results/time-to-accuracy-${recipe}-${epochs_short}ep.json" 2>&1 \
  | grep -v "^\s*$" | tail -4
# Seconds per epoch (training, evaluations, set-up) measured just now: size what follows.
per_epoch=$(( ($(date +%s) - short_started) / (epochs_short * runs) + 1 ))
runs_long=$(( ($(left) - 40) / (epochs_long * per_epoch) ))
[ $runs_long -gt $runs ] && runs_long=$runs
echo "about $per_epoch s per epoch: $runs_long run(s) of $epochs_long epochs fit"
pack

phase "time to accuracy: $recipe, ${epochs_long} epochs"
[ $runs_long -ge 1 ] && timeout $(( $(left) - 10 )) $python -m fastcifar benchmark \
  time-to-accuracy --recipe "$recipe" --epochs $epochs_long --runs $runs_long \
  --target 0.90 --target 0.925 --target 0.93 --target 0.94 --data $data "${small[@]}" \
  --out /tmp/tta-runs --json "$results/time-to-accuracy-${recipe}-${epochs_long}ep.json" 2>&1 \
  | grep -v "^\s*$" | tail -4

phase "export weights"
long_run=$($python -c "import json,sys; print(json.load(open(sys.argv[1]))['runs'][0]['run_dir'])" \
  "$results/time-to-accuracy-${recipe}-${epochs_long}ep.json" 2>/dev/null)
[ -n "$long_run" ] && $python benchmarks/ship_weights.py \
  "/tmp/tta-runs/weights/$(basename "$long_run")-final.safetensors" \
  "$OUT/custresnet-cifar10.safetensors"
pack

phase "time to accuracy: seed, ${epochs_long} epochs"
[ "$(left)" -gt $(( epochs_long * per_epoch + 20 )) ] && timeout $(( $(left) - 10 )) \
  $python -m fastcifar benchmark time-to-accuracy --recipe seed --epochs $epochs_long --runs 1 \
  --target 0.90 --data $data "${small[@]}" --out /tmp/tta-runs \
  --json "$results/time-to-accuracy-seed-${epochs_long}ep.json" 2>&1 | grep -v "^\s*$" | tail -3

phase "pack"
pack
ls -la "$OUT"
echo "done in $(elapsed) s"
