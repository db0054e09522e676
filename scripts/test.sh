#!/usr/bin/env bash
# Set up (idempotent) and run the lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check fastcifar tests benchmarks
.venv/bin/python -m pytest -q "$@"
