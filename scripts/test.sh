#!/usr/bin/env bash
# Set up (idempotent) and run the lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check fastcifar tests benchmarks
# One test process per core (pytest-xdist): 7.6 min instead of 13.1 on 2 cores.
.venv/bin/python -m pytest -q -n auto "$@"
