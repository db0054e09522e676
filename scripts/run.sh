#!/usr/bin/env bash
# Set up (idempotent), convert CIFAR-10 once, then train. Extra arguments go to `fastcifar train`.
# SOURCE picks the data (default: the JPEG copy in ../shared, else the official archive/download).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source_args=()
default_source=../shared/datasets/cifar10-jpeg.tar.gz
if [ -n "${SOURCE:-}" ]; then
  source_args=(--source "$SOURCE")
elif [ -f "$default_source" ]; then
  source_args=(--source "$default_source")
fi
.venv/bin/fastcifar convert "${source_args[@]}"
.venv/bin/fastcifar train "$@"
