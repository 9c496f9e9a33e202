#!/usr/bin/env bash
# The whole test suite (CPU). Multi-device tests start their own processes with 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
# Two worker processes (M1_TEST_WORKERS; 0 runs in this process), whole files per worker so module fixtures
# are built once: XLA compiles on one thread, so two compile side by side on a 2-core machine.
python -m pytest -q -n "${M1_TEST_WORKERS:-2}" --dist loadfile "$@"   # testpaths = tests (pyproject.toml)
