#!/usr/bin/env bash
# The whole test suite (CPU). Multi-device tests start their own processes with 8 fake CPU devices.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest tests -q "$@"
