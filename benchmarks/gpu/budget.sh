# Sourced by the device scripts: a wall-time budget from the script's start, phases that are
# skipped when too little of it is left, and packing of the results into $OUT.
started=$(date +%s)
budget=${BUDGET_SECONDS:-570}
elapsed() { echo $(( $(date +%s) - started )); }
left() { echo $(( budget - $(elapsed) )); }
phase() { echo "== $1 at $(elapsed) s ($(left) s left)"; }
fits() {  # fits SECONDS NAME: run the phase only when SECONDS are left
  if [ "$(left)" -lt "$1" ]; then echo "== skipped $2: $(left) s left, needs $1"; return 1; fi
}
pack() { tar -czf "$OUT/results.tar.gz" "$results" /tmp/tta-runs/*/metrics.json 2>/dev/null; }
set_up_device() {  # the device machine: wheels installed, FFCV built, data converted
  phase "set-up"
  # Not `source ... || exit 1`: the left side of || runs with errexit off, so a failed build
  # or conversion went on to every phase. Its own set -e now ends the call at a failed step.
  source benchmarks/gpu/device_setup.sh
  set +e
  python=python3; data=/tmp/datasets
  results=benchmarks/results/gpu/$(date -u +%Y-%m-%d)
}
