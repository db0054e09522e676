#!/usr/bin/env bash
# Set up (idempotent) and run the lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
# One test process per core (pytest-xdist): on a 2-core AMD EPYC the suite took 7.1 min
# this way against 13.1 min in one process (2026-11-26). On a 2-core EPYC with AVX2 only (bf16
# emulated) it took 23.5-26 min while the tests trained the full-width CustResNet, 11.9-14.2 min
# once they trained a quarter-width one (tests/narrow_custresnet.py; benchmarks/results/cpu/
# test-suite-avx2.md); -n 3 was no faster there.
.venv/bin/python -m pytest -q -n auto "$@"
