#!/usr/bin/env bash
# The measurements of generation run 5 and the compile-time check (docs/benchmarks/generate.md, training.md), on one
# H200, as three device calls of under 10 minutes each.
# Each step has its own time limit and writes under $OUT/<step>; a failing step does not stop the others.
#
#   bash scripts/measure_pending.sh generate    # issue 17: batch-64 prefill, the MoE decode paths (dense, fused)
#   bash scripts/measure_pending.sh weights     # issue 17: float32 weights cast once or per step; weight-slice copies
#   bash scripts/measure_pending.sh train       # issue 12: the small step's compile time after kernel sharing
#   bash scripts/measure_pending.sh lightning   # issue 15: the shipped plan (wide walks), wide against narrow, fla
#   bash scripts/measure_pending.sh train_mfu   # the small and medium train steps with the wide and fused dk/dv walks
#
# The results of 2026-12-01 and what they decided: docs/benchmarks/generate.md ("Run 5") and docs/benchmarks/training.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/measure_pending}"
mkdir -p "$OUT"

step() {  # step NAME SECONDS COMMAND...
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: exit $? after $((SECONDS - t0)) s"
  tail -n 25 "$OUT/$name.log"
}

case "${1:-}" in
  generate)
    step gen 280 python benchmarks/generate.py --models hybrid,twin --batches 1,64 --contexts 1K,8K,32K --checks moe_decode \
      --breakdown --prefill-batches 64 --prefill-contexts 1K,8K --budget-s 250 --out "$OUT/gen"
    step gen_dense 90 python benchmarks/generate.py --models hybrid --batches 64 --contexts 1K,32K --no-check --no-prefill \
      --moe-impl dense --budget-s 75 --out "$OUT/gen_dense"
    step gen_fused 70 python benchmarks/generate.py --models hybrid --batches 1 --contexts 1K,1M --no-check --no-prefill \
      --moe-decode fused --budget-s 60 --out "$OUT/gen_fused"
    ;;
  weights)
    step gen_f32 60 python benchmarks/generate.py --models hybrid --batches 1,64 --contexts 1K --no-check --no-prefill \
      --param-dtype float32 --budget-s 50 --out "$OUT/gen_f32"
    step gen_f32_nocast 60 python benchmarks/generate.py --models hybrid --batches 1,64 --contexts 1K --no-check --no-prefill \
      --param-dtype float32 --no-cast-weights --budget-s 50 --out "$OUT/gen_f32_nocast"
    # the MoE of a decode step alone, every form, weights flat and sliced from a stack (slice copies show as a gap)
    step moe_decode 150 python benchmarks/moe_decode.py --tokens 1,8,64 --out "$OUT/moe_decode"
    # whether XLA copies a block's weight slice for a kernel operand: the same decode with dynamic-slice fusion on
    step gen_dsf 250 python benchmarks/generate.py --models hybrid --batches 1,64 --contexts 1K --no-check --no-prefill \
      --breakdown --variant-flags=--xla_gpu_enable_dynamic_slice_fusion=true --variant-contexts 1K \
      --variant-budget-s 110 --budget-s 230 --out "$OUT/gen_dsf"
    ;;
  train)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step train_small 330 python benchmarks/train_mfu.py --preset small \
      --variants b2,b2+packed --steps 4 --budget_s 300 --out "$OUT/train_small.json"
    XLA_FLAGS=--xla_gpu_autotune_level=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step train_small_noautotune 230 \
      python benchmarks/train_mfu.py --preset small --variants b2 --steps 4 --budget_s 200 --out "$OUT/train_small_noautotune.json"
    ;;
  lightning)
    # issue 15: the shipped plan (wide walks) on the whole grid with the forward kept in forward+backward, fla
    # at the benchmark shapes, the wide walks against narrow ones and the forward wide with the backward narrow
    # (the `wide` preset), compiled checks (docs/benchmarks/lightning_attention.md, "Wide walks"). The budget
    # leaves the sweep ~60 s inside its step's limit to stop its workers and write its JSON.
    step sweep_shipped 480 python benchmarks/lightning_attention.py --mode sweep --out "$OUT/sweep" --tag shipped \
      --variants default,wide --fla --checks --short --workers 6 --mem-fraction 0.12 --budget 380
    step wide 100 python benchmarks/lightning_dkdv.py --variants wide --out "$OUT/wide" --state \
      --shapes 16x16x16384x128,1x8x131072x128
    ;;
  train_mfu)
    # the train steps with the fused dk/dv walk (docs/benchmarks/training.md measured them before it)
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step train_mfu_small 240 python benchmarks/train_mfu.py --preset small \
      --variants b2 --steps 4 --budget_s 220 --out "$OUT/train_mfu_small.json"
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 step train_mfu_medium 330 python benchmarks/train_mfu.py --preset medium \
      --variants b4-mb4 --steps 4 --budget_s 300 --out "$OUT/train_mfu_medium.json"
    ;;
  *)
    echo "usage: bash scripts/measure_pending.sh generate|weights|train|lightning|train_mfu   (results under \$OUT, default $OUT)" >&2
    exit 2
    ;;
esac
